"""Shard files on disk: the atomic writer, each file's manifest entry, the validating reader and `open_shards`.

Every file is written under a temporary dot-name, fsynced and renamed, so a reader never sees half a file
and a rerun after a crash finds either a complete shard or none.
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

from scoring.shards.schema import (
    MANIFEST_NAME,
    METADATA_KEY,
    ROW_GROUP_TOKENS,
    ShardError,
    check_schema_version,
    has_record_fields,
    shard_index,
    shard_name,
    spec_columns,
    stat_prefixes_of,
    tmp_name,
)
from scoring.shards.tables import validate_table


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
        "index": shard_index(path),
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


# ----------------------------------------------------------------------------------------------
# Reading


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
        hint = f" (task manifests found: run `tokenprio finalize {folder}`)" if list(folder.glob("_manifest.task-*.json")) else ""
        raise ShardError(f"{folder}: no {MANIFEST_NAME}; not a finished tokenprio shard folder{hint}.")
    manifest = json.loads(path.read_text())
    check_schema_version(manifest.get("schema_version", "?"), str(path))
    for shard in manifest["shards"]:
        if not (folder / shard["file"]).exists():
            raise ShardError(f"{path}: lists {shard['file']}, which is missing. Rerun the command that wrote {folder}.")
    return manifest


def shard_paths(folder: Path, manifest: dict) -> list[Path]:
    return [Path(folder) / s["file"] for s in sorted(manifest["shards"], key=lambda s: s["index"])]


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

    @property
    def has_record_fields(self) -> bool:
        """Whether the shards carry the schema-1.1 record columns (how each `text` was built)."""
        return has_record_fields(pq.read_schema(self.paths[0]))

    @property
    def spec_columns(self) -> set[str]:
        """The stored columns a Φ spec may read here: weight, label and every model's statistics."""
        return spec_columns(self.stat_prefixes)


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
