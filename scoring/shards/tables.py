"""Shard tables in memory: built from scored windows, extended with a model's statistics or a new Φ,
validated against the row invariants, and flattened into per-token tensors for Φ evaluation.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring.shards.schema import (
    BASE_FIELDS, METADATA_KEY, RECORD_FIELDS, TOKEN_LIST_COLUMNS, ShardError, shard_schema, stat_columns, stat_prefixes_of,
)


def unflatten(values: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """Inverse of flattening: a list<float32> Arrow array with rows of the given lengths."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.float32, copy=False)))


def row_lengths(table: pa.Table) -> np.ndarray:
    """(rows,) int64 tokens per row."""
    return np.asarray(table.column("n_tokens").to_numpy(), dtype=np.int64)


def windows_table(rows, stats, prefix: str | None, metadata: dict) -> pa.Table:
    """The Arrow table of one shard from its windows, `weight` all zero (see `with_weights`).

    rows: (doc_id, Encoded, Window) per row, in shard order: the record's text and layout (the schema-1.1
    record columns) come from the Encoded. stats: per row (logprob, entropy) float32 arrays of the row's
    length (scoring backends' output), or None for unscored shards; stored as `{prefix}_*`.
    """
    windows = [w for _, _, w in rows]
    layouts = [encoded.layout for _, encoded, _ in rows]
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
        "text": [encoded.text for _, encoded, _ in rows],
        "char_start": [w.char_start for w in windows],
        "char_end": [w.char_end for w in windows],
        "record_kind": [layout.kind for layout in layouts],
        "segments": [[{"role": role, "start": start, "end": end} for role, start, end in layout.segments] for layout in layouts],
        "label_spans": [[{"start": start, "end": end, "label": label} for start, end, label in layout.spans] for layout in layouts],
    }
    prefixes = []
    if stats is not None:
        prefixes = [prefix]
        for name, values in zip(stat_columns(prefix), zip(*stats) if stats else ([], [])):
            columns[name] = unflatten(np.concatenate(values) if values else np.zeros(0), lengths)
    schema = shard_schema(prefixes, metadata, record_fields=True)
    arrays = {f.name: pa.array(columns[f.name], type=f.type) if isinstance(columns[f.name], list) else columns[f.name] for f in schema}
    return pa.table(arrays, schema=schema)


def with_statistics(table: pa.Table, prefix: str, stats) -> pa.Table:
    """`table` with `{prefix}_logprob` / `{prefix}_entropy` set from per-row (logprob, entropy) arrays (replaced if present)."""
    lengths = row_lengths(table)
    for name, values in zip(stat_columns(prefix), zip(*stats) if stats else ([], [])):
        column = unflatten(np.concatenate(values) if values else np.zeros(0), lengths)
        if name in table.schema.names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, pa.list_(pa.float32())), column)
    return table


def with_weights(table: pa.Table, priority) -> pa.Table:
    """Replace the `weight` column by Φ of a parsed offline `priority`, evaluated on the table's stored columns."""
    from scoring.priority import evaluate_priority

    tokens, label_names = flat_token_columns(table, sorted(priority.columns))
    phi = evaluate_priority(priority, tokens, label_names=label_names).numpy()  # (N,) float32
    return table.set_column(table.schema.get_field_index("weight"), "weight", unflatten(phi, row_lengths(table)))


def with_weight_values(table: pa.Table, weight_rows) -> pa.Table:
    """Replace the `weight` column by given per-row Φ values (float32 arrays of each row's length), e.g. projected Φ."""
    column = unflatten(np.concatenate(weight_rows) if len(weight_rows) else np.zeros(0), row_lengths(table))
    return table.set_column(table.schema.get_field_index("weight"), "weight", column)


def input_ids_digest(table: pa.Table) -> str:
    """sha256 of the `input_ids` column (offsets and values): a second model must see exactly these rows."""
    ids = table.column("input_ids").combine_chunks()
    return hashlib.sha256(ids.offsets.to_numpy().tobytes() + ids.values.to_numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Row invariants


def duplicated_mask(values: np.ndarray) -> np.ndarray:
    """Boolean mask of values already seen earlier in the array (first occurrences are False)."""
    _, first = np.unique(values, return_index=True)
    seen = np.ones(len(values), dtype=bool)
    seen[first] = False
    return seen


def check_column_types(schema: pa.Schema, where: str) -> None:
    """Refuse repeated column names and contract columns of another type (the base and record columns, and
    every `{prefix}_logprob` / `{prefix}_entropy` list<float32>); raise ShardError naming the column."""
    repeated = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if repeated:
        raise ShardError(f"{where}: columns {repeated} appear more than once; a shard has each column once. Rewrite it.")
    expected = {f.name: f.type for f in BASE_FIELDS + RECORD_FIELDS}
    expected |= {name: pa.list_(pa.float32()) for name in schema.names if name.endswith(("_logprob", "_entropy"))}
    for name in schema.names:
        if name in expected and schema.field(name).type != expected[name]:
            raise ShardError(f"{where}: column {name!r} is {schema.field(name).type}, the shard contract says {expected[name]}. "
                             "Rewrite the shard through the contract's writers (scoring.frames.write_shards casts a frame).")


def validate_table(table: pa.Table, where: str) -> None:
    """Check the column types and row invariants of a shard table; raise ShardError naming the file, row and column."""
    check_column_types(table.schema, where)
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
    row_start = np.concatenate([[0], np.cumsum(lengths)])
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
        raise ShardError(
            f"{where}: row {row} (id {ids[row]}), position {token - int(row_start[row])}: weight {weight[token]:.6g} where loss_mask is false; "
            "stored Φ is 0 off the mask (multiply the new weights by loss_mask)."
        )
    # Position 0 of each row predicts nothing; statistics are defined (finite) at every t >= 1, except, in
    # projected shards, off the loss mask where the reference has no statistic for those characters.
    first = np.zeros(len(mask), dtype=bool)
    first[row_start[:-1][lengths > 0]] = True
    projected = "projection" in json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    exempt = first | (~mask.astype(bool) if projected else False)
    for name in float_columns:
        values = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
        invalid = ~np.isfinite(values) & ~exempt if name != "weight" else ~np.isfinite(values)
        if invalid.any():
            token = int(np.nonzero(invalid)[0][0])
            row = int(row_of_token[token])
            fix = "recompute it with `tokenprio reweight`" if name == "weight" else "rescore this shard"
            raise ShardError(f"{where}: row {row} (id {ids[row]}), column {name!r}, position {token - int(row_start[row])}: value {values[token]} is not finite; {fix}.")


# ----------------------------------------------------------------------------------------------
# Flat token views (for Φ evaluation by `score`, `reweight` and the trainer)


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
