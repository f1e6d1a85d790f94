"""Integrity of a shard folder: each shard's sha256 and size, the manifest's own checksum, and the one
verifier every reader runs before it uses a shard.

`verify_shards` re-reads every listed shard in 1 MiB blocks (memory does not grow with the corpus; files are
hashed in parallel threads, hashlib releases the GIL) and compares its size and sha256 with the manifest
entry the writer recorded; `unlisted_shards` finds Parquet files in the folder that the manifest does not list
(pandas would read them). Both raise ShardError naming the file, what was expected and found, and the command
that rescores it (`rescore_hint`, from the command line each writer records in its manifest).
A full hash costs 0.13–0.17 of one pyarrow read of the same files (bench/bench_verify.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scoring.shards.schema import MANIFEST_NAME, ShardError, shard_index

BLOCK_BYTES = 1 << 20  # read size of the streamed hash
MAX_HASH_THREADS = 8
SHOWN_PROBLEMS = 10  # bad shards listed in one message


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    """sha256 over the shard entries (files, sizes, checksums): what a training run records."""
    shards = sorted(manifest["shards"], key=lambda s: s["index"])
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def invoking_command() -> dict | None:
    """The `tokenprio ...` command line of this process and its working directory, recorded in manifests so a
    damaged shard's fix can be printed exactly; None when tokenprio was called from Python."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if program not in ("tokenprio", "cli.py"):
        return None
    return {"argv": ["tokenprio", *sys.argv[1:]], "cwd": os.getcwd()}


def _shell(command: dict) -> str:
    line = shlex.join(command["argv"])
    return line if command.get("cwd") in (None, os.getcwd()) else f"cd {shlex.quote(command['cwd'])} && {line}"


def run_step(manifest: dict) -> dict:
    """The command(s) that wrote a task-based folder's shards (score, add-model): one per task, as finalize records them."""
    return {"num_tasks": int(manifest.get("config", {}).get("num_tasks", 1) or 1), "commands": manifest.get("commands")}


def _step_command(step: dict, index: int, folder: Path) -> str | None:
    owner = next((c for c in step.get("commands") or [] if c and c.get("task_index") == index % step["num_tasks"]), None)
    if owner is None:
        return None
    # absolute: a recorded command may start with `cd` into its own working directory
    return _shell(owner) + (f" && tokenprio finalize {shlex.quote(str(Path(folder).resolve()))}" if step["num_tasks"] > 1 else "")


def rescore_hint(folder: Path, manifest: dict, path: Path) -> str:
    """How to rewrite shard `path` of `folder`: remove it and rerun the recorded commands (score and add-model
    rewrite missing shards and skip complete ones; an in-place add-model needs the score before it; the one-pass
    writers, reweight and project, rewrite the whole folder)."""
    folder, quoted = Path(folder), shlex.quote(str(folder))
    where = f"{folder / MANIFEST_NAME} 'config'"
    one_pass = next((key for key in ("reweighted_from", "projected_from", "edited_from") if key in manifest), None)
    if one_pass is None:
        steps = [*manifest.get("history", []), run_step(manifest)]
        commands = [_step_command(step, shard_index(path), folder) for step in steps]
        if all(commands):
            return f"rescore it: `{' && '.join([f'rm {shlex.quote(str(path))}', *commands])}` (complete shards are skipped)"
        num_tasks = run_step(manifest)["num_tasks"]
        task = f" as task {shard_index(path) % num_tasks} of {num_tasks}" if num_tasks > 1 else ""
        return (f"rescore it: remove it and rerun the command that wrote {folder}{task} (its options are in {where}; no command "
                "line was recorded, it did not run from the tokenprio CLI); complete shards are skipped")
    if manifest.get("command"):
        return f"rewrite the folder: `rm -r {quoted} && {_shell(manifest['command'])}`"
    source = manifest[one_pass].get("folder")
    if one_pass == "reweighted_from":
        spec = shlex.quote(str(manifest[one_pass].get("spec")))
        return f"rewrite the folder: `rm -r {quoted} && tokenprio reweight {shlex.quote(str(source))} --priority {spec} --out {quoted}`"
    if one_pass == "edited_from":
        return f"rewrite the folder from {source} with scoring.frames.write_shards(df, like={source!r}, out=...)"
    return f"rewrite the folder: remove it and rerun `tokenprio project {source} ...` with the options in {where}"


def unlisted_shards(folder: Path, manifest: dict) -> list[Path]:
    """Parquet files under `folder` that the manifest does not list; hidden (`.`, `_`) names are skipped, as
    pandas and pyarrow skip them."""
    listed = {s["file"] for s in manifest["shards"]}
    found = []
    for path in sorted(Path(folder).rglob("*.parquet")):
        parts = path.relative_to(folder).parts
        if any(part.startswith((".", "_")) for part in parts):
            continue
        if len(parts) > 1 or path.name not in listed:
            found.append(path)
    return found


def shard_problem(path: Path, entry: dict) -> str | None:
    """What is wrong with shard `path` against its manifest entry (size, then sha256), or None."""
    size = path.stat().st_size
    expected_size = entry.get("bytes")  # manifests written before sizes were recorded have only the hash
    found = sha256_file(path)
    if found == entry["sha256"] and expected_size in (None, size):
        return None
    sizes = f"{size} bytes" + (f" (expected {expected_size})" if expected_size is not None else "")
    return f"{path}: sha256 {found}, expected {entry['sha256']}; {sizes}"


def verify_shards(folder: Path, manifest: dict, paths: list[Path] | None = None) -> None:
    """Check shards of `folder` against `manifest` before anything reads them: no unlisted Parquet file, and each
    of `paths` (default: every listed shard) with the size and sha256 of its entry. Raises ShardError naming each
    bad file, what was expected and found, and the fix."""
    folder = Path(folder)
    extra = unlisted_shards(folder, manifest)
    if extra:
        shown = ", ".join(str(p) for p in extra[:SHOWN_PROBLEMS])
        raise ShardError(
            f"{shown}: not listed in {folder / MANIFEST_NAME} (a file added by hand or left by another run); tokenprio reads only the "
            "shards the manifest lists, and pandas would read these too. Move them out of the folder; write edited rows as a new "
            "folder with scoring.frames.write_shards(df, like=..., out=NEW)."
        )
    entries = {s["file"]: s for s in manifest["shards"]}
    paths = [Path(folder) / s["file"] for s in manifest["shards"]] if paths is None else [Path(p) for p in paths]
    threads = max(1, min(len(paths), os.cpu_count() or 1, MAX_HASH_THREADS))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = [(p, problem) for p, problem in zip(paths, pool.map(lambda p: shard_problem(p, entries[p.name]), paths)) if problem]
    if problems:
        lines = [f"{problem}; {rescore_hint(folder, manifest, p)}" for p, problem in problems[:SHOWN_PROBLEMS]]
        more = f"\n(and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise ShardError(
            f"{len(problems)} shard(s) of {folder} do not match {MANIFEST_NAME}: the files changed after they were written (disk or "
            "copy corruption, or an edit), so nothing was read from them.\n" + "\n".join(lines) + more
        )
