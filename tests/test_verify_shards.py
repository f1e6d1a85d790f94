"""Verified shards: every reader checks each shard's size and sha256 against the manifest before it reads it.

A byte flipped in a shard's data pages, its Parquet footer or its `tokenprio` metadata, and a Parquet file the
manifest does not list, are refused by train, reweight, inspect, add-model, project and write_shards with the
file's name, the expected and found digest and the command that rescores it.

Run: pytest tests/test_verify_shards.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.add_model import AddModelConfig, add_model
from pipelines.inspect_shards import InspectConfig, inspect_shards
from pipelines.project import ProjectConfig, project_shards
from pipelines.reweight import ReweightConfig, reweight
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
from scoring.frames import write_shards
from scoring.shards import MANIFEST_NAME, ShardError, manifest_checksum, open_shards, sha256_file, verify_shards
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TOKENPRIO = str(Path(sys.executable).with_name("tokenprio"))

RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog.", "spans": [{"start": 4, "end": 9, "label": "toxic"}]},
    {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you!"}]},
    {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    {"text": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."},
    {"text": "To be, or not to be, that is the question."},
    {"text": "Weng earns $12 an hour for babysitting."},
]


def write_corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, model_dir) -> Path:
    """A scored folder of two shards (3 records each), written once for the module."""
    work = tmp_path_factory.mktemp("verify")
    out = work / "shards"
    score(ScoreConfig(inputs=(str(write_corpus(work / "corpus.jsonl")),), out=str(out), scorer=ScorerConfig(model=str(model_dir), batch_tokens=64),
                      max_length=24, n_context=4, records_per_shard=3))
    return out


def flip_offset(path: Path, where: str) -> int:
    """A byte offset inside the data pages of `input_ids`, inside the Parquet footer, or inside the `tokenprio` metadata JSON."""
    data = path.read_bytes()
    if where == "data page":
        meta = pq.ParquetFile(path).metadata
        leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == "input_ids")
        column = meta.row_group(0).column(leaf)
        return column.data_page_offset + column.total_compressed_size // 2
    if where == "footer":
        footer_length = int.from_bytes(data[-8:-4], "little")
        return len(data) - 8 - footer_length + 5  # the start of the thrift FileMetaData
    return data.index(b'"schema_version"') + 3  # the JSON of the tokenprio key-value entry (plain text in the footer)


def corrupted_copy(pristine: Path, tmp_path: Path, where: str) -> tuple[Path, Path, str]:
    """A copy of the folder with one byte of part-00001 flipped; returns (folder, shard, the manifest's sha256 of it)."""
    folder = tmp_path / "shards"
    shutil.copytree(pristine, folder)
    shard = folder / "part-00001.parquet"
    offset = flip_offset(shard, where)
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    expected = next(s["sha256"] for s in json.loads((folder / MANIFEST_NAME).read_text())["shards"] if s["file"] == shard.name)
    return folder, shard, expected


def run_reader(reader: str, folder: Path, tmp_path: Path, model_dir: Path, base_model_dir: Path, tokenizer_dir: Path, pristine: Path):
    if reader == "train":  # the reference is a valid student here (same tokenizer); refused before it loads
        return train(TrainConfig(shards=folder, model=model_dir, out=tmp_path / "run", batch_tokens=64, steps=1))
    if reader == "reweight":
        return reweight(ReweightConfig(shards=str(folder), priority="uniform", out=str(tmp_path / "reweighted")))
    if reader == "inspect":
        return inspect_shards(InspectConfig(shards=folder))
    if reader == "add-model":
        return add_model(AddModelConfig(shards=str(folder), scorer=ScorerConfig(model=str(base_model_dir)), prefix="base", out=str(tmp_path / "both")))
    if reader == "add-model --in-place":
        return add_model(AddModelConfig(shards=str(folder), scorer=ScorerConfig(model=str(base_model_dir)), prefix="base", in_place=True))
    if reader == "project":
        return project_shards(ProjectConfig(shards=str(folder), tokenizer=str(tokenizer_dir), out=str(tmp_path / "projected")))
    if reader == "write_shards":
        return write_shards(pd.read_parquet(pristine), like=folder, out=tmp_path / "edited")
    raise AssertionError(reader)


READERS = ["train", "reweight", "inspect", "add-model", "add-model --in-place", "project", "write_shards"]
OUTPUTS = ["run", "reweighted", "both", "projected", "edited"]


@pytest.mark.parametrize("where", ["data page", "footer", "metadata"])
@pytest.mark.parametrize("reader", READERS)
def test_a_flipped_byte_is_refused_by_every_reader(pristine, tmp_path, model_dir, base_model_dir, tokenizer_dir, reader, where):
    folder, shard, expected = corrupted_copy(pristine, tmp_path, where)
    found = sha256_file(shard)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ShardError) as refused:
        run_reader(reader, folder, tmp_path, model_dir, base_model_dir, tokenizer_dir, pristine)
    message = str(refused.value)
    assert f"{shard}: sha256 {found}, expected {expected}" in message
    assert f"{shard.stat().st_size} bytes (expected {shard.stat().st_size})" in message  # a flip keeps the size
    assert "rescore it" in message and "part-00000" not in message  # only the damaged shard is named
    # nothing was rewritten in the source (an in-place add-model's lock file stays until its process exits)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".lock.")} == before
    assert not any((tmp_path / name).exists() for name in OUTPUTS)  # and nothing written elsewhere


