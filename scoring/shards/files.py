"""Shard files on disk: the atomic writer, each file's manifest entry, the validating reader and `open_shards`.

Every file tokenprio writes (shards, manifests, reports) goes through `atomic_write`: a temporary dot-name
unique to the writing process, fsync, rename. A reader never sees half a file, a rerun after a crash finds
either a complete file or none, and an OSError on the way (full disk, I/O error, no permission) removes the
temporary file and stops with a WriteError naming the path, the cause and the fix.
"""

from __future__ import annotations

import errno
import glob
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
from scoring.shards.integrity import manifest_checksum, sha256_file, verify_shards
from scoring.shards.tables import check_column_types, validate_table


# ----------------------------------------------------------------------------------------------
# Writing


class WriteError(OSError, ValueError):
    """An OSError (full disk, I/O error, no permission) while writing an output file. The message names the file,
    the cause and the fix; nothing partial is left (the temporary file is removed, the file's old version, if
    any, is untouched). An OSError (keeps `errno`) and a ValueError (the CLI prints it as one line)."""

    def __init__(self, path: Path, error: OSError):
        code = error.errno if isinstance(error.errno, int) else None
        cause = f"{error.strerror or error} ({errno.errorcode.get(code, 'OSError')})" if code else str(error)
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = "free space on that file system (or write to another folder)"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "make the folder writable (or write to another folder)"
        else:
            fix = "check the disk and the file system"
        message = (f"cannot write {path}: {cause}. Nothing partial was left (the temporary file was removed; files written before "
                   f"it are intact); {fix}, then rerun the same command (score and add-model skip the shards already complete).")
        super().__init__(code, message, str(path))

    def __str__(self) -> str:
        return self.strerror


def atomic_write(path: Path, write) -> None:
    """Write `path` through `write(tmp_path)` under a temporary dot-name unique to this process, fsync, rename.

    Temporary files of `path` left by killed writers are removed first. Any OSError (in `write`, the fsync or
    the rename) becomes a WriteError; on any error the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(tmp_name(path.name))
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{glob.escape(path.name)}.*tmp"):  # this name's, from writers that died
                stale.unlink(missing_ok=True)
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as error:
            raise WriteError(path, error) from error
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the disk refuses even that; the temporary name is hidden and the next writer removes it
            pass
        raise


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
    final_path = Path(out_dir) / shard_name(index)
    n_tokens = table.column("n_tokens").to_numpy()

    def write(tmp_path: Path) -> None:
        with pq.ParquetWriter(tmp_path, table.schema, compression="zstd", write_statistics=False) as writer:
            for start, end in row_group_slices(n_tokens):
                writer.write_table(table.slice(start, end - start), row_group_size=max(1, end - start))

    atomic_write(final_path, write)
    return shard_entry(final_path)


def shard_entry(path: Path) -> dict:
    """The manifest entry of a written shard, read back from the file: sizes per row group, file size and checksum."""
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
        "bytes": path.stat().st_size,
        "row_groups": row_groups,
    }


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically (`atomic_write`): readers never see half a file."""
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# Reading


DAMAGED_FIX = "it is damaged or not a tokenprio shard: rescore it (remove it and rerun the command that wrote its folder)"
SHOWN_ERROR_CHARS = 300  # of a library's error message (pyarrow's may print a whole schema)


