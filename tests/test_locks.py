"""One writer per output: a second `score` (or `finalize`, `add-model`, `train`, `reweight`, `project`) on an output folder and task that
another live process is writing is refused with the holder's pid and host; a lock file left by a killed process
never blocks; temporary names are unique per writer.

Every second process is a real one; every wait is bounded.

Run: pytest tests/test_locks.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.add_model import AddModelConfig, add_model
from pipelines.project import ProjectConfig, project_shards
from pipelines.reweight import ReweightConfig, reweight
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
from scoring.shards import MANIFEST_NAME, OutputBusyError, finalize_folder, open_shards, task_lock_path, write_shard_file
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TOKENPRIO = str(Path(sys.executable).with_name("tokenprio"))
WAIT_S = 120  # the bound on every wait for another process
RECORDS = [{"text": f"Record {i}: the quick brown fox jumps over the lazy dog."} for i in range(6)]


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT)}


HOLDER = """
import sys, time
from pathlib import Path
from scoring.shards import hold_lock
hold_lock(Path(sys.argv[1]), sys.argv[2], "test")
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def start_holder(lock: Path, command: str, seconds: float = WAIT_S) -> subprocess.Popen:
    """A live process holding `lock` (until killed, at most `seconds`); returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), command, str(seconds)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + WAIT_S
    while holder.poll() is None and time.monotonic() < deadline:
        if holder.stdout.readline().strip() == "held":
            return holder
    holder.kill()
    raise AssertionError(f"the holder of {lock} did not start")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=WAIT_S)


def unscored(corpus: Path, out: Path, tokenizer_dir: Path, **overrides) -> ScoreConfig:
    return ScoreConfig(**{"inputs": (str(corpus),), "out": str(out), "tokenizer": str(tokenizer_dir), "max_length": 24, "n_context": 4,
                          "records_per_shard": 2} | overrides)


def test_a_second_score_of_the_same_task_is_refused(corpus, tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    holder = start_holder(task_lock_path(out, 0), "tokenprio score")
    try:
        with pytest.raises(OutputBusyError) as refused:
            score(unscored(corpus, out, tokenizer_dir))
        message = str(refused.value)
        assert f"tokenprio score (pid {holder.pid} on {socket.gethostname()}, since " in message
        assert f"{out} (task 0 of 1)" in message and f"kill {holder.pid}" in message
        assert not list(out.glob("part-*"))  # refused before it wrote anything
        score(unscored(corpus, out, tokenizer_dir, num_tasks=2, task_index=1))  # another task of the folder is free
    finally:
        stop(holder)
    score(unscored(corpus, out, tokenizer_dir, num_tasks=2, task_index=0))
    finalize_folder(out)
    assert len(open_shards(out).paths) == 3 and not list(out.glob(".lock*"))


def test_finalize_waits_for_no_task_but_refuses_a_running_one(corpus, tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    score(unscored(corpus, out, tokenizer_dir, num_tasks=2, task_index=0))
    score(unscored(corpus, out, tokenizer_dir, num_tasks=2, task_index=1))
    holder = start_holder(task_lock_path(out, 1), "tokenprio score")  # task 1 resubmitted, still running
    try:
        with pytest.raises(OutputBusyError, match=rf"{out} \(task 1 of 2\): tokenprio score \(pid {holder.pid} "):
            finalize_folder(out)
        assert not (out / MANIFEST_NAME).exists()
    finally:
        stop(holder)
    finalize_folder(out)
    assert (out / MANIFEST_NAME).exists()


def test_a_second_add_model_is_refused(corpus, tmp_path, model_dir, base_model_dir):
    source, out = tmp_path / "source", tmp_path / "both"
    score(ScoreConfig(inputs=(str(corpus),), out=str(source), scorer=ScorerConfig(model=str(model_dir), batch_tokens=64), max_length=24,
                      n_context=4, records_per_shard=2))
    cfg = AddModelConfig(shards=str(source), scorer=ScorerConfig(model=str(base_model_dir), batch_tokens=64), prefix="base", out=str(out))
    holder = start_holder(task_lock_path(out, 0), "tokenprio add-model")
    try:
        with pytest.raises(OutputBusyError, match=rf"tokenprio add-model \(pid {holder.pid} on "):
            add_model(cfg)
    finally:
        stop(holder)
    add_model(cfg)
    assert {"base_logprob", "base_entropy"} <= set(open_shards(out).spec_columns)


def test_a_second_training_run_in_the_same_folder_is_refused(tmp_path, tokenizer, model_dir):
    from train_shards import write_shards

    shards = write_shards(tmp_path / "shards", tokenizer, n_rows=12, n_shards=1)
    run = tmp_path / "run"
    holder = start_holder(run / ".lock.train", "tokenprio train")
    try:
        with pytest.raises(OutputBusyError, match=rf"run folder {run}: tokenprio train \(pid {holder.pid} on "):
            train(TrainConfig(shards=shards, model=model_dir, out=run, batch_tokens=64, steps=1))
        assert not list(run.glob("checkpoint-*")) and not (run / "config.json").exists()
    finally:
        stop(holder)
    final = train(TrainConfig(shards=shards, model=model_dir, out=run, batch_tokens=64, steps=1))
    assert final.name == "checkpoint-000001" and not (run / ".lock.train").exists()


def test_a_run_that_saved_while_this_one_was_loading_is_not_overwritten(tmp_path, tokenizer, model_dir, monkeypatch):
    """train reads its run folder before loading the student and again under the lock; a checkpoint that appeared in
    between (another train that held the lock meanwhile) is refused, not trained over."""
    import training.train as train_module
    from train_shards import write_shards

    shards = write_shards(tmp_path / "shards", tokenizer, n_rows=12, n_shards=1)
    run = tmp_path / "run"
    cfg = TrainConfig(shards=shards, model=model_dir, out=run, batch_tokens=64, steps=1)
    other = train(TrainConfig(shards=shards, model=model_dir, out=tmp_path / "other", batch_tokens=64, steps=1))
    real_check_inputs = train_module.check_inputs

    def check_inputs_while_another_run_saves(*args, **kwargs):
        inputs = real_check_inputs(*args, **kwargs)
        (run / other.name).parent.mkdir(parents=True, exist_ok=True)
        os.rename(other, run / other.name)  # the other run's checkpoint lands here while this one loads its student
        return inputs

    monkeypatch.setattr(train_module, "check_inputs", check_inputs_while_another_run_saves)
    with pytest.raises(ValueError, match=rf"{run}: another process changed it while this run was starting \(latest checkpoint now checkpoint-000001\)"):
        train(cfg)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000001"]  # nothing of this run was written


def test_a_second_reweight_is_refused_and_a_finished_one_is_never_overwritten(corpus, tmp_path, tokenizer_dir):
    source, out = tmp_path / "source", tmp_path / "reweighted"
    score(unscored(corpus, source, tokenizer_dir))
    cfg = ReweightConfig(shards=str(source), priority="uniform", out=str(out))
    holder = start_holder(out / ".lock.reweight", "tokenprio reweight")
    try:
        with pytest.raises(OutputBusyError, match=rf"--out {out}: tokenprio reweight \(pid {holder.pid} on "):
            reweight(cfg)
        assert not list(out.glob("part-*"))
    finally:
        stop(holder)
    manifest = reweight(cfg)
    with pytest.raises(ValueError, match="already holds a shard set"):  # checked under the lock
        reweight(ReweightConfig(shards=str(source), priority="0.5", out=str(out)))
    assert open_shards(out).manifest["checksum"] == manifest["checksum"] and not (out / ".lock.reweight").exists()


def test_a_second_project_is_refused(corpus, tmp_path, tokenizer_dir):
    source, out = tmp_path / "source", tmp_path / "projected"
    score(unscored(corpus, source, tokenizer_dir))
    cfg = ProjectConfig(shards=str(source), tokenizer=str(tokenizer_dir), out=str(out), max_length=24, n_context=4)
    lock = tmp_path / ".projected.lock.project"
    holder = start_holder(lock, "tokenprio project")
    try:
        with pytest.raises(OutputBusyError, match=rf"--out {out}: tokenprio project \(pid {holder.pid} on "):
            project_shards(cfg)
        assert not out.exists() and not (tmp_path / ".projected.project-tmp").exists()
    finally:
        stop(holder)
    project_shards(cfg)
    assert len(open_shards(out).paths) == 3 and not lock.exists()


def test_a_lock_left_by_a_killed_process_does_not_block(corpus, tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    lock = task_lock_path(out, 0)
    holder = start_holder(lock, "tokenprio score")
    stop(holder)  # SIGKILL: no release, the lock file and its record stay
    assert json.loads(lock.read_text())["pid"] == holder.pid
    score(unscored(corpus, out, tokenizer_dir))
    assert len(open_shards(out).paths) == 3 and not lock.exists()


def test_a_failed_call_does_not_lock_out_a_retry_in_the_same_process(corpus, tmp_path, tokenizer_dir):
    """An exception keeps the failed call's frame (and its lock) alive; the retry in the same process takes the lock over."""
    out = tmp_path / "out"
    score(unscored(corpus, out, tokenizer_dir))
    with pytest.raises(ValueError, match="--overwrite"):
        score(unscored(corpus, out, tokenizer_dir, max_length=32))  # another configuration: refused after it took the lock
    score(unscored(corpus, out, tokenizer_dir, max_length=32, overwrite=True))


