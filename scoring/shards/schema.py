"""The shard schema: column names and types, file names, and the `tokenprio` metadata entry.

A row is a window of at most `max_length` tokens of one record. Every list column is aligned with
`input_ids`: position t describes the prediction of token t, so position 0 has none (statistics NaN,
mask false, weight 0). docs/design.md "The shard contract" has the table; this module is its code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = "1.1"  # 1.1 adds the record columns below; readers accept every 1.x
METADATA_KEY = b"tokenprio"
MANIFEST_NAME = "_manifest.json"
ROW_GROUP_TOKENS = 1_000_000  # tokens per Parquet row group (the unit of shuffling and streaming)

# Columns every shard has, in order. Statistic columns (`{prefix}_logprob`, `{prefix}_entropy`) follow.
BASE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("doc_id", pa.string()),
    pa.field("window", pa.int32()),
    pa.field("n_context", pa.int32()),
    pa.field("n_tokens", pa.int32()),
    pa.field("n_targets", pa.int32()),
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("loss_mask", pa.list_(pa.bool_())),
    pa.field("weight", pa.list_(pa.float32())),
    pa.field("label", pa.list_(pa.string())),
    pa.field("text", pa.string()),
    pa.field("char_start", pa.list_(pa.int32())),
    pa.field("char_end", pa.list_(pa.int32())),
]
# Schema 1.1: how each record's `text` was built (record-level, repeated on every window like `text`), so
# `tokenprio project` can rebuild the record for another tokenizer. Optional: 1.0 shards lack them.
SEGMENT_TYPE = pa.struct([("role", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
LABEL_SPAN_TYPE = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("label", pa.string())])
RECORD_FIELDS = [
    pa.field("record_kind", pa.string()),  # text | completion | chat
    pa.field("segments", pa.list_(SEGMENT_TYPE)),  # the record's parts in `text` (role, [start, end)); chat: one per message content
    pa.field("label_spans", pa.list_(LABEL_SPAN_TYPE)),  # the input spans, as [start, end) offsets into `text`
]
STAT_SUFFIXES = ("logprob", "entropy")
TOKEN_LIST_COLUMNS = ("input_ids", "loss_mask", "weight", "label", "char_start", "char_end")


class ShardError(ValueError):
    """A shard folder or file that breaks the contract; the message names the file, row and fix."""


def stat_columns(prefix: str) -> list[str]:
    """`{prefix}_logprob`, `{prefix}_entropy`: the statistics of the model scored under `prefix`."""
    return [f"{prefix}_{suffix}" for suffix in STAT_SUFFIXES]


def stat_prefixes_of(schema: pa.Schema) -> list[str]:
    """Prefixes with both `{p}_logprob` and `{p}_entropy` columns, in schema order."""
    names = set(schema.names)
    return [n.removesuffix("_logprob") for n in schema.names if n.endswith("_logprob") and f"{n.removesuffix('_logprob')}_entropy" in names]


def spec_columns(stat_prefixes: list[str]) -> set[str]:
    """The stored columns a Φ spec may read in shards with these statistic prefixes."""
    return {"weight", "label"} | {name for prefix in stat_prefixes for name in stat_columns(prefix)}


def has_record_fields(schema: pa.Schema) -> bool:
    """Whether a shard has the schema-1.1 record columns (`record_kind`, `segments`, `label_spans`)."""
    return all(f.name in schema.names for f in RECORD_FIELDS)


def shard_schema(stat_prefixes: list[str], metadata: dict, *, record_fields: bool = False) -> pa.Schema:
    """The Arrow schema of a shard with the given statistic prefixes and `tokenprio` metadata (and, with
    `record_fields`, the 1.1 record columns after the base columns)."""
    fields = list(BASE_FIELDS) + (list(RECORD_FIELDS) if record_fields else [])
    for prefix in stat_prefixes:
        fields += [pa.field(name, pa.list_(pa.float32())) for name in stat_columns(prefix)]
    return pa.schema(fields, metadata={METADATA_KEY: encode_metadata(metadata)})


def encode_metadata(metadata: dict) -> bytes:
    """The value of the `tokenprio` key: sorted JSON, so equal metadata gives equal bytes."""
    return json.dumps(metadata, sort_keys=True).encode()


def with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    """`table` with its `tokenprio` metadata replaced."""
    return table.replace_schema_metadata({METADATA_KEY: encode_metadata(metadata)})


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def tmp_name(name: str) -> str:
    """The temporary name of file `name` while this process writes it: a leading dot (pandas and pyarrow skip it
    when reading the folder) and the writer's pid (two writers never share one)."""
    return f".{name}.{os.getpid()}.tmp"


def shard_index(path: str | Path) -> int:
    """k of `part-k.parquet` (the file name of shard k)."""
    name = Path(path).name
    if not (name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit()):
        raise ShardError(f"{path}: not a shard file name (part-NNNNN.parquet).")
    return int(name[5:-8])


def check_schema_version(version: str, where: str) -> None:
    major = str(version).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise ShardError(
            f"{where}: schema_version {version!r} is not readable by this tokenprio (it reads {SCHEMA_VERSION.split('.')[0]}.x). "
            "Rescore the corpus with this version, or use the tokenprio version that wrote it."
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the id→token map and the special-token ids: equal fingerprints mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
    payload = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def corpus_metadata(
    *, tokenizer, tokenizer_name: str, chat_template: str | None, windowing: dict, records_per_shard: int, priority: str
) -> dict:
    """The `tokenprio` metadata of a freshly scored corpus (models are added as they are scored)."""
    template = chat_template or tokenizer.chat_template or ""
    return {
        "schema_version": SCHEMA_VERSION,
        "tokenizer": {
            "name": tokenizer_name,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        },
        "windowing": windowing,
        "records_per_shard": records_per_shard,
        "priority": priority,
        "models": {},
    }


def config_hash(parts: dict) -> str:
    """16 hex digits identifying a configuration: what a complete shard must match to be reused."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