def _cause(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= SHOWN_ERROR_CHARS else text[:SHOWN_ERROR_CHARS] + " ..."


def parse_json(raw: str | bytes, where: str, fix: str):
    """json.loads, or ShardError naming `where` and `fix` for text that is not JSON, not UTF-8 or nested too deeply."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, integers too long; deep nesting
        raise ShardError(f"{where} is not valid JSON ({_cause(error)}); {fix}.") from None


def read_schema(path: Path) -> pa.Schema:
    """The Arrow schema of a shard file; ShardError for a file pyarrow cannot read (a damaged footer, truncated, not Parquet)."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"{path}: not a readable Parquet file ({_cause(error)}); {DAMAGED_FIX}.") from error


def read_metadata(path: Path) -> dict:
    """The `tokenprio` metadata of one shard file, with its schema version checked. Raises ShardError for a file
    pyarrow cannot read, metadata that is missing or not a JSON object, and an unknown schema version."""
    raw = (read_schema(path).metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(f"{path}: no 'tokenprio' metadata; this is not a tokenprio shard. Write frames with write_shards(df, like=...).")
    metadata = parse_json(raw, f"{path}: its 'tokenprio' metadata", DAMAGED_FIX)
    if not isinstance(metadata, dict):
        raise ShardError(f"{path}: its 'tokenprio' metadata is a JSON {type(metadata).__name__}, not an object; {DAMAGED_FIX}.")
    check_schema_version(metadata.get("schema_version", "?"), str(path))
    return metadata


def load_manifest(folder: Path) -> dict:
    """Read and check `_manifest.json`: valid JSON, schema version, its checksum over the shard entries, and
    every listed shard present."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        hint = f" (task manifests found: run `tokenprio finalize {folder}`)" if list(folder.glob("_manifest.task-*.json")) else ""
        raise ShardError(f"{folder}: no {MANIFEST_NAME}; not a finished tokenprio shard folder{hint}.")
    rebuild = (f"rebuild it with `tokenprio finalize {folder}` (from the task manifests) or rerun the command that wrote {folder}")
    manifest = parse_json(path.read_bytes(), f"{path}: the manifest", rebuild)
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: not a manifest (a JSON {type(manifest).__name__}); {rebuild}.")
    check_schema_version(manifest.get("schema_version", "?"), str(path))
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "index", "sha256"} <= s.keys() for s in shards):
        raise ShardError(f"{path}: its 'shards' entries are malformed (each needs file, index and sha256); {rebuild}.")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise ShardError(f"{path}: its checksum {manifest.get('checksum')} does not match its shard entries ({manifest_checksum(manifest)}); "
                         f"the manifest was edited or damaged: {rebuild}.")
    for shard in shards:
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


def open_shards(folder: str | Path, verify: bool = True) -> ShardSet:
    """Open a finished shard folder for reading. Raises ShardError with the fix when it is not one.

    With `verify` (every reader), each shard is checked before anything reads it: its size and sha256 against
    the manifest, no Parquet file the manifest does not list (scoring.shards.integrity.verify_shards), its
    schema version, column types, and the same columns in every shard. `verify=False` is for a writer that
    replaces the folder's shards in place (add-model --in-place) and verifies each shard as it reads it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: no such shard folder. Run `tokenprio score ... --out {folder}` first.")
    manifest = load_manifest(folder)
    paths = shard_paths(folder, manifest)
    if not paths:
        raise ShardError(f"{folder}: the manifest lists no shards (the corpus had no records).")
    if verify:
        verify_shards(folder, manifest, paths)
        names = None
        for path in paths:
            read_metadata(path)
            schema = read_schema(path)
            check_column_types(schema, str(path))
            if names is not None and schema.names != names:
                raise ShardError(f"{path}: columns {schema.names} differ from {paths[0].name}'s {names}; every shard of a folder has the "
                                 f"same columns. Rewrite {folder} with the command that wrote it.")
            names = schema.names
    return ShardSet(folder=folder, manifest=manifest, metadata=read_metadata(paths[0]), paths=paths)


def read_table(path: Path, columns: list[str] | None = None, validate: bool = True) -> pa.Table:
    """Read one shard (optionally a column subset); check schema version, column types and, by default, row
    invariants. Raises ShardError, never a pyarrow error, for a file that cannot be read."""
    read_metadata(path)
    check_column_types(read_schema(path), str(path))
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"{path}: cannot be read ({_cause(error)}); {DAMAGED_FIX}.") from error
    if validate and columns is None:
        validate_table(table, str(path))
    return table
