"""The shard contract (schema "1.1"; 1.0 shards stay readable): one scored corpus is a folder of `part-NNNNN.parquet` files plus
`_manifest.json` (docs/design.md "The shard contract").

This package is the contract's only implementation; the commands call it and never write Parquet
metadata or manifests themselves:

    schema     column names and types, file names, the `tokenprio` metadata entry, config hashes
    tables     tables built from scored windows, new statistics or Φ, row invariants, flat token views
    files      the atomic writer, a file's manifest entry, the validating reader, `open_shards`
    manifest   task manifests, `finalize`, the checksum a training run records
    documents  records back from rows (each token once, with text and layout), for `tokenprio project`
"""

from scoring.shards.documents import Documents, documents_of
from scoring.shards.files import (
    ShardSet,
    WriteError,
    atomic_write,
    load_manifest,
    open_shards,
    read_metadata,
    read_table,
    row_group_slices,
    shard_entry,
    shard_paths,
    write_json_atomic,
    write_shard_file,
    write_text_atomic,
)
from scoring.shards.integrity import manifest_checksum, rescore_hint, sha256_file, verify_shards
from scoring.shards.locks import OutputBusyError, OutputLock, hold_lock, task_lock_path
from scoring.shards.manifest import (
    build_manifest,
    complete_shard,
    finalize,
    finalize_folder,
    run_metadata,
    summary_line,
    task_manifest_path,
    write_manifest,
    write_task_manifest,
)
from scoring.shards.schema import (
    BASE_FIELDS,
    MANIFEST_NAME,
    METADATA_KEY,
    RECORD_FIELDS,
    ROW_GROUP_TOKENS,
    SCHEMA_VERSION,
    STAT_SUFFIXES,
    TOKEN_LIST_COLUMNS,
    ShardError,
    check_schema_version,
    config_hash,
    corpus_metadata,
    encode_metadata,
    has_record_fields,
    shard_index,
    shard_name,
    shard_schema,
    spec_columns,
    stat_columns,
    stat_prefixes_of,
    tmp_name,
    tokenizer_fingerprint,
    with_metadata,
)
from scoring.shards.tables import (
    check_column_types,
    duplicated_mask,
    flat_token_columns,
    input_ids_digest,
    row_lengths,
    unflatten,
    validate_table,
    windows_table,
    with_statistics,
    with_weight_values,
    with_weights,
)

__all__ = [
    "OutputBusyError", "OutputLock", "WriteError", "atomic_write", "check_column_types", "finalize_folder", "hold_lock", "rescore_hint",
    "task_lock_path", "verify_shards",
    "BASE_FIELDS", "Documents", "MANIFEST_NAME", "METADATA_KEY", "RECORD_FIELDS", "ROW_GROUP_TOKENS", "SCHEMA_VERSION", "STAT_SUFFIXES", "TOKEN_LIST_COLUMNS",
    "ShardError", "ShardSet", "build_manifest", "check_schema_version", "complete_shard", "config_hash", "corpus_metadata",
    "documents_of", "duplicated_mask", "encode_metadata", "finalize", "flat_token_columns", "has_record_fields", "input_ids_digest", "load_manifest", "manifest_checksum",
    "open_shards", "read_metadata", "read_table", "row_group_slices", "row_lengths", "run_metadata", "sha256_file", "shard_entry", "shard_index",
    "shard_name", "shard_paths", "shard_schema", "spec_columns", "stat_columns", "stat_prefixes_of", "summary_line",
    "task_manifest_path", "tmp_name", "tokenizer_fingerprint", "unflatten", "validate_table", "windows_table", "with_metadata",
    "with_statistics", "with_weight_values", "with_weights", "write_json_atomic", "write_manifest", "write_shard_file", "write_task_manifest", "write_text_atomic",
]
