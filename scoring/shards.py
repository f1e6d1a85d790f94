"""The shard contract (schema "1.0"): one scored corpus is a folder of `part-NNNNN.parquet` files plus
`_manifest.json`.

A row is a window of at most `max_length` tokens of one record. Every list column is aligned with
`input_ids`: position t describes the prediction of token t, so position 0 has none (statistics NaN,
mask false, weight 0). See DESIGN.md for the full contract; this module is its only implementation:
the schema, the atomic writer, the manifest and the validating reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = "1.0"
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
STAT_SUFFIXES = ("logprob", "entropy")
TOKEN_LIST_COLUMNS = ("input_ids", "loss_mask", "weight", "label", "char_start", "char_end")


class ShardError(ValueError):
    """A shard folder or file that breaks the contract; the message names the file, row and fix."""


def stat_columns(prefix: str) -> list[str]:
    return [f"{prefix}_{suffix}" for suffix in STAT_SUFFIXES]


def shard_schema(stat_prefixes: list[str], metadata: dict) -> pa.Schema:
    """The Arrow schema of a shard with the given statistic prefixes and `tokenprio` metadata."""
    fields = list(BASE_FIELDS)
    for prefix in stat_prefixes:
        fields += [pa.field(name, pa.list_(pa.float32())) for name in stat_columns(prefix)]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def tmp_name(index: int) -> str:
    # A leading dot: pandas and pyarrow skip it when reading the folder.
    return f".{shard_name(index)}.tmp"


def stat_prefixes_of(schema: pa.Schema) -> list[str]:
    """Prefixes with both `{p}_logprob` and `{p}_entropy` columns, in schema order."""
    names = set(schema.names)
    return [n[: -len("_logprob")] for n in schema.names if n.endswith("_logprob") and f"{n[:-8]}_entropy" in names]


# ----------------------------------------------------------------------------------------------
# Writing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def row_group_slices(n_tokens: np.ndarray, tokens_per_group: int = ROW_GROUP_TOKENS) -> list[tuple[int, int]]:
    """Split rows into consecutive [start, end) slices of about `tokens_per_group` tokens each."""
    slices, start, acc = [], 0, 0
    for i, n in enumerate(n_tokens.tolist()):
        acc += n
        if acc >= tokens_per_group:
            slices.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(n_tokens) or not slices:
        slices.append((start, len(n_tokens)))
    return slices


def write_shard_file(table: pa.Table, out_dir: Path, index: int) -> dict:
    """Write one shard atomically (temporary name, fsync, rename) and return its manifest entry.

    The bytes depend only on the table and its metadata (no creation time), so a rerun that computes
    the same table writes the same file and the same checksum. Row groups hold about ROW_GROUP_TOKENS.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_path, final_path = out_dir / tmp_name(index), out_dir / shard_name(index)
    n_tokens = table.column("n_tokens").to_numpy()
    with pq.ParquetWriter(tmp_path, table.schema, compression="zstd", write_statistics=False) as writer:
        for start, end in row_group_slices(n_tokens):
            writer.write_table(table.slice(start, end - start), row_group_size=max(1, end - start))
    with open(tmp_path, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)
    return shard_entry(final_path)


