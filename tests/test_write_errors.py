"""Full disks and write errors: an OSError while writing a shard, a task manifest, the final manifest or a report
stops with a WriteError naming the path and the cause; nothing partial is left; earlier complete files stay
intact; a rerun after the disk is fixed ends with the bytes and manifest checksum of an uninterrupted run.

Errors are injected where the bytes go (ParquetWriter.write_table, the text file write, os.replace), and once for
real: a process whose file-size limit (RLIMIT_FSIZE) makes the kernel refuse the shard's bytes (EFBIG).

Run: pytest tests/test_write_errors.py
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import pipelines.evaluate as evaluate_module
from pipelines.cli import app
from pipelines.evaluate import EvalConfig, evaluate
from pipelines.inspect_shards import InspectConfig, inspect_shards
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
from scoring.shards import MANIFEST_NAME, WriteError, open_shards

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    {"text": "To be, or not to be, that is the question."},
    {"text": "Natalia sold clips to 48 of her friends in April."},
    {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you!"}]},
    {"text": "Weng earns $12 an hour for babysitting."},
]


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def config(corpus: Path, out: Path, model_dir: Path) -> ScoreConfig:
    return ScoreConfig(inputs=(str(corpus),), out=str(out), scorer=ScorerConfig(model=str(model_dir), batch_tokens=64), max_length=24,
                       n_context=4, records_per_shard=2)


def result(folder: Path) -> tuple[dict, str]:
    """The shards' bytes and the manifest checksum: what a rerun must reproduce."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}, json.loads((folder / MANIFEST_NAME).read_text())["checksum"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp"))


def failing(error_number: int):
    return OSError(error_number, os.strerror(error_number))


@pytest.fixture()
def reference(corpus, tmp_path, model_dir) -> tuple[dict, str]:
    out = tmp_path / "reference"
    score(config(corpus, out, model_dir))
    return result(out)


def test_enospc_while_writing_a_shard(corpus, tmp_path, model_dir, reference, monkeypatch):
    out = tmp_path / "out"
    real_write = pq.ParquetWriter.write_table

    def write_table(self, table, *args, **kwargs):
        if Path(self.where).name.startswith(".part-00001.parquet."):  # the second shard: half its row groups, then a full disk
            raise failing(errno.ENOSPC)
        return real_write(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    with pytest.raises(WriteError, match=rf"cannot write {out}/part-00001\.parquet: No space left on device \(ENOSPC\)\. Nothing partial was left") as refused:
        score(config(corpus, out, model_dir))
    assert refused.value.errno == errno.ENOSPC and isinstance(refused.value, OSError)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == ["part-00000.parquet"] and leftovers(out) == []
    first = (out / "part-00000.parquet").read_bytes()
    assert first == reference[0]["part-00000.parquet"]
    monkeypatch.undo()  # space is freed
    score(config(corpus, out, model_dir))
    assert result(out) == reference and (out / "part-00000.parquet").read_bytes() == first and leftovers(out) == []


def test_eio_while_writing_the_task_manifest(corpus, tmp_path, model_dir, reference, monkeypatch):
    out = tmp_path / "out"
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith("._manifest.task-0.json."):
            raise failing(errno.EIO)
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    with pytest.raises(WriteError, match=r"cannot write .*_manifest\.task-0\.json: Input/output error \(EIO\).*check the disk"):
        score(config(corpus, out, model_dir))
    assert not (out / "_manifest.task-0.json").exists() and not (out / MANIFEST_NAME).exists() and leftovers(out) == []
    assert {p.name for p in out.glob("part-*.parquet")} == set(reference[0])  # every shard is complete and kept
    monkeypatch.undo()
    score(config(corpus, out, model_dir))
    assert result(out) == reference and leftovers(out) == []


def test_enospc_at_the_rename_of_the_final_manifest(corpus, tmp_path, model_dir, reference, monkeypatch):
    out = tmp_path / "out"
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == MANIFEST_NAME:
            raise failing(errno.ENOSPC)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match=rf"cannot write {out}/_manifest\.json: No space left on device"):
        score(config(corpus, out, model_dir))
    assert not (out / MANIFEST_NAME).exists() and (out / "_manifest.task-0.json").exists() and leftovers(out) == []
    monkeypatch.undo()
    score(config(corpus, out, model_dir))
    assert result(out) == reference and leftovers(out) == []


def test_an_existing_manifest_survives_a_failed_rewrite(corpus, tmp_path, model_dir, monkeypatch):
    """The old `_manifest.json` stays byte for byte when its replacement cannot be written (a rerun on a full disk)."""
    out = tmp_path / "out"
    score(config(corpus, out, model_dir))
    before = (out / MANIFEST_NAME).read_bytes()
    real = pathlib.Path.write_bytes
    monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(failing(errno.ENOSPC))
                        if self.name.startswith(f".{MANIFEST_NAME}.") else real(self, data))
    with pytest.raises(WriteError, match="_manifest.json: No space left"):
        score(config(corpus, out, model_dir))
    assert (out / MANIFEST_NAME).read_bytes() == before and leftovers(out) == [] and len(open_shards(out).paths) == 3


