"""Shards as pandas frames: one row per token for looking (`token_frame`), and the way back to shards for
frames edited in pandas (`write_shards`).

A shard folder reads as one row per window with `pd.read_parquet(folder)`: list columns come back as numpy
arrays aligned with `input_ids`, and the temporary `.part-*.tmp` files and `_manifest.json` are skipped
(pandas and pyarrow ignore names that start with `.` or `_`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from scoring.shards import (
    ShardError,
    open_shards,
    row_group_slices,
    shard_schema,
    stat_columns,
    validate_table,
    with_metadata,
    write_manifest,
    write_shard_file,
)

SHARD_TOKENS = 1_000_000  # tokens per shard written by write_shards (about one row group each)
TOKEN_FRAME_LISTS = ("input_ids", "loss_mask", "weight", "label")  # list columns every token frame needs


# ----------------------------------------------------------------------------------------------
# One row per token


def _arrow_column(df: pd.DataFrame, name: str) -> pa.ChunkedArray:
    """One frame column as Arrow (numpy-array cells, Python lists and Arrow-backed pandas columns alike)."""
    array = pa.array(df[name], from_pandas=True)
    if len(array) == 0 and array.type == pa.null():  # an empty object column: give it a list type to flatten
        array = pa.array([], pa.list_(pa.null()))
    return pa.chunked_array([array])


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    """All list cells of a column concatenated, as one numpy array (object for strings and nulls)."""
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def _list_lengths(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Tokens per row (from `input_ids`), after checking every list column has that many values per row."""
    ids = df["id"].to_numpy()
    lengths = None
    for name in columns:
        column = _arrow_column(df, name)
        if column.null_count:
            row = int(np.nonzero(column.is_null().to_numpy(zero_copy_only=False))[0][0])
            raise ValueError(f"frame row {row} (id {ids[row]}): column {name!r} is null; give a list with one value per token.")
        n = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if lengths is None:
            lengths = n
        bad = np.nonzero(n != lengths)[0]
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"frame row {row} (id {ids[row]}): column {name!r} has {n[row]} values for {lengths[row]} tokens in input_ids.")
    return lengths.astype(np.int64)


