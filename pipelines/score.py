"""`tokenprio score`: records → windows → reference statistics → Φ → Parquet shards + manifest.

One entry function, `score(cfg)`: checks (before any model loads) → the run's identity → the shards this
task owns, each scored and written by `score_shard` (in this process, or on Ray actors: pipelines/engines.py)
→ the task manifest, merged into `_manifest.json` when this is the only task. Without a model
(`--tokenizer` only) the shards are unscored (Φ from the spec over `weight`/`label`).

Shard k holds records [kR, (k+1)R); task i of N owns the shards with k ≡ i (mod N). A shard is complete
when its file exists and its config hash matches (scoring.shards.complete_shard), so a rerun skips it.
The engine is not part of the config hash: a run started with one engine can be finished with the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path

from pipelines.engines import EngineConfig, LazyScorer, ShardResult, run_shards, validate_engine
from scoring.backends import ScorerConfig, check_scorer, load_tokenizer, scorer_identity, validate_scorer
from scoring.inputs import Record
from scoring.inputs import FieldNames, InputError, check_inputs, encode_record, iter_records, split_windows
from scoring.priority import parse_offline
from scoring.shards import (
    complete_shard,
    config_hash,
    corpus_metadata,
    finalize,
    hold_lock,
    input_ids_digest,
    run_metadata,
    spec_columns,
    summary_line,
    task_lock_path,
    with_metadata,
    with_weights,
    windows_table,
    write_shard_file,
    write_task_manifest,
)


DEFAULT_CONTEXT = 256  # tokens of context repeated at the start of each later window


@dataclass(frozen=True)
class ScoreConfig:
    inputs: tuple[str, ...]  # JSONL/JSON/Parquet/CSV files, dataset folders or dataset names
    out: str  # shard folder to write
    scorer: ScorerConfig | None = None  # the reference model; None writes unscored shards (needs `tokenizer`)
    tokenizer: str | None = None  # defaults to the model's tokenizer
    prefix: str = "ref"  # statistics go to {prefix}_logprob, {prefix}_entropy
    priority: str = "uniform"  # Φ spec over the stored columns, written to `weight`
    fields: FieldNames = field(default_factory=FieldNames)  # record field names
    chat_template: str | None = None  # Jinja file used instead of the tokenizer's chat template
    split: str = "train"  # split of Hugging Face datasets
    max_length: int = 2048  # tokens per row (window)
    n_context: int | None = None  # tokens repeated from the previous window at the start of window k > 0 (None: 256); window mode only
    long_docs: str = "window"  # window | truncate (dropped tokens counted in the manifest)
    records_per_shard: int = 10_000  # input records per shard file
    num_tasks: int = 1  # independent processes scoring one corpus together
    task_index: int = 0  # this process's index in [0, num_tasks)
    on_error: str = "raise"  # raise | skip (skipped records are counted in the manifest)
    overwrite: bool = False  # replace shards written with another configuration
    engine: EngineConfig = field(default_factory=EngineConfig)  # local loop or Ray actors (not part of the config hash)


def validate(cfg: ScoreConfig) -> list[str]:
    """Every problem with the configuration, each naming the option and the fix."""
    problems = []
    if not cfg.inputs:
        problems.append("no INPUT given: pass JSONL/JSON/Parquet/CSV files, dataset folders or dataset names.")
    if cfg.scorer is None and cfg.tokenizer is None:
        problems.append("give --model (reference model) or --tokenizer (unscored shards).")
    if cfg.scorer is not None:
        problems += validate_scorer(cfg.scorer)
    problems += validate_engine(cfg.engine)
    if not cfg.prefix.isidentifier():
        problems.append(f"--prefix {cfg.prefix!r}: use a short identifier such as ref or base.")
    if cfg.max_length < 2:
        problems.append(f"--max-length {cfg.max_length}: must be at least 2 tokens.")
    if cfg.long_docs not in ("window", "truncate"):
        problems.append(f"--long-docs {cfg.long_docs!r}: choose window or truncate.")
    if cfg.long_docs == "truncate" and cfg.n_context is not None:
        problems.append("--context applies to --long-docs window (truncate repeats no context); drop it.")
    if cfg.long_docs == "window" and not 1 <= context_tokens(cfg) < cfg.max_length:
        problems.append(f"--context {context_tokens(cfg)}: must be in [1, max_length) = [1, {cfg.max_length}); pass --context.")
    if cfg.scorer is None and cfg.prefix != "ref":
        problems.append(f"--prefix {cfg.prefix} names the scored model's columns; unscored shards (no --model) have none: drop it.")
    if cfg.split != "train" and cfg.inputs and all(Path(name).is_file() for name in cfg.inputs):
        problems.append(f"--split {cfg.split} applies to Hugging Face datasets; the inputs are all files: drop it.")
    if cfg.on_error not in ("raise", "skip"):
        problems.append(f"--on-error {cfg.on_error!r}: choose raise or skip.")
    if cfg.records_per_shard < 1:
        problems.append(f"--records-per-shard {cfg.records_per_shard}: must be positive.")
    if not 0 <= cfg.task_index < cfg.num_tasks:
        problems.append(f"--task-index {cfg.task_index}: must be in [0, --num-tasks={cfg.num_tasks}).")
    if cfg.chat_template is not None and not Path(cfg.chat_template).is_file():
        problems.append(f"--chat-template {cfg.chat_template}: no such file.")
    return problems


def context_tokens(cfg: ScoreConfig) -> int:
    """Tokens repeated at the start of window k > 0: the option, else 256 (the value is unused with truncate)."""
    return cfg.n_context if cfg.n_context is not None else DEFAULT_CONTEXT


def input_identity(inputs: tuple[str, ...]) -> list:
    """What identifies the inputs in the config hash: path and size for files, the name for datasets."""
    return [[str(Path(p).resolve()), Path(p).stat().st_size] if Path(p).is_file() else p for p in inputs]


# ----------------------------------------------------------------------------------------------
# Shard contents


def shard_records(records, records_per_shard: int):
    """Yield (shard_index, records of that shard) from the global record stream."""
    numbered = enumerate(records)
    for shard_index, group in groupby(numbered, key=lambda item: item[0] // records_per_shard):
        yield shard_index, [record for _, record in group]


def encode_shard(records, tokenizer, cfg: ScoreConfig, chat_template: str | None):
    """Encode and window a shard's records. Returns (rows, counts, skipped messages); rows are (doc_id, Encoded, Window)."""
    rows, skipped, truncated, skipped_messages = [], 0, 0, []
    for record in records:
        try:
            encoded = encode_record(record, tokenizer, chat_template=chat_template)
            windows, dropped = split_windows(encoded, max_length=cfg.max_length, n_context=min(context_tokens(cfg), cfg.max_length - 1), long_docs=cfg.long_docs)
        except InputError as error:
            if cfg.on_error == "raise":
                raise
            skipped += 1
            skipped_messages.append(str(error))
            continue
        truncated += dropped
        rows += [(record.doc_id, encoded, window) for window in windows]
    counts = {"records": len(records), "skipped_records": skipped, "truncated_tokens": truncated}
    return rows, counts, skipped_messages


