"""Where `tokenprio score` and `tokenprio add-model` compute their shards: this process (`local`) or Ray actors (`ray`).

Both engines run the same plain per-shard function over the same shard plan:

    shard_fn(scorer: LazyScorer, job) -> ShardResult      writes shard job.index atomically, returns its entry

`local` calls it in a loop with one scorer for the whole pass. `ray` turns the pending shards into a Ray
Data dataset, one block per shard, and maps it with `ShardActor`, a callable class holding one scorer
(one engine replica) per actor: `concurrency` = --workers, `num_gpus` = --worker-gpus, `num_cpus` =
--worker-cpus (also the actor's torch threads), the pattern vLLM's documentation gives for offline batch
inference. Ray restarts a killed actor and resubmits its shard (Ray Data's defaults for actor pools);
every shard is written under a temporary name and renamed, so a worker killed mid-shard leaves no
visible partial shard and the redone shard has the same bytes. The driver collects the entries and
writes the manifest. Ray is imported only by the `ray` engine (`pip install 'ray[data]'`).
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from tqdm import tqdm

from scoring.backends import Scorer, ScorerConfig, load_scorer

ENGINES = ("local", "ray")
RAY_OPTIONS = ("workers", "worker_gpus", "worker_cpus", "ray_address")


@dataclass(frozen=True)
class EngineConfig:
    engine: str = "local"  # local | ray
    # ray only (None: the default)
    workers: int | None = None  # actors, i.e. engine replicas (1)
    worker_gpus: float | None = None  # GPUs per actor (0)
    worker_cpus: int | None = None  # CPUs per actor, also its torch threads (1)
    ray_address: str | None = None  # join this cluster (`auto`, `ray://head:10001`); default: start a local one


@dataclass(frozen=True)
class ShardResult:
    entry: dict  # the written shard's manifest entry (scoring.shards.shard_entry)
    skipped_messages: list[str]  # records skipped in it (--on-error skip)


def validate_engine(cfg: EngineConfig) -> list[str]:
    """Every problem with the engine options, each naming the option and the fix."""
    problems = []
    if cfg.engine not in ENGINES:
        problems.append(f"--engine {cfg.engine!r}: choose local or ray.")
    if cfg.engine != "ray":
        problems += [f"--{name.replace('_', '-')} applies to --engine ray; drop it or pass --engine ray." for name in RAY_OPTIONS if getattr(cfg, name) is not None]
    for name in ("workers", "worker_cpus"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1.")
    if cfg.worker_gpus is not None and cfg.worker_gpus < 0:
        problems.append(f"--worker-gpus {cfg.worker_gpus}: must be 0 or more.")
    return problems


class LazyScorer:
    """One engine replica's scorer, loaded at the first shard that needs it (a rerun over complete shards loads nothing)."""

    def __init__(self, cfg: ScorerConfig | None, max_length: int, tokenizer):
        self.cfg, self.max_length, self.tokenizer = cfg, max_length, tokenizer
        self.scorer: Scorer | None = None

    def get(self) -> Scorer:
        if self.scorer is None:
            self.scorer = load_scorer(self.cfg, self.max_length, self.tokenizer)
        return self.scorer

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None


ShardFn = Callable[[LazyScorer, object], ShardResult]


def run_shards(engine: EngineConfig, shard_fn: ShardFn, jobs: Iterable, *, scorer: ScorerConfig | None, max_length: int, tokenizer,
               desc: str) -> list[ShardResult]:
    """Run `shard_fn` on every job (a pending shard) with `engine`; the results in any order."""
    if engine.engine == "ray":
        return run_ray(engine, shard_fn, list(jobs), scorer=scorer, max_length=max_length, tokenizer=tokenizer)
    lazy = LazyScorer(scorer, max_length, tokenizer)
    results = []
    progress = tqdm(desc=desc, unit=" tok", unit_scale=True, file=sys.stderr)
    try:
        for job in jobs:  # lazily: `score` reads the inputs shard by shard
            results.append(shard_fn(lazy, job))
            progress.update(results[-1].entry["tokens"])
    finally:
        progress.close()
        lazy.close()
    return results


# ----------------------------------------------------------------------------------------------
# Ray


class ShardActor:
    """A Ray Data callable class: one scorer per actor, one shard per batch (a row holding the pickled job)."""

    def __init__(self, shard_fn: ShardFn, scorer: ScorerConfig | None, max_length: int, tokenizer, threads: int):
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor
        self.shard_fn = shard_fn
        self.lazy = LazyScorer(scorer, max_length, tokenizer)

    def __call__(self, batch: dict) -> dict:
        # The job was pickled by this run's driver (as Ray pickles every argument): never data read from a file.
        try:
            results = [json.dumps(asdict(self.shard_fn(self.lazy, pickle.loads(job)))) for job in batch["job"]]
        except (ValueError, FileNotFoundError) as error:  # a user-facing error (bad record, shard, server): the driver raises it as is
            return {"result": [""], "error": [pickle.dumps(error)]}
        return {"result": results, "error": [b""] * len(results)}

    def __del__(self):
        self.lazy.close()


def check_resources(ray, workers: int, cpus: int, gpus: float, started_here: bool) -> None:
    """A local cluster must hold every actor at once (else Ray waits forever); a joined cluster may autoscale, so only warn."""
    have = ray.cluster_resources()
    short = [f"{need:g} {name} needed, {have.get(name, 0):g} in the cluster" for name, need in (("CPU", workers * cpus), ("GPU", workers * gpus))
             if need > have.get(name, 0)]
    if not short:
        return
    if started_here:
        raise ValueError(f"--engine ray --workers {workers}: {'; '.join(short)}. Lower --workers, --worker-cpus or --worker-gpus.")
    print(f"warning: --workers {workers}: {'; '.join(short)}; Ray waits until the cluster has them.", file=sys.stderr)


def run_ray(engine: EngineConfig, shard_fn: ShardFn, jobs: list, *, scorer: ScorerConfig | None, max_length: int, tokenizer) -> list[ShardResult]:
    """Score the pending shards on --workers Ray actors (module docstring); a Ray session already running is reused."""
    if not jobs:
        return []
    import ray

    workers, cpus, gpus = engine.workers or 1, engine.worker_cpus or 1, engine.worker_gpus or 0.0
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=engine.ray_address, include_dashboard=False)  # address None: a local cluster on this machine
    try:
        check_resources(ray, workers, cpus, gpus, started_here)
        print(f"ray: {workers} actors x ({cpus} CPU, {gpus:g} GPU) for {len(jobs)} shards")
        dataset = ray.data.from_items([{"job": pickle.dumps(job)} for job in jobs], override_num_blocks=len(jobs))
        # Ray Data's actor pools restart a dead actor and resubmit its tasks by default (max_restarts=-1,
        # max_task_retries=-1: ray/data/_internal/execution/operators/actor_pool_map_operator.py); an
        # exception raised by the shard function is not retried and fails the run.
        scored = dataset.map_batches(
            ShardActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
            fn_constructor_kwargs={"shard_fn": shard_fn, "scorer": scorer, "max_length": max_length, "tokenizer": tokenizer, "threads": cpus},
        )
        results = []
        for row in scored.iter_rows():  # streaming: the first failed shard stops the run
            if row["error"]:
                raise pickle.loads(row["error"])
            results.append(ShardResult(**json.loads(row["result"])))
    finally:
        if started_here:
            ray.shutdown()
    return results