# ---- reports -----------------------------------------------------------------------------------


@pytest.fixture()
def shards(corpus, tmp_path, model_dir) -> Path:
    out = tmp_path / "shards"
    score(config(corpus, out, model_dir))
    return out


def test_report_write_errors_keep_the_previous_report(shards, tmp_path, monkeypatch):
    reports = tmp_path / "reports"
    reports.mkdir()
    html, png = reports / "phi.html", reports / "phi.png"
    inspect_shards(InspectConfig(shards=shards, html=html, png=png))
    old_html, old_png = html.read_bytes(), png.read_bytes()
    real_write, real_replace = pathlib.Path.write_bytes, os.replace
    monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(failing(errno.ENOSPC))
                        if self.name.startswith(".phi.html.") else real_write(self, data))
    with pytest.raises(WriteError, match=rf"cannot write {html}: No space left on device"):
        inspect_shards(InspectConfig(shards=shards, html=html))
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(failing(errno.EACCES)) if Path(dst) == png else real_replace(src, dst))
    with pytest.raises(WriteError, match=rf"cannot write {png}: Permission denied \(EACCES\).*make the folder writable"):
        inspect_shards(InspectConfig(shards=shards, png=png))
    assert html.read_bytes() == old_html and png.read_bytes() == old_png and leftovers(reports) == []


def test_the_cli_prints_a_write_error_as_one_line(shards, tmp_path, monkeypatch):
    real = pathlib.Path.write_bytes
    monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(failing(errno.ENOSPC))
                        if self.name.startswith(".phi.html.") else real(self, data))
    run = CliRunner().invoke(app, ["inspect", str(shards), "--html", str(tmp_path / "phi.html")])
    last = run.output.strip().splitlines()[-1]  # after the progress bar
    assert run.exit_code == 1 and last.startswith(f"error: cannot write {tmp_path / 'phi.html'}: No space left on device") and "Traceback" not in run.output
    assert not (tmp_path / "phi.html").exists() and leftovers(tmp_path) == []


def test_eval_json_write_error(tmp_path, model_dir, monkeypatch):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"prompt": "def add(a, b):\n", "completion": "    return a + b\n#### 3", "answer": "3"}) + "\n")
    monkeypatch.setattr(evaluate_module, "generate_batch", lambda model, prompts, n, stop, pad: [([5, 6], True)] * len(prompts))
    real = pathlib.Path.write_bytes
    monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(failing(errno.EDQUOT))
                        if self.name.startswith(".eval.json.") else real(self, data))
    out = tmp_path / "eval"
    with pytest.raises(WriteError, match=rf"cannot write {out}/eval\.json: Disk quota exceeded \(EDQUOT\).*free space"):
        evaluate(EvalConfig(checkpoint=model_dir, records=records, out_dir=out))
    assert not (out / "eval.json").exists() and leftovers(out) == []
    monkeypatch.setattr(pathlib.Path, "write_bytes", real)
    evaluate(EvalConfig(checkpoint=model_dir, records=records, out_dir=out))
    assert json.loads((out / "eval.json").read_text())["metrics"]["n_records"] == 1


# ---- a real refusal by the kernel --------------------------------------------------------------

LIMITED_SCORE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then answers a write past the limit with EFBIG instead of a signal
limit = int(sys.argv[4])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pipelines.score import ScoreConfig, score
from scoring.shards import WriteError
try:
    score(ScoreConfig(inputs=(sys.argv[1],), out=sys.argv[2], tokenizer=sys.argv[3], max_length=24, n_context=4, records_per_shard=2))
except WriteError as error:
    print(error)
    sys.exit(3)
"""


@pytest.mark.slow
def test_a_file_size_limit_refused_by_the_kernel(corpus, tmp_path, tokenizer_dir):
    def run(out: Path, limit: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LIMITED_SCORE, str(corpus), str(out), str(tokenizer_dir), str(limit)], cwd=ROOT,
                              env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)

    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run(reference, 0).returncode == 0
    limit = min(p.stat().st_size for p in reference.glob("part-*.parquet")) // 2  # every shard is larger; the lock file is not
    refused = run(out, limit)
    assert refused.returncode == 3, refused.stderr
    assert f"cannot write {out}/part-00000.parquet: " in refused.stdout and "(EFBIG)" in refused.stdout
    assert not list(out.glob("part-*")) and leftovers(out) == []
    assert run(out, 0).returncode == 0
    assert result(out) == result(reference) and leftovers(out) == []