def _span_strings(texts: np.ndarray, row_of_token: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """`texts[row][start:end]` for every token (None where start is -1), by one gather over UTF-8 bytes.

    Character indices are Python str indices (code points). All texts are joined, each code point's UTF-8
    byte offset comes from a cumulative sum of its encoded length, and the tokens' byte ranges are gathered
    into one Arrow string array: no Python loop over tokens.
    """
    texts = [text if isinstance(text, str) else "" for text in texts]  # null text: no token has a span
    text_lengths = np.array([len(text) for text in texts], dtype=np.int64)  # (rows,) code points
    has_span = starts >= 0
    too_long = has_span & ((starts > ends) | (ends > text_lengths[row_of_token]))
    if too_long.any():
        token = int(np.nonzero(too_long)[0][0])
        row = int(row_of_token[token])
        raise ValueError(
            f"frame row {row}: char span [{starts[token]}, {ends[token]}) does not fit its text of {text_lengths[row]} characters; "
            "char_start/char_end must index the row's `text` (or pass a tokenizer to decode tokens instead)."
        )
    joined = "".join(texts)
    code_points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    utf8_length = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    byte_of_char = np.concatenate([[0], np.cumsum(utf8_length, dtype=np.int64)])  # (chars + 1,)
    row_first_char = np.concatenate([[0], np.cumsum(text_lengths)])[:-1]  # (rows,)
    first_char = row_first_char[row_of_token]
    byte_start = byte_of_char[first_char + np.where(has_span, starts, 0)]
    byte_end = byte_of_char[first_char + np.where(has_span, ends, 0)]
    n_bytes = byte_end - byte_start  # (tokens,)
    offsets = np.concatenate([[0], np.cumsum(n_bytes)]).astype(np.int64)
    gather = np.repeat(byte_start - offsets[:-1], n_bytes) + np.arange(offsets[-1], dtype=np.int64)
    utf8 = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
    strings = pa.LargeStringArray.from_buffers(len(n_bytes), pa.py_buffer(offsets), pa.py_buffer(utf8[gather].tobytes()))
    tokens = strings.to_numpy(zero_copy_only=False).astype(object)
    tokens[~has_span] = None
    return tokens


def _decoded_tokens(tokenizer, input_ids: np.ndarray) -> np.ndarray:
    """Each id decoded on its own, decoding every distinct id once (the vocabulary, not the tokens)."""
    unique_ids, inverse = np.unique(input_ids, return_inverse=True)
    pieces = np.array([tokenizer.decode([int(i)]) for i in unique_ids], dtype=object)
    return pieces[inverse]


def token_frame(df: pd.DataFrame, tokenizer=None) -> pd.DataFrame:
    """One row per token of a window frame (e.g. `pd.read_parquet(shards)`), the aligned lists exploded.

    Columns: id, doc_id, window (repeated per token), position (t within the row, int32), input_id (int32),
    token, loss_mask (bool), weight (float32 Φ), label (str, missing where none), char_start and char_end
    (int32, when the frame has them), every `{prefix}_logprob` and `{prefix}_entropy` (float32 nats, NaN at
    position 0) and `{prefix}_nll` = −`{prefix}_logprob`.
    `token` is `tokenizer.decode([input_id])` when a tokenizer is given, else `text[char_start:char_end]`
    (missing for tokens without a span, char_start = −1, such as template specials). Values are copied
    exactly: nothing is recomputed except nll. Raises ValueError naming the row when lists disagree in length.
    """
    prefixes = [c[: -len("_logprob")] for c in df.columns if c.endswith("_logprob") and f"{c[:-8]}_entropy" in df.columns]
    span_columns = [name for name in ("char_start", "char_end") if name in df.columns or tokenizer is None]
    lists = list(TOKEN_FRAME_LISTS) + span_columns + [c for p in prefixes for c in stat_columns(p)]
    needed = ["id", "doc_id", "window"] + lists + ([] if tokenizer is not None else ["text"])
    missing = [name for name in needed if name not in df.columns]
    if missing:
        raise ValueError(f"token_frame: the frame has no columns {missing}; pass a frame read from shards (pd.read_parquet(folder)).")
    lengths = _list_lengths(df, lists)  # (rows,)
    row_of_token = np.repeat(np.arange(len(df)), lengths)  # (tokens,)
    row_start = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    input_ids = _flat(_arrow_column(df, "input_ids")).astype(np.int32)
    spans = {name: _flat(_arrow_column(df, name)).astype(np.int32) for name in span_columns}
    if tokenizer is not None:
        tokens = _decoded_tokens(tokenizer, input_ids)
    else:
        starts, ends = spans["char_start"].astype(np.int64), spans["char_end"].astype(np.int64)
        tokens = _span_strings(df["text"].to_numpy(dtype=object), row_of_token, starts, ends)
    out = {
        "id": df["id"].to_numpy(dtype=object)[row_of_token],
        "doc_id": df["doc_id"].to_numpy(dtype=object)[row_of_token],
        "window": df["window"].to_numpy().astype(np.int32)[row_of_token],
        "position": (np.arange(len(row_of_token)) - row_start[row_of_token]).astype(np.int32),
        "input_id": input_ids,
        "token": tokens,
        "loss_mask": _flat(_arrow_column(df, "loss_mask")).astype(bool),
        "weight": _flat(_arrow_column(df, "weight")).astype(np.float32),
        "label": _flat(_arrow_column(df, "label")).astype(object),
        **spans,
    }
    for prefix in prefixes:
        logprob = _flat(_arrow_column(df, f"{prefix}_logprob")).astype(np.float32)
        out[f"{prefix}_logprob"] = logprob
        out[f"{prefix}_entropy"] = _flat(_arrow_column(df, f"{prefix}_entropy")).astype(np.float32)
        out[f"{prefix}_nll"] = -logprob
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------
# Back to shards


def _check_destination(source: Path, out: Path) -> None:
    source_dir, out_dir = source.resolve(), out.resolve()
    if out_dir == source_dir or source_dir in out_dir.parents:
        raise ValueError(f"{out}: is the source shard folder {source} or inside it; write the edited frame to a new folder.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; write the edited frame to a new folder or remove {out} first.")


def frame_to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Cast a window frame to a shard schema, column by column; raise ShardError naming the column.

    Accepts what pandas hands back: large_string, Python lists, float64 or int64 cells. Extra columns are
    refused rather than dropped, so an edit never silently disappears.
    """
    missing = [name for name in schema.names if name not in df.columns]
    extra = [str(name) for name in df.columns if name not in schema.names]
    if missing or extra:
        raise ShardError(
            f"frame columns do not match the source shards: missing {missing}, not in the shard schema {extra}. "
            f"Keep the columns of pd.read_parquet(source) and drop helpers (df.drop(columns={extra}))."
        )
    columns = []
    for field in schema:
        try:
            columns.append(_arrow_column(df, field.name).cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ShardError(f"frame column {field.name!r} cannot be cast to {field.type}: {error}") from error
        if field.name != "text" and columns[-1].null_count:
            row = int(np.nonzero(columns[-1].is_null().to_numpy(zero_copy_only=False))[0][0])
            raise ShardError(f"frame row {row}: column {field.name!r} is null (None or NaN); every row needs a value there.")
    return pa.Table.from_arrays(columns, schema=schema)


def write_shards(df: pd.DataFrame, like: str | Path, out: str | Path) -> dict:
    """Write a window frame edited in pandas as a new shard folder with the metadata of the folder `like`.

    The frame is cast to `like`'s shard schema (its statistic prefixes and `tokenprio` metadata), validated
    (`validate_table`: aligned lists, unique ids, Φ = 0 off the mask; errors name the row and column), split into
    shards of about SHARD_TOKENS tokens in frame order and written atomically; the manifest comes last and
    records the source under `edited_from`. Refuses `out` equal to or inside `like`, or a non-empty `out`.
    Returns the manifest.
    """
    source = open_shards(like)
    out = Path(out)
    _check_destination(source.folder, out)
    if df.empty:
        raise ValueError(f"write_shards: the frame has no rows; nothing to write to {out}.")
    # Per-shard facts of the source (its index, record counts, input_ids hash) do not describe the new shards.
    metadata = {key: value for key, value in source.metadata.items() if key != "shard"}
    table = frame_to_table(df, shard_schema(source.stat_prefixes, metadata, record_fields=source.has_record_fields))
    validate_table(table, f"frame for {out}")

    entries = []
    for index, (start, end) in enumerate(row_group_slices(table.column("n_tokens").to_numpy(), SHARD_TOKENS)):
        part = table.slice(start, end - start)
        records = int(pc.sum(pc.equal(part.column("window"), 0)).as_py() or 0)  # each document has one window 0
        shard_info = {"index": index, "records": records}
        part = with_metadata(part, metadata | {"shard": shard_info})
        entries.append(write_shard_file(part, out, index))
    return write_manifest(out, entries, metadata, edited_from={"folder": str(source.folder), "checksum": source.manifest["checksum"]})
