"""Manifests: each task's `_manifest.task-I.json`, their merge into `_manifest.json`, and the checksum a
training run records.

Shard k holds input records [kR, (k+1)R); task i of N owns the shards with k ≡ i (mod N), so the corpus
does not depend on N. A shard is complete when its file exists and its metadata carries the run's config
hash; a rerun skips it. `finalize` checks that the task manifests of one run cover every shard once.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from scoring.shards.files import parse_json, read_metadata, shard_entry, write_json_atomic
from scoring.shards.integrity import invoking_command, manifest_checksum, run_step, shard_problem
from scoring.shards.locks import hold_lock, task_lock_path
from scoring.shards.schema import MANIFEST_NAME, SCHEMA_VERSION, ShardError, shard_name

TOTAL_KEYS = ("records", "skipped_records", "truncated_tokens", "rows", "tokens", "targets")
SKIPPED_EXAMPLES = 20  # messages of skipped records kept in a manifest


def build_manifest(shards: list[dict], metadata: dict) -> dict:
    """The `_manifest.json` of a shard folder: metadata, totals over the shards, entries and checksum."""
    shards = sorted(shards, key=lambda s: s["index"])
    totals = {key: sum(s.get(key, 0) for s in shards) for key in TOTAL_KEYS}
    manifest = {"schema_version": SCHEMA_VERSION, "metadata": metadata, "totals": totals, "shards": shards}
    manifest["checksum"] = manifest_checksum(manifest)
    return manifest


def write_manifest(out: Path, entries: list[dict], metadata: dict, **provenance) -> dict:
    """Write `_manifest.json` for the shards `entries` of a one-pass command (reweight, project, write_shards), with
    provenance keys (e.g. config, reweighted_from) and the command line that ran (to print a damaged shard's fix),
    atomically and last; return it."""
    manifest = build_manifest(entries, metadata) | provenance | {"command": invoking_command()}
    write_json_atomic(Path(out) / MANIFEST_NAME, manifest)
    return manifest


def complete_shard(out: Path, index: int, hash_key: str, cfg_hash: str, overwrite: bool) -> dict | None:
    """The manifest entry of shard `index` in `out` when it was written by this configuration, else None.

    A shard written with another configuration (metadata[hash_key] differs) is refused unless
    `overwrite`, in which case it will be replaced.
    """
    path = out / shard_name(index)
    if not path.exists():
        return None
    written_hash = read_metadata(path).get(hash_key)
    if written_hash == cfg_hash:
        recorded = recorded_entry(out, index, cfg_hash)
        problem = shard_problem(path, recorded) if recorded is not None else None
        if problem:  # a complete shard damaged since this configuration wrote it: a rerun must not re-bless it
            raise ShardError(f"{problem} (recorded by this configuration's task manifest when the shard was written): the file "
                             f"changed since. Remove it (`rm {path}`) and rerun this command, which rescores it.")
        return shard_entry(path)
    if overwrite:
        return None
    raise ShardError(
        f"{path}: written with another configuration ({hash_key} {written_hash}, now {cfg_hash}). "
        "Use another --out, or pass --overwrite to replace it."
    )


def task_manifest_path(out: Path, task_index: int) -> Path:
    return Path(out) / f"_manifest.task-{task_index}.json"


def recorded_entry(out: Path, index: int, cfg_hash: str) -> dict | None:
    """Shard `index`'s entry in a task manifest of configuration `cfg_hash` in `out` (what the run that wrote it recorded)."""
    for path in Path(out).glob("_manifest.task-*.json"):
        try:
            task = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):  # a damaged task manifest is rewritten by this run
            continue
        if isinstance(task, dict) and task.get("config_hash") == cfg_hash:
            entry = next((e for e in task.get("shards", []) if isinstance(e, dict) and e.get("index") == index), None)
            if entry is not None and "sha256" in entry:
                return entry
    return None


def write_task_manifest(
    out: Path, *, task_index: int, num_tasks: int, n_shards: int, cfg_hash: str, config: dict, metadata: dict, entries: list[dict],
    skipped_messages: list[str],
) -> dict:
    """Write this task's manifest (its shard entries, the run's identity and the command line that ran) atomically; return it."""
    task = {
        "task_index": task_index,
        "num_tasks": num_tasks,
        "n_shards": n_shards,
        "config_hash": cfg_hash,
        "config": config,
        "metadata": metadata,
        "shards": sorted(entries, key=lambda e: e["index"]),
        "skipped_examples": skipped_messages[:SKIPPED_EXAMPLES],
        "command": invoking_command(),
    }
    write_json_atomic(task_manifest_path(out, task_index), task)
    return task


