"""`--engine ray`: Ray Data actors score the same shard plan as the local loop, with the same bytes.

Run: pytest tests/test_ray_engine.py   (the Ray tests are slow: a local cluster, ray.init(num_cpus=2))

The local reference runs with one torch thread, as each Ray actor does (--worker-cpus 1), so CPU results
are bit for bit the same. Every run is bounded in time and the cluster is always shut down.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipelines.add_model import AddModelConfig, add_model
from pipelines.cli import app
from pipelines.engines import EngineConfig, validate_engine
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
from scoring.inputs import InputError
from scoring.shards import MANIFEST_NAME

RUN_TIMEOUT_S = 240  # one scoring run on the local cluster (actor start-up included)
N_SHARDS = 8
RECORDS_PER_SHARD = 60


def records() -> list[dict]:
    """Plain, chat and completion records; 8 shards of 60 records, enough work per shard that a kill lands mid-shard."""
    out = []
    for i in range(N_SHARDS * RECORDS_PER_SHARD):
        if i % 3 == 0:
            out.append({"text": f"Record {i}. Natalia sold clips to {i} of her friends in April, and then she sold half as many in May. " * (1 + i % 4)})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}, {"role": "assistant", "content": f"It is {2 * i}, thank you!"}]})
        else:
            out.append({"prompt": f"def add_{i}(a, b):\n", "completion": "    return a + b\n"})
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray_corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return path


def config(corpus, out, model_dir, **overrides) -> ScoreConfig:
    scorer = ScorerConfig(model=str(model_dir), batch_tokens=512)
    defaults = dict(inputs=(str(corpus),), out=str(out), scorer=scorer, max_length=64, n_context=8, records_per_shard=RECORDS_PER_SHARD)
    return ScoreConfig(**(defaults | overrides))


def one_thread(fn):
    """Run fn with one torch thread (as a --worker-cpus 1 actor has), restoring the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


def checksum(folder: Path) -> str:
    return json.loads((folder / MANIFEST_NAME).read_text())["checksum"]


def run_bounded(fn, timeout_s: float = RUN_TIMEOUT_S):
    """fn() in a daemon thread, failing the test (not hanging it) when it takes longer than timeout_s."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # handed to the test thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the run did not finish within {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_reference(corpus, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray_reference") / "local"
    one_thread(lambda: score(config(corpus, out, model_dir)))
    return out


def shard_actors(ray) -> dict[str, dict]:
    """The cluster's ShardActor actors (alive or dead): id → {Pid, State, NumRestarts, ...}."""
    from ray._private.state import actors  # the GCS actor table (the state API needs the dashboard)

    return {actor_id: info for actor_id, info in actors().items() if "ShardActor" in info["ActorClassName"]}


# ---- options: checked before anything starts -----------------------------------------------------


def test_ray_options_are_refused_with_the_local_engine(corpus, model_dir, tmp_path):
    problems = validate_engine(EngineConfig(workers=2, worker_gpus=1, ray_address="auto"))
    assert problems == [f"--{name} applies to --engine ray; drop it or pass --engine ray." for name in ("workers", "worker-gpus", "ray-address")]
    assert validate_engine(EngineConfig(engine="spark")) == ["--engine 'spark': choose local or ray."]
    assert "--workers 0: must be at least 1." in validate_engine(EngineConfig(engine="ray", workers=0))
    result = CliRunner().invoke(app, ["score", str(corpus), "--out", str(tmp_path / "x"), "--model", str(model_dir), "--workers", "2"])
    assert result.exit_code == 1 and "--workers applies to --engine ray" in result.output
    assert not (tmp_path / "x").exists()


# ---- the Ray engine on a local cluster ------------------------------------------------------------


@pytest.mark.slow
def test_ray_engine_with_two_workers_writes_the_local_shards_bit_for_bit(ray_cluster, corpus, model_dir, local_reference, tmp_path):
    before = set(shard_actors(ray_cluster))
    out = tmp_path / "ray"
    manifest = run_bounded(lambda: score(config(corpus, out, model_dir, engine=EngineConfig(engine="ray", workers=2))))
    assert len(set(shard_actors(ray_cluster)) - before) == 2  # two engine replicas did the work
    assert len(manifest["shards"]) == N_SHARDS and manifest["checksum"] == checksum(local_reference)
    assert shard_bytes(out) == shard_bytes(local_reference)  # same ids, columns, statistics and metadata, byte for byte
    assert not list(out.glob(".*.tmp"))
    # A rerun (either engine) skips every shard: nothing is rewritten.
    times = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    run_bounded(lambda: score(config(corpus, out, model_dir, engine=EngineConfig(engine="ray", workers=2))))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == times


@pytest.mark.slow
def test_add_model_on_ray_equals_add_model_in_process(ray_cluster, model_dir, base_model_dir, local_reference, tmp_path):
    def add(out, engine):
        cfg = AddModelConfig(shards=str(local_reference), scorer=ScorerConfig(model=str(base_model_dir), batch_tokens=512), prefix="base",
                             out=str(out), engine=engine)
        return add_model(cfg)

    one_thread(lambda: add(tmp_path / "local", EngineConfig()))
    manifest = run_bounded(lambda: add(tmp_path / "ray", EngineConfig(engine="ray", workers=2)))
    assert manifest["checksum"] == checksum(tmp_path / "local")
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")


@pytest.mark.slow
def test_a_ray_worker_killed_mid_run_is_restarted_and_the_result_is_unchanged(ray_cluster, corpus, model_dir, local_reference, tmp_path):
    out = tmp_path / "killed"
    before = set(shard_actors(ray_cluster))
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(manifest=score(config(corpus, out, model_dir, engine=EngineConfig(engine="ray", workers=2)))), daemon=True
    )
    thread.start()
    # ---- wait for the first written shard (the actors are then busy with the next ones), then kill -9 one actor
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    written_before_kill = len(list(out.glob("part-*.parquet")))
    alive = {actor_id: info for actor_id, info in shard_actors(ray_cluster).items() if actor_id not in before and info["State"] == "ALIVE"}
    assert alive and 0 < written_before_kill < N_SHARDS, (written_before_kill, alive)
    victim_id, victim = sorted(alive.items())[0]
    os.kill(victim["Pid"], signal.SIGKILL)
    # ---- the run finishes: the actor restarted, its shard redone, nothing partial left behind
    thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive(), f"the run did not finish within {RUN_TIMEOUT_S} s after the kill"
    assert "manifest" in outcome, "the run failed after the kill"
    assert shard_actors(ray_cluster)[victim_id]["NumRestarts"] >= 1
    assert outcome["manifest"]["checksum"] == checksum(local_reference)
    assert shard_bytes(out) == shard_bytes(local_reference)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_a_bad_record_on_a_ray_worker_is_raised_as_is(ray_cluster, model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello there"}\n{"text": "broken"\n')
    with pytest.raises(InputError, match=r"bad.jsonl, line 2: malformed JSON"):
        run_bounded(lambda: score(ScoreConfig(inputs=(str(path),), out=str(tmp_path / "out"), scorer=ScorerConfig(model=str(model_dir)),
                                              max_length=64, n_context=8, records_per_shard=1, engine=EngineConfig(engine="ray", workers=2))))
    assert not (tmp_path / "out" / "part-00001.parquet").exists() and not (tmp_path / "out" / MANIFEST_NAME).exists()