def shard_entry(path: Path) -> dict:
    """The manifest entry of a written shard, read back from the file: sizes per row group and checksum."""
    parquet = pq.ParquetFile(path)
    row_groups = []
    for i in range(parquet.num_row_groups):
        sizes = parquet.read_row_group(i, columns=["n_tokens", "n_targets"])
        row_groups.append(
            {
                "rows": sizes.num_rows,
                "tokens": int(pc.sum(sizes.column("n_tokens")).as_py() or 0),
                "targets": int(pc.sum(sizes.column("n_targets")).as_py() or 0),
            }
        )
    shard_info = read_metadata(path).get("shard", {})
    return {
        "file": path.name,
        "index": int(path.name[len("part-") : -len(".parquet")]),
        "rows": sum(g["rows"] for g in row_groups),
        "tokens": sum(g["tokens"] for g in row_groups),
        "targets": sum(g["targets"] for g in row_groups),
        "records": shard_info.get("records", 0),
        "skipped_records": shard_info.get("skipped_records", 0),
        "truncated_tokens": shard_info.get("truncated_tokens", 0),
        "sha256": sha256_file(path),
        "row_groups": row_groups,
    }


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary dot-name, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def manifest_checksum(manifest: dict) -> str:
    """sha256 over the shard entries (files, sizes, checksums): what a training run records."""
    shards = sorted(manifest["shards"], key=lambda s: s["index"])
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def build_manifest(shards: list[dict], metadata: dict, totals_extra: dict | None = None) -> dict:
    shards = sorted(shards, key=lambda s: s["index"])
    totals = {key: sum(s.get(key, 0) for s in shards) for key in ("records", "skipped_records", "truncated_tokens", "rows", "tokens", "targets")}
    totals.update(totals_extra or {})
    manifest = {"schema_version": SCHEMA_VERSION, "metadata": metadata, "totals": totals, "shards": shards}
    manifest["checksum"] = manifest_checksum(manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading and validation


def check_schema_version(version: str, where: str) -> None:
    major = str(version).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise ShardError(
            f"{where}: schema_version {version!r} is not readable by this tokenprio (it reads {SCHEMA_VERSION}). "
            "Rescore the corpus with this version, or use the tokenprio version that wrote it."
        )


def read_metadata(path: Path) -> dict:
    """The `tokenprio` metadata of one shard file, with its schema version checked."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(f"{path}: no 'tokenprio' metadata; this is not a tokenprio shard. Write frames with write_shards(df, like=...).")
    metadata = json.loads(raw)
    check_schema_version(metadata.get("schema_version", "?"), str(path))
    return metadata


def load_manifest(folder: Path) -> dict:
    """Read and check `_manifest.json`: schema version, and every listed shard present."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        hint = " (task manifests found: run `tokenprio score --finalize`)" if list(folder.glob("_manifest.task-*.json")) else ""
        raise ShardError(f"{folder}: no {MANIFEST_NAME}; not a finished tokenprio shard folder{hint}.")
    manifest = json.loads(path.read_text())
    check_schema_version(manifest.get("schema_version", "?"), str(path))
    for shard in manifest["shards"]:
        if not (folder / shard["file"]).exists():
            raise ShardError(f"{path}: lists {shard['file']}, which is missing. Rerun the command that wrote {folder}.")
    return manifest


def shard_paths(folder: Path, manifest: dict) -> list[Path]:
    return [Path(folder) / s["file"] for s in sorted(manifest["shards"], key=lambda s: s["index"])]


def validate_table(table: pa.Table, where: str) -> None:
    """Check the row invariants of a shard table; raise ShardError naming the file, row and column."""
    missing = [f.name for f in BASE_FIELDS if f.name not in table.schema.names]
    if missing:
        raise ShardError(f"{where}: missing columns {missing}; a shard needs {[f.name for f in BASE_FIELDS]}.")
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    n_tokens = table.column("n_tokens").to_numpy()
    bad = np.nonzero(lengths != n_tokens)[0]
    if len(bad):
        raise ShardError(f"{where}: row {bad[0]}: n_tokens={n_tokens[bad[0]]} but input_ids has {lengths[bad[0]]} ids.")
    float_columns = ["weight"] + [c for p in stat_prefixes_of(table.schema) for c in stat_columns(p)]
    for name in TOKEN_LIST_COLUMNS + tuple(float_columns[1:]):
        col_lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        bad = np.nonzero(col_lengths != lengths)[0]
        if len(bad):
            raise ShardError(f"{where}: row {bad[0]}: column {name!r} has {col_lengths[bad[0]]} values for {lengths[bad[0]]} tokens.")
    mask = pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False)
    n_targets = table.column("n_targets").to_numpy()
    row_of_token = np.repeat(np.arange(table.num_rows), lengths)
    counted = np.bincount(row_of_token, weights=mask, minlength=table.num_rows).astype(np.int64)
    bad = np.nonzero(counted != n_targets)[0]
    if len(bad):
        raise ShardError(f"{where}: row {bad[0]}: n_targets={n_targets[bad[0]]} but loss_mask has {counted[bad[0]]} true values.")
    ids = table.column("id").to_numpy(zero_copy_only=False)
    duplicated = np.nonzero(duplicated_mask(ids))[0]
    if len(duplicated):
        row = int(duplicated[0])
        raise ShardError(f"{where}: row {row}: id {ids[row]!r} appears twice; ids are unique (`{{doc_id}}:{{window}}`). Drop the duplicate rows.")
    weight = pc.list_flatten(table.column("weight")).to_numpy(zero_copy_only=False)
    off_mask = np.nonzero(~mask.astype(bool) & (weight != 0) & np.isfinite(weight))[0]
    if len(off_mask):
        token = int(off_mask[0])
        row = int(row_of_token[token])
        position = token - int(np.concatenate([[0], np.cumsum(lengths)])[row])
        raise ShardError(
            f"{where}: row {row} (id {ids[row]}), position {position}: weight {weight[token]:.6g} where loss_mask is false; "
            "stored Φ is 0 off the mask (multiply the new weights by loss_mask)."
        )
    # Position 0 of each row predicts nothing; statistics are defined (finite) at every t >= 1.
    first = np.zeros(len(mask), dtype=bool)
    first[np.cumsum(lengths)[:-1][lengths[1:] > 0] if len(lengths) > 1 else []] = True
    if len(lengths) and lengths[0] > 0:
        first[0] = True
    for name in float_columns:
        values = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
        invalid = ~np.isfinite(values) & ~first if name != "weight" else ~np.isfinite(values)
        if invalid.any():
            token = int(np.nonzero(invalid)[0][0])
            row = int(row_of_token[token])
            position = token - int(np.concatenate([[0], np.cumsum(lengths)])[row])
            fix = "recompute it with `tokenprio reweight`" if name == "weight" else "rescore this shard"
            raise ShardError(f"{where}: row {row} (id {table.column('id')[row]}), column {name!r}, position {position}: value {values[token]} is not finite; {fix}.")


