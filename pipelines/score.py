"""`tokenprio score`: records → windows → reference statistics → Φ → Parquet shards + manifest.

One entry function, `score(cfg)`: checks (before any model loads) → the run's identity → one pass over
the shards this task owns → the task manifest, merged into `_manifest.json` when this is the only task.
Without a model (`--tokenizer` only) the shards are unscored (Φ from the spec over `weight`/`label`).

Shard k holds records [kR, (k+1)R); task i of N owns the shards with k ≡ i (mod N). A shard is complete
when its file exists and its config hash matches (scoring.shards.complete_shard), so a rerun skips it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path

from tqdm import tqdm

from scoring.backends import Scorer, ScorerConfig, load_scorer, load_tokenizer, scorer_identity, validate_scorer
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


def validate(cfg: ScoreConfig) -> list[str]:
    """Every problem with the configuration, each naming the option and the fix."""
    problems = []
    if not cfg.inputs:
        problems.append("no INPUT given: pass JSONL/JSON/Parquet/CSV files, dataset folders or dataset names.")
    if cfg.scorer is None and cfg.tokenizer is None:
        problems.append("give --model (reference model) or --tokenizer (unscored shards).")
    if cfg.scorer is not None:
        problems += validate_scorer(cfg.scorer)
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
    if cfg.scorer is not None:
        from scoring.hf_backend import check_model_path

        check_model_path(cfg.scorer.model)
    tokenizer_name = cfg.tokenizer or cfg.scorer.model
    tokenizer = load_tokenizer(tokenizer_name, cfg.scorer.trust_remote_code if cfg.scorer else False)
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


def score(cfg: ScoreConfig) -> dict:
    """Score a corpus into shards; returns the manifest (this task's manifest when num_tasks > 1)."""
    # ---- checks and the run's identity, before any model loads
    run = prepare(cfg)
    out = Path(cfg.out)
    lock = hold_lock(task_lock_path(out, cfg.task_index), "tokenprio score", f"{out} (task {cfg.task_index} of {cfg.num_tasks})")  # one writer per task

    # ---- the shards this task owns; the model loads at the first shard that needs scoring
    scorer: Scorer | None = None
    metadata, entries, skipped_messages, n_shards = run.metadata, [], [], 0
    progress = tqdm(desc=f"score task {cfg.task_index}/{cfg.num_tasks}", unit=" tok", unit_scale=True, file=sys.stderr)
    for index, records in shard_records(iter_records(list(cfg.inputs), cfg.fields, split=cfg.split), cfg.records_per_shard):
        n_shards = index + 1
        if index % cfg.num_tasks != cfg.task_index:
            continue
        done = complete_shard(out, index, "config_hash", run.cfg_hash, cfg.overwrite)
        if done is not None:
            entries.append(done)
            continue
        rows, counts, messages = encode_shard(records, run.tokenizer, cfg, run.chat_template)
        skipped_messages += messages
        stats = None
        if cfg.scorer is not None:
            if scorer is None:
                scorer = load_scorer(cfg.scorer, cfg.max_length)
                metadata = metadata | {"models": {cfg.prefix: scorer.info}}
            stats = scorer.score([w.input_ids for _, _, w in rows])
        table = with_weights(windows_table(rows, stats, cfg.prefix if stats is not None else None, metadata), run.priority)
        table = with_metadata(table, metadata | {"shard": {"index": index, **counts, "input_ids_sha256": input_ids_digest(table)}})
        entries.append(write_shard_file(table, out, index))
        progress.update(entries[-1]["tokens"])
    progress.close()
    if scorer is not None:
        scorer.close()
    if n_shards == 0:
        raise InputError(f"inputs {list(cfg.inputs)} contain no records.")

    # ---- manifest: this task's, merged automatically when it is the only task
    task = write_task_manifest(
        out, task_index=cfg.task_index, num_tasks=cfg.num_tasks, n_shards=n_shards, cfg_hash=run.cfg_hash, config=asdict(cfg),
        metadata=run_metadata(out, entries, metadata), entries=entries, skipped_messages=skipped_messages,
    )
    if cfg.num_tasks > 1:
        lock.release()
        print(f"task {cfg.task_index}/{cfg.num_tasks}: {len(entries)} shards; run `tokenprio finalize {out}` when all tasks are done")
        return task
    manifest = finalize(out, run.cfg_hash)
    lock.release()
    print(summary_line(manifest, out))
    return manifest