def finalize(out: str | Path, cfg_hash: str | None = None) -> dict:
    """Validate and merge the task manifests of one run (`cfg_hash`, default: the newest) into `_manifest.json`.

    Refuses when a task has not finished, when task manifests of the run disagree (number of tasks,
    shards, configuration), or when their shards do not cover 0..n_shards-1 exactly once.
    """
    out = Path(out)
    if not out.is_dir():
        raise ShardError(f"{out}: no such shard folder.")
    task_files = sorted(out.glob("_manifest.task-*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not task_files:
        raise ShardError(f"{out}: no task manifests (_manifest.task-I.json); run `tokenprio score` or `tokenprio add-model` first.")
    tasks = [parse_json(p.read_bytes(), f"{p}: the task manifest", "rerun that task (complete shards are skipped)") for p in task_files]
    for path, task in zip(task_files, tasks):
        if not isinstance(task, dict) or not {"config_hash", "num_tasks", "n_shards", "task_index", "shards", "metadata", "config"} <= task.keys():
            raise ShardError(f"{path}: not a task manifest (keys missing); rerun that task (complete shards are skipped).")
    cfg_hash = cfg_hash or tasks[-1]["config_hash"]
    run = [(p, t) for p, t in zip(task_files, tasks) if t["config_hash"] == cfg_hash]
    if not run:
        raise ShardError(f"{out}: no task manifest of configuration {cfg_hash}.")
    num_tasks, n_shards, metadata = run[0][1]["num_tasks"], run[0][1]["n_shards"], run[0][1]["metadata"]
    for path, task in run:
        if (task["num_tasks"], task["n_shards"]) != (num_tasks, n_shards):
            raise ShardError(f"{path}: written by another run (num_tasks or shard count differ). Remove it and rerun that task.")
    missing_tasks = sorted(set(range(num_tasks)) - {task["task_index"] for _, task in run})
    if missing_tasks:
        raise ShardError(f"{out}: tasks {missing_tasks} of {num_tasks} have not finished; run them, then `tokenprio finalize {out}`.")
    entries = [entry for _, task in run for entry in task["shards"]]
    indices = sorted(e["index"] for e in entries)
    if indices != list(range(n_shards)):
        raise ShardError(f"{out}: task manifests cover shards {indices}, expected 0..{n_shards - 1}.")
    manifest = build_manifest(entries, metadata)
    manifest["config"] = run[0][1]["config"]
    manifest["skipped_examples"] = [m for _, task in run for m in task.get("skipped_examples", [])][:SKIPPED_EXAMPLES]
    manifest["commands"] = [{"task_index": t["task_index"], **t["command"]} if t.get("command") else None
                            for _, t in sorted(run, key=lambda item: item[1]["task_index"])]
    manifest["history"] = in_place_history(out, manifest["config"], cfg_hash)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def in_place_history(out: Path, config: dict, cfg_hash: str) -> list[dict]:
    """The earlier steps that wrote these shards' rows, for a run that replaced its source's shards in place
    (add-model --in-place): the source manifest's history and its own step. [] for a run with its own output."""
    previous = Path(out) / MANIFEST_NAME
    if not config.get("in_place") or not previous.exists():
        return []
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # a damaged manifest is replaced by this one
        return []
    if not isinstance(old, dict):
        return []
    history = list(old.get("history", []))
    own = cfg_hash in {v for k, v in old.get("metadata", {}).items() if k.endswith("config_hash")}  # this step's own manifest (a rerun)
    return history if own else history + [run_step(old)]


def finalize_folder(out: str | Path) -> dict:
    """`tokenprio finalize`: `finalize` while holding the lock of every task of the newest run, so that no task
    (a resubmitted one, say) is still writing shards or its manifest. Refuses, naming the holder, when one is."""
    out = Path(out)
    newest = max(out.glob("_manifest.task-*.json"), key=lambda p: p.stat().st_mtime_ns, default=None) if out.is_dir() else None
    task = parse_json(newest.read_bytes(), f"{newest}: the task manifest", "rerun that task (complete shards are skipped)") if newest else {}
    try:
        num_tasks = int(task.get("num_tasks", 0)) if isinstance(task, dict) else -1
    except (TypeError, ValueError):
        num_tasks = -1
    if num_tasks < 0:
        raise ShardError(f"{newest}: not a task manifest (no num_tasks); rerun that task (complete shards are skipped).")
    with ExitStack() as locks:
        for task_index in range(num_tasks):
            locks.enter_context(hold_lock(task_lock_path(out, task_index), "tokenprio finalize", f"{out} (task {task_index} of {num_tasks})"))
        return finalize(out)


def run_metadata(out: Path, entries: list[dict], fallback: dict) -> dict:
    """A run's metadata as its shards carry it (model info included), less the per-shard facts; `fallback` when it wrote none."""
    metadata = read_metadata(Path(out) / entries[0]["file"]) if entries else dict(fallback)
    metadata.pop("shard", None)
    return metadata


def summary_line(manifest: dict, out: Path) -> str:
    """One line about a finished shard folder, printed by the commands that write one."""
    totals = manifest["totals"]
    return (
        f"wrote {out}: {len(manifest['shards'])} shards, {totals['records']} records ({totals['skipped_records']} skipped), "
        f"{totals['rows']} rows, {totals['tokens']} tokens, {totals['targets']} targets, {totals['truncated_tokens']} tokens truncated"
    )