@pytest.mark.parametrize("reader", READERS)
def test_an_unlisted_shard_is_refused_by_every_reader(pristine, tmp_path, model_dir, base_model_dir, tokenizer_dir, reader):
    folder = tmp_path / "shards"
    shutil.copytree(pristine, folder)
    shutil.copy(folder / "part-00000.parquet", folder / "part-00002.parquet")  # added by hand: pandas would read it twice
    with pytest.raises(ShardError, match=r"part-00002\.parquet: not listed in .*_manifest\.json"):
        run_reader(reader, folder, tmp_path, model_dir, base_model_dir, tokenizer_dir, pristine)
    assert not any((tmp_path / name).exists() for name in OUTPUTS)


def test_a_truncated_shard_names_both_sizes(pristine, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(pristine, folder)
    shard = folder / "part-00000.parquet"
    size = shard.stat().st_size
    os.truncate(shard, size - 100)  # an interrupted copy
    with pytest.raises(ShardError, match=rf"part-00000\.parquet: sha256 [0-9a-f]{{64}}, expected [0-9a-f]{{64}}; {size - 100} bytes \(expected {size}\)"):
        open_shards(folder)


def test_a_manifest_edited_or_damaged_is_refused(pristine, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(pristine, folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # an entry edited to match some other file: the manifest's checksum catches it
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"_manifest\.json: its checksum [0-9a-f]+ does not match its shard entries"):
        open_shards(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest)[:-20])
    with pytest.raises(ShardError, match=r"_manifest\.json: the manifest is not valid JSON \(Unterminated string.*tokenprio finalize"):
        open_shards(folder)


def test_a_shard_with_a_recorded_size_from_an_older_manifest_still_verifies(pristine, tmp_path):
    """Manifests written before `bytes` was recorded verify by the hash alone."""
    folder = tmp_path / "shards"
    shutil.copytree(pristine, folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        del entry["bytes"]
    manifest["checksum"] = manifest_checksum(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert len(open_shards(folder).paths) == 2
    data = bytearray((folder / "part-00001.parquet").read_bytes())
    data[100] ^= 0x80
    (folder / "part-00001.parquet").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"part-00001\.parquet: sha256 [0-9a-f]{64}, expected [0-9a-f]{64}; \d+ bytes;"):
        open_shards(folder)


def test_a_rerun_refuses_a_complete_shard_damaged_since_it_was_written(pristine, tmp_path, model_dir):
    """A rerun of score must not re-bless a damaged shard by recording its new checksum; removing it rescores it."""
    folder, shard, _ = corrupted_copy(pristine, tmp_path, "data page")
    cfg = ScoreConfig(inputs=(str(pristine.parent / "corpus.jsonl"),), out=str(folder), scorer=ScorerConfig(model=str(model_dir), batch_tokens=64),
                      max_length=24, n_context=4, records_per_shard=3)
    with pytest.raises(ShardError, match=rf"{re.escape(str(shard))}: sha256 .* changed since\. Remove it"):
        score(cfg)
    shard.unlink()
    score(cfg)
    assert (folder / "part-00001.parquet").read_bytes() == (pristine / "part-00001.parquet").read_bytes()
    assert json.loads((folder / MANIFEST_NAME).read_text())["checksum"] == json.loads((pristine / MANIFEST_NAME).read_text())["checksum"]


def test_verification_streams_the_file(tmp_path):
    """Memory does not grow with the shard: the hash reads 1 MiB blocks."""
    import numpy as np
    import pyarrow as pa

    from scoring.shards import build_manifest, write_json_atomic, write_shard_file

    n_rows, length = 12000, 512  # 6.1M random ids: ~13 MB of shard
    ids = np.random.default_rng(0).integers(0, 50_000, n_rows * length).astype(np.int32)
    table = pa.table({"n_tokens": pa.array(np.full(n_rows, length, np.int32)), "n_targets": pa.array(np.zeros(n_rows, np.int32)),
                      "input_ids": pa.ListArray.from_arrays(pa.array(np.arange(0, n_rows * length + 1, length, dtype=np.int32)), pa.array(ids))})
    entry = write_shard_file(table.replace_schema_metadata({b"tokenprio": b'{"schema_version": "1.1"}'}), tmp_path, 0)
    write_json_atomic(tmp_path / MANIFEST_NAME, build_manifest([entry], {}))
    assert entry["bytes"] > 10 * 2**20
    tracemalloc.start()
    verify_shards(tmp_path, json.loads((tmp_path / MANIFEST_NAME).read_text()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20, peak


# ---- the printed fix is the command that repairs the folder ----------------------------------------


def cli_env() -> dict:
    """This worktree's code, and the console script on PATH (as in a user's shell)."""
    return os.environ | {"PYTHONPATH": str(ROOT), "PATH": f"{Path(TOKENPRIO).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def tokenprio(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TOKENPRIO, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)


def printed_fix(message: str) -> str:
    """The shell command between backticks after 'rescore it: '."""
    found = re.search(r"rescore it: `([^`]+)`", message)
    assert found, message
    return found.group(1)


def shard_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


@pytest.mark.slow
def test_the_printed_fix_restores_the_shard_exactly(tmp_path, model_dir, base_model_dir):
    """score, then add-model --in-place, from the command line: a damaged shard's message prints the commands
    (score's, then add-model's) that rebuild it; running them restores the same bytes and manifest checksum."""
    write_corpus(tmp_path / "corpus.jsonl")
    steps = [["score", "corpus.jsonl", "--model", str(model_dir), "--out", "shards", "--max-length", "24", "--context", "4",
              "--records-per-shard", "3"],
             ["add-model", "shards", "--model", str(base_model_dir), "--prefix", "base", "--in-place"]]
    for step in steps:
        done = tokenprio(*step, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        folder = tmp_path / "shards"
        good, checksum = shard_bytes(folder), json.loads((folder / MANIFEST_NAME).read_text())["checksum"]
        data = bytearray((folder / "part-00001.parquet").read_bytes())
        data[len(data) // 3] ^= 0x10
        (folder / "part-00001.parquet").write_bytes(bytes(data))
        refused = tokenprio("inspect", "shards", cwd=tmp_path)
        assert refused.returncode == 1 and "part-00001.parquet: sha256" in refused.stderr
        fix = printed_fix(refused.stderr)
        assert fix.startswith("rm shards/part-00001.parquet && tokenprio score corpus.jsonl") and fix.count("tokenprio ") == len(steps[: steps.index(step) + 1])
        repaired = subprocess.run(fix, shell=True, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert repaired.returncode == 0, repaired.stderr
        assert shard_bytes(folder) == good and json.loads((folder / MANIFEST_NAME).read_text())["checksum"] == checksum
        assert tokenprio("inspect", "shards", cwd=tmp_path).returncode == 0


def test_the_fix_names_the_task_that_owns_the_shard_and_finalize(tmp_path, tokenizer_dir, monkeypatch):
    """With --num-tasks 2, shard 1 belongs to task 1: its command, then `tokenprio finalize` (recorded from the CLI's argv)."""
    write_corpus(tmp_path / "corpus.jsonl")
    folder = tmp_path / "split"
    monkeypatch.chdir(tmp_path)
    for task in range(2):
        argv = ["tokenprio", "score", "corpus.jsonl", "--tokenizer", str(tokenizer_dir), "--out", "split", "--records-per-shard", "3",
                "--num-tasks", "2", "--task-index", str(task)]
        monkeypatch.setattr(sys, "argv", argv)
        score(ScoreConfig(inputs=("corpus.jsonl",), out="split", tokenizer=str(tokenizer_dir), records_per_shard=3, num_tasks=2, task_index=task))
    monkeypatch.setattr(sys, "argv", ["tokenprio", "finalize", "split"])
    from scoring.shards import finalize_folder

    finalize_folder(folder)
    data = bytearray((folder / "part-00001.parquet").read_bytes())
    data[50] ^= 0x04
    (folder / "part-00001.parquet").write_bytes(bytes(data))
    with pytest.raises(ShardError) as refused:
        open_shards("split")
    assert printed_fix(str(refused.value)) == (
        f"rm split/part-00001.parquet && tokenprio score corpus.jsonl --tokenizer {tokenizer_dir} --out split --records-per-shard 3 "
        f"--num-tasks 2 --task-index 1 && tokenprio finalize {folder.resolve()}")
    monkeypatch.setattr(sys, "argv", ["tokenprio", "reweight", "split", "--priority", "uniform", "--out", "new"])
    (folder / "part-00001.parquet").write_bytes(bytes(data[:50] + bytes([data[50] ^ 0x04]) + data[51:]))  # repaired
    reweight(ReweightConfig(shards="split", priority="uniform", out="new"))
    (tmp_path / "new" / "part-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(ShardError, match=r"rewrite the folder: `rm -r new && tokenprio reweight split --priority uniform --out new`"):
        open_shards("new")