CONTENDER = """
import sys, time
from pathlib import Path
from scoring.shards import OutputBusyError, hold_lock
lock_path, log, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
done, deadline = 0, time.monotonic() + 100
while done < rounds and time.monotonic() < deadline:
    try:
        lock = hold_lock(lock_path, "contender", "test")
    except OutputBusyError:
        continue
    with open(log, "a") as f:
        f.write(f"+{sys.argv[4]}\\n"); f.flush(); time.sleep(0.001); f.write(f"-{sys.argv[4]}\\n")
    lock.release()
    done += 1
sys.exit(0 if done == rounds else 1)
"""


def test_holders_never_overlap_while_the_lock_file_is_removed_and_recreated(tmp_path):
    """Two processes take and release one lock 100 times each (release removes the file): the log of who holds it never interleaves."""
    lock, log = tmp_path / ".lock.task-0", tmp_path / "log"
    processes = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(lock), str(log), "100", name], cwd=ROOT, env=env()) for name in "ab"]
    assert [p.wait(timeout=WAIT_S) for p in processes] == [0, 0]
    lines = log.read_text().split()
    assert len(lines) == 400 and all(lines[i][0] == "+" and lines[i + 1] == "-" + lines[i][1:] for i in range(0, 400, 2))


def test_temporary_names_are_unique_per_writer_and_a_dead_writers_are_removed(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / ".part-00000.parquet.4242.tmp").write_bytes(b"PAR1 half of a shard by a writer that was killed")
    table = pa.table({"n_tokens": pa.array([2], pa.int32()), "n_targets": pa.array([1], pa.int32())})
    seen = []
    real = pq.ParquetWriter.__init__

    def init(self, where, *args, **kwargs):
        seen.append(Path(where).name)
        real(self, where, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "__init__", init)
    write_shard_file(table.replace_schema_metadata({b"tokenprio": b'{"schema_version": "1.1"}'}), tmp_path, 0)
    assert seen == [f".part-00000.parquet.{os.getpid()}.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]


# ---- real processes from the command line ----------------------------------------------------------

PAUSED_SCORE = """
import sys, time
from pathlib import Path
import pipelines.score as score_module
from pipelines.score import ScoreConfig, score
real = score_module.write_shard_file
def paused(table, out_dir, index):
    if index == 1:  # hold the task mid-run, with a complete shard written, until the test says go
        print("paused", flush=True)
        deadline = time.monotonic() + 120
        while not Path(sys.argv[4]).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return real(table, out_dir, index)
score_module.write_shard_file = paused
score(ScoreConfig(inputs=(sys.argv[1],), out=sys.argv[2], tokenizer=sys.argv[3], max_length=24, n_context=4, records_per_shard=2))
"""


@pytest.mark.slow
def test_two_score_processes_on_one_folder(corpus, tmp_path, tokenizer_dir):
    """The issue's report: a second `tokenprio score` on a folder being scored. It is refused (exit 1, the first's pid),
    and the first finishes with the shards and manifest of a run alone."""
    out, go, reference = tmp_path / "out", tmp_path / "go", tmp_path / "reference"
    score(unscored(corpus, reference, tokenizer_dir))
    first = subprocess.Popen([sys.executable, "-c", PAUSED_SCORE, str(corpus), str(out), str(tokenizer_dir), str(go)], cwd=ROOT, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while first.poll() is None and time.monotonic() < deadline and first.stdout.readline().strip() != "paused":
            pass
        assert first.poll() is None and (out / "part-00000.parquet").exists()
        second = subprocess.run([TOKENPRIO, "score", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--max-length", "24",
                                 "--context", "4", "--records-per-shard", "2"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=WAIT_S)
        assert second.returncode == 1
        assert f"error: {out} (task 0 of 1): tokenprio score (pid {first.pid} on {socket.gethostname()}" in second.stderr
        go.touch()
        assert first.wait(timeout=WAIT_S) == 0
    finally:
        stop(first)
    shards = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert shards == {p.name: p.read_bytes() for p in reference.glob("part-*.parquet")}
    assert json.loads((out / MANIFEST_NAME).read_text())["checksum"] == json.loads((reference / MANIFEST_NAME).read_text())["checksum"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