@dataclass(frozen=True)
class Run:
    """What `score` checked and decided before touching a record: the run's identity and its inputs."""

    tokenizer: object
    priority: object  # scoring.priority.Priority, offline
    chat_template: str | None
    metadata: dict  # the shards' `tokenprio` metadata (models added when the scorer loads)
    cfg_hash: str


def prepare(cfg: ScoreConfig) -> Run:
    """Check inputs, model path, tokenizer and Φ spec (nothing loads a model), and fix the run's identity."""
    problems = validate(cfg)
    if problems:
        raise ValueError("\n".join(problems))
    check_inputs(list(cfg.inputs))
    if cfg.scorer is not None and cfg.scorer.backend != "vllm-server":
        check_scorer(cfg.scorer, None, cfg.max_length)  # the model folder exists
    tokenizer_name = cfg.tokenizer or cfg.scorer.model
    tokenizer = load_tokenizer(tokenizer_name, cfg.scorer.trust_remote_code if cfg.scorer else False)
    if cfg.scorer is not None and cfg.scorer.backend == "vllm-server":
        check_scorer(cfg.scorer, tokenizer, cfg.max_length)  # the server answers and serves this model and tokenizer
    priority = parse_offline(cfg.priority, spec_columns([cfg.prefix] if cfg.scorer else []), "score")
    chat_template = Path(cfg.chat_template).read_text() if cfg.chat_template else None
    windowing = {"max_length": cfg.max_length, "long_docs": cfg.long_docs}
    if cfg.long_docs == "window":
        windowing["n_context"] = context_tokens(cfg)
    metadata = corpus_metadata(tokenizer=tokenizer, tokenizer_name=tokenizer_name, chat_template=chat_template, windowing=windowing,
                               records_per_shard=cfg.records_per_shard, priority=priority.text)
    cfg_hash = config_hash({
        "inputs": input_identity(cfg.inputs), "split": cfg.split, "fields": asdict(cfg.fields), "on_error": cfg.on_error,
        "model": scorer_identity(cfg.scorer) if cfg.scorer else None, "prefix": cfg.prefix, "metadata": metadata,
    })
    return Run(tokenizer=tokenizer, priority=priority, chat_template=chat_template, metadata=metadata | {"config_hash": cfg_hash}, cfg_hash=cfg_hash)


