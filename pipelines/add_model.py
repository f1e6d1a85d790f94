"""`tokenprio add-model`: a second model's statistics (`{prefix}_logprob`, `{prefix}_entropy`) over the rows
of an existing shard folder, e.g. the student's initial model for excess-loss policies.

The rows are never re-tokenised: the model scores the stored `input_ids`, whose digest (recorded when
they were first written) is checked, and its tokenizer must have the shards' fingerprint. The result is
a new shard folder (`--out`) or the source folder itself (`--in-place`); each shard is replaced
atomically, and a rerun skips shards that already hold this model's statistics. Each shard is done by
`add_model_shard`, in this process or on Ray actors (pipelines/engines.py, `--engine ray`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from pipelines.engines import EngineConfig, LazyScorer, ShardResult, run_shards, validate_engine
from scoring.backends import ScorerConfig, check_scorer, load_tokenizer, scorer_identity, validate_scorer
from scoring.shards import (
    ShardError,
    ShardSet,
    complete_shard,
    config_hash,
    finalize,
    hold_lock,
    input_ids_digest,
    open_shards,
    read_metadata,
    read_table,
    run_metadata,
    shard_index,
    stat_columns,
    summary_line,
    task_lock_path,
    tokenizer_fingerprint,
    verify_shards,
    with_metadata,
    with_statistics,
    write_shard_file,
    write_task_manifest,
)


@dataclass(frozen=True)
class AddModelConfig:
    shards: str  # source shard folder
    scorer: ScorerConfig  # the model to add
    prefix: str  # its statistics go to {prefix}_logprob, {prefix}_entropy
    out: str | None = None  # new shard folder; None with in_place
    in_place: bool = False  # add the columns to the source shards instead
    tokenizer: str | None = None  # defaults to the model's (checked against the shards' fingerprint)
    num_tasks: int = 1  # independent processes sharing the work
    task_index: int = 0  # this process's index in [0, num_tasks)
    overwrite: bool = False  # replace existing `{prefix}_*` columns or shards written with another configuration
    engine: EngineConfig = field(default_factory=EngineConfig)  # local loop or Ray actors (not part of the config hash)


def validate(cfg: AddModelConfig) -> list[str]:
    problems = validate_scorer(cfg.scorer) + validate_engine(cfg.engine)
    if not cfg.prefix.isidentifier():
        problems.append(f"--prefix {cfg.prefix!r}: use a short identifier such as base.")
    if (cfg.out is None) == (not cfg.in_place):
        problems.append("give exactly one of --out NEW (a new shard folder) and --in-place (add the columns to SHARDS).")
    if cfg.out is not None and Path(cfg.out).resolve() == Path(cfg.shards).resolve():
        problems.append(f"--out {cfg.out} is the source folder; pass --in-place to add the columns there.")
    if not 0 <= cfg.task_index < cfg.num_tasks:
        problems.append(f"--task-index {cfg.task_index}: must be in [0, --num-tasks={cfg.num_tasks}).")
    return problems


def check_source(cfg: AddModelConfig) -> tuple[ShardSet, object]:
    """Open the source shards and check the model against them (tokenizer fingerprint, existing prefix); (shards, tokenizer)."""
    source = open_shards(cfg.shards, verify=not cfg.in_place)  # in place, add_model verifies the shards still to do
    if cfg.scorer.backend != "vllm-server":
        check_scorer(cfg.scorer, None, source.metadata["windowing"]["max_length"])  # the model folder exists
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.scorer.model, cfg.scorer.trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != source.metadata["tokenizer"]["fingerprint"]:
        raise ShardError(
            f"--model {cfg.scorer.model}: its tokenizer differs from the one that wrote {source.folder} "
            f"({source.metadata['tokenizer']['name']}); token ids would not match. Use a model with the same tokenizer, "
            "or `tokenprio project` the shards onto its tokenizer first."
        )
    if cfg.prefix in source.stat_prefixes and not cfg.overwrite and not cfg.in_place:
        raise ShardError(f"{source.folder}: already has {stat_columns(cfg.prefix)}; choose another --prefix or pass --overwrite.")
    if cfg.scorer.backend == "vllm-server":
        check_scorer(cfg.scorer, tokenizer, source.metadata["windowing"]["max_length"])  # serves this model and tokenizer
    return source, tokenizer


@dataclass(frozen=True)
class AddModelRun:
    """What every shard of one add-model run shares."""

    out: str  # the folder written
    prefix: str
    hash_key: str  # `{prefix}_config_hash`, the metadata key a complete shard carries
    step_hash: str  # this step's config hash


def add_model_shard(run: AddModelRun, scorer: LazyScorer, path: str) -> ShardResult:
    """Score the stored rows of the source shard `path` and write them with the new columns atomically: the same code in every engine."""
    path = Path(path)
    table, metadata = read_table(path), read_metadata(path)
    digest = input_ids_digest(table)
    if metadata.get("shard", {}).get("input_ids_sha256", digest) != digest:
        raise ShardError(f"{path}: input_ids changed since scoring (digest mismatch); rescore the corpus.")
    table = with_statistics(table, run.prefix, scorer.get().score(table.column("input_ids").to_pylist()))
    metadata["models"] = metadata.get("models", {}) | {run.prefix: scorer.get().info}
    metadata[run.hash_key] = run.step_hash
    metadata["shard"] = metadata.get("shard", {}) | {"input_ids_sha256": digest}
    return ShardResult(entry=write_shard_file(with_metadata(table, metadata), Path(run.out), shard_index(path)), skipped_messages=[])


def add_model(cfg: AddModelConfig) -> dict:
    """Score `cfg.scorer` over the stored rows; returns the manifest (this task's manifest when num_tasks > 1)."""
    # ---- checks before any model loads
    problems = validate(cfg)
    if problems:
        raise ValueError("\n".join(problems))
    source, tokenizer = check_source(cfg)
    out = source.folder if cfg.in_place else Path(cfg.out)
    run = AddModelRun(out=str(out), prefix=cfg.prefix, hash_key=f"{cfg.prefix}_config_hash",
                      step_hash=config_hash({"source": source.metadata["config_hash"], "model": scorer_identity(cfg.scorer), "prefix": cfg.prefix}))
    lock = hold_lock(task_lock_path(out, cfg.task_index), "tokenprio add-model", f"{out} (task {cfg.task_index} of {cfg.num_tasks})")  # one writer per task
    if cfg.in_place:  # the shards this step has not rewritten yet must match the manifest; the others are its own output
        verify_shards(source.folder, source.manifest, [p for p in source.paths if read_metadata(p).get(run.hash_key) != run.step_hash])

    # ---- this task's shards: complete ones reused, the others scored (the model loads at the first)
    done, pending = [], []
    for path in source.paths:
        index = shard_index(path)
        if index % cfg.num_tasks != cfg.task_index:
            continue
        # In place, the source shard itself is the target: without this model's hash it is still to do.
        entry = complete_shard(out, index, run.hash_key, run.step_hash, overwrite=cfg.in_place or cfg.overwrite)
        if entry is not None:
            done.append(entry)
        else:
            pending.append(str(path))
    results = run_shards(cfg.engine, partial(add_model_shard, run), pending, scorer=cfg.scorer, max_length=source.metadata["windowing"]["max_length"],
                         tokenizer=tokenizer, desc=f"add-model {cfg.prefix}")
    entries = done + [result.entry for result in results]

    # ---- manifest: this task's, merged automatically when it is the only task
    task = write_task_manifest(
        out, task_index=cfg.task_index, num_tasks=cfg.num_tasks, n_shards=len(source.paths), cfg_hash=run.step_hash,
        config=asdict(cfg), metadata=run_metadata(out, entries, source.metadata), entries=entries, skipped_messages=[],
    )
    if cfg.num_tasks > 1:
        lock.release()
        print(f"task {cfg.task_index}/{cfg.num_tasks}: {len(entries)} shards; run `tokenprio finalize {out}` when all tasks are done")
        return task
    manifest = finalize(out, run.step_hash)
    lock.release()
    print(summary_line(manifest, out))
    return manifest