def duplicated_mask(values: np.ndarray) -> np.ndarray:
    """Boolean mask of values already seen earlier in the array (first occurrences are False)."""
    _, first = np.unique(values, return_index=True)
    seen = np.ones(len(values), dtype=bool)
    seen[first] = False
    return seen


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the id→token map and the special-token ids: equal fingerprints mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
    payload = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class ShardSet:
    """An opened, checked shard folder: its manifest, metadata of the first shard, and the file paths."""

    folder: Path
    manifest: dict
    metadata: dict
    paths: list[Path]

    @property
    def stat_prefixes(self) -> list[str]:
        return stat_prefixes_of(pq.read_schema(self.paths[0]))


def open_shards(folder: str | Path) -> ShardSet:
    """Open a finished shard folder for reading. Raises ShardError with the fix when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: no such shard folder. Run `tokenprio score ... --out {folder}` first.")
    manifest = load_manifest(folder)
    paths = shard_paths(folder, manifest)
    if not paths:
        raise ShardError(f"{folder}: the manifest lists no shards (the corpus had no records).")
    return ShardSet(folder=folder, manifest=manifest, metadata=read_metadata(paths[0]), paths=paths)


def read_table(path: Path, columns: list[str] | None = None, validate: bool = True) -> pa.Table:
    """Read one shard (optionally a column subset); check schema version and, by default, row invariants."""
    read_metadata(path)
    table = pq.read_table(path, columns=columns)
    if validate and columns is None:
        validate_table(table, str(path))
    return table


# ----------------------------------------------------------------------------------------------
# Flat token views of a table (for Φ evaluation by `score`, `reweight` and the trainer)


def flat_token_columns(table: pa.Table, names: list[str], label_names: list[str] | None = None) -> tuple[dict, list[str]]:
    """Flatten aligned list columns of `table` into 1-D torch tensors over all positions of all rows.

    Returns (tokens, label_names). tokens always has "loss_mask" (bool) and "seq_index" (int64 row index),
    plus each requested column: float32 for statistics and `weight`, and for "label" int64 codes into
    label_names (-1 where no label). Pass the same `label_names` list across tables to keep codes
    consistent: it is extended in place with new labels. The tensors own their memory.
    """
    import torch

    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    tokens = {
        "loss_mask": torch.from_numpy(pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False).copy()),
        "seq_index": torch.from_numpy(np.repeat(np.arange(table.num_rows, dtype=np.int64), lengths)),
    }
    label_names = [] if label_names is None else label_names
    for name in names:
        if name in ("loss_mask", "seq_index"):
            continue
        flat = pc.list_flatten(table.column(name))
        if name == "label":
            encoded = pc.dictionary_encode(flat).combine_chunks()
            for value in encoded.dictionary.to_pylist():
                if value not in label_names:
                    label_names.append(value)
            to_global = np.array([label_names.index(v) for v in encoded.dictionary.to_pylist()] + [-1], dtype=np.int64)
            local = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            tokens["label"] = torch.from_numpy(to_global[local])  # local -1 picks the trailing -1
        else:
            tokens[name] = torch.from_numpy(np.array(flat.to_numpy(zero_copy_only=False), dtype=np.float32))
    return tokens, label_names


def unflatten(values: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """Inverse of flattening: a list<float32> Arrow array with rows of the given lengths."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.float32, copy=False)))