@dataclass(frozen=True)
class ShardJob:
    index: int  # shard k
    records: list[Record]  # records [kR, (k+1)R)


@dataclass
class ShardPlan:
    """What the pass over the inputs found: the shards of the corpus, and the entries of this task's complete ones."""

    n_shards: int = 0
    done: list[dict] = field(default_factory=list)


def pending_shards(cfg: ScoreConfig, run: Run, plan: ShardPlan) -> Iterator[ShardJob]:
    """Yield this task's shards that still need writing, reading the inputs once; complete shards go to `plan.done`."""
    out = Path(cfg.out)
    for index, records in shard_records(iter_records(list(cfg.inputs), cfg.fields, split=cfg.split), cfg.records_per_shard):
        plan.n_shards = index + 1
        if index % cfg.num_tasks != cfg.task_index:
            continue
        done = complete_shard(out, index, "config_hash", run.cfg_hash, cfg.overwrite)
        if done is not None:
            plan.done.append(done)
            continue
        yield ShardJob(index=index, records=records)


def score_shard(cfg: ScoreConfig, run: Run, scorer: LazyScorer, job: ShardJob) -> ShardResult:
    """Encode, window, score and weigh shard `job.index`, and write it atomically: the same code in every engine."""
    rows, counts, messages = encode_shard(job.records, run.tokenizer, cfg, run.chat_template)
    metadata, stats = run.metadata, None
    if cfg.scorer is not None:
        metadata = metadata | {"models": {cfg.prefix: scorer.get().info}}
        stats = scorer.get().score([w.input_ids for _, _, w in rows])
    table = with_weights(windows_table(rows, stats, cfg.prefix if stats is not None else None, metadata), run.priority)
    table = with_metadata(table, metadata | {"shard": {"index": job.index, **counts, "input_ids_sha256": input_ids_digest(table)}})
    return ShardResult(entry=write_shard_file(table, Path(cfg.out), job.index), skipped_messages=messages)


def score(cfg: ScoreConfig) -> dict:
    """Score a corpus into shards; returns the manifest (this task's manifest when num_tasks > 1)."""
    # ---- checks and the run's identity, before any model loads
    run = prepare(cfg)
    out = Path(cfg.out)
    lock = hold_lock(task_lock_path(out, cfg.task_index), "tokenprio score", f"{out} (task {cfg.task_index} of {cfg.num_tasks})")  # one writer per task

    # ---- this task's shards: complete ones reused, the others scored and written (the model loads at the first)
    plan = ShardPlan()
    results = run_shards(
        cfg.engine, partial(score_shard, cfg, run), pending_shards(cfg, run, plan), scorer=cfg.scorer, max_length=cfg.max_length,
        tokenizer=run.tokenizer, desc=f"score task {cfg.task_index}/{cfg.num_tasks}",
    )
    if plan.n_shards == 0:
        raise InputError(f"inputs {list(cfg.inputs)} contain no records.")
    entries = plan.done + [result.entry for result in results]
    skipped_messages = [message for result in sorted(results, key=lambda r: r.entry["index"]) for message in result.skipped_messages]

    # ---- manifest: this task's, merged automatically when it is the only task
    task = write_task_manifest(
        out, task_index=cfg.task_index, num_tasks=cfg.num_tasks, n_shards=plan.n_shards, cfg_hash=run.cfg_hash, config=asdict(cfg),
        metadata=run_metadata(out, entries, run.metadata), entries=entries, skipped_messages=skipped_messages,
    )
    if cfg.num_tasks > 1:
        lock.release()
        print(f"task {cfg.task_index}/{cfg.num_tasks}: {len(entries)} shards; run `tokenprio finalize {out}` when all tasks are done")
        return task
    manifest = finalize(out, run.cfg_hash)
    lock.release()
    print(summary_line(manifest, out))
    return manifest
