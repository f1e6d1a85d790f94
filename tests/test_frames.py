"""token_frame and write_shards against hand-made shards: exact round trips and clear refusals.

Run: .venv/bin/pytest -q tests/test_frames.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from scoring import frames
from scoring.frames import token_frame, write_shards
from scoring.shards import (
    MANIFEST_NAME,
    ShardError,
    build_manifest,
    open_shards,
    read_table,
    shard_schema,
    write_json_atomic,
    write_shard_file,
)

NAN = math.nan
METADATA = {
    "schema_version": "1.0",
    "models": {"ref": {"name": "tiny-ref", "dtype": "float32"}, "base": {"name": "tiny-base", "dtype": "float32"}},
    "tokenizer": {"fingerprint": "abc123"},
    "priority": "labels(toxic=-1)",
}

# Three windows of two documents. Doc b is long: window 1 repeats one context token ("x", mask false).
# Text has a 4-byte character and HTML specials, so span slicing and escaping are both exercised.
ROWS = [
    {
        "id": "a:0", "doc_id": "a", "window": 0, "n_context": 0, "n_tokens": 4, "n_targets": 3,
        "input_ids": [1, 10, 11, 12], "loss_mask": [False, True, True, True], "weight": [0.0, 1.0, -1.0, 0.5],
        "label": [None, None, "toxic", None], "text": "Hi <b>!",
        "char_start": [-1, 0, 2, 6], "char_end": [-1, 2, 6, 7],
        "ref_logprob": [NAN, -1.0, -2.0, -0.5], "ref_entropy": [NAN, 1.5, 2.5, 0.25],
        "base_logprob": [NAN, -2.0, -1.0, -1.0], "base_entropy": [NAN, 1.0, 1.0, 1.0],
    },
    {
        "id": "b:0", "doc_id": "b", "window": 0, "n_context": 0, "n_tokens": 4, "n_targets": 2,
        "input_ids": [1, 20, 21, 22], "loss_mask": [False, True, False, True], "weight": [0.0, 0.0, 0.0, 2.0],
        "label": [None, "toxic", None, "code"], "text": "Ünï 😀x yz",
        "char_start": [-1, 0, 3, 5], "char_end": [-1, 3, 5, 6],
        "ref_logprob": [NAN, -3.0, -0.25, -4.0], "ref_entropy": [NAN, 0.5, 1.0, 2.0],
        "base_logprob": [NAN, -1.0, -1.0, -3.0], "base_entropy": [NAN, 2.0, 2.0, 2.0],
    },
    {
        "id": "b:1", "doc_id": "b", "window": 1, "n_context": 1, "n_tokens": 2, "n_targets": 1,
        "input_ids": [22, 23], "loss_mask": [False, True], "weight": [0.0, -0.5],
        "label": [None, None], "text": "Ünï 😀x yz",
        "char_start": [5, 6], "char_end": [6, 9],
        "ref_logprob": [NAN, -1.25], "ref_entropy": [NAN, 0.1],
        "base_logprob": [NAN, -0.5], "base_entropy": [NAN, 0.5],
    },
]
TOKENS = [None, "Hi", " <b>", "!", None, "Ünï", " 😀", "x", "x", " yz"]


def write_hand_shards(folder: Path, rows: list[dict] = ROWS, shard_rows: tuple = ((0,), (1, 2)), prefixes: tuple = ("ref", "base")) -> Path:
    """Write `rows` as shards (row indices per shard) with the contract's own writer and a manifest."""
    entries = []
    for index, members in enumerate(shard_rows):
        # Per-shard facts as the scorer records them; write_shards must not copy them onto new shards.
        schema = shard_schema(list(prefixes), METADATA | {"shard": {"index": index, "input_ids_sha256": "stale"}})
        table = pd.DataFrame([rows[i] for i in members])
        entries.append(write_shard_file(pa.Table.from_pandas(table, schema=schema, preserve_index=False), folder, index))
    write_json_atomic(folder / MANIFEST_NAME, build_manifest(entries, METADATA))
    return folder


def nullable(series: pd.Series) -> list:
    """Values with missing ones as None (pandas' str dtype holds them as NaN)."""
    return [None if pd.isna(value) else value for value in series]


def flat(name: str) -> list:
    return [value for row in ROWS for value in row[name]]


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_hand_shards(tmp_path / "shards")


def test_read_parquet_skips_temporary_files_and_manifests(shards):
    (shards / ".part-00002.parquet.tmp").write_bytes(b"half-written garbage")
    (shards / "_manifest.task-0.json").write_text("{}")
    df = pd.read_parquet(shards)
    assert df["id"].tolist() == ["a:0", "b:0", "b:1"]
    assert [list(ids) for ids in df["input_ids"]] == [row["input_ids"] for row in ROWS]


def test_token_frame_explodes_every_column_exactly(shards):
    tf = token_frame(pd.read_parquet(shards))
    assert len(tf) == 10
    assert tf["id"].tolist() == ["a:0"] * 4 + ["b:0"] * 4 + ["b:1"] * 2
    assert tf["doc_id"].tolist() == ["a"] * 4 + ["b"] * 6
    assert tf["window"].tolist() == [0] * 8 + [1] * 2
    assert tf["position"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert tf["input_id"].tolist() == flat("input_ids")
    assert nullable(tf["token"]) == TOKENS
    assert tf["loss_mask"].tolist() == flat("loss_mask")
    assert nullable(tf["label"]) == flat("label")
    assert tf["char_start"].tolist() == flat("char_start") and tf["char_end"].tolist() == flat("char_end")
    for name in ("weight", "ref_logprob", "ref_entropy", "base_logprob", "base_entropy"):
        assert tf[name].dtype == np.float32, name
        np.testing.assert_array_equal(tf[name].to_numpy(), np.array(flat(name), dtype=np.float32), err_msg=name)
    np.testing.assert_array_equal(tf["ref_nll"].to_numpy(), -np.array(flat("ref_logprob"), dtype=np.float32))
    np.testing.assert_array_equal(tf["base_nll"].to_numpy(), -np.array(flat("base_logprob"), dtype=np.float32))


def test_token_frame_of_selected_rows_and_of_no_rows(shards):
    df = pd.read_parquet(shards)
    tf = token_frame(df.iloc[[2, 0]])  # rows in any order, index labels ignored
    assert tf["id"].tolist() == ["b:1"] * 2 + ["a:0"] * 4 and nullable(tf["token"]) == TOKENS[8:] + TOKENS[:4]
    empty = token_frame(df.iloc[:0])
    assert len(empty) == 0 and {"token", "weight", "ref_nll", "char_start"} <= set(empty.columns)


def test_token_frame_decodes_ids_with_a_tokenizer(tokenizer):
    ids = tokenizer("The quick brown fox <|im_end|> lazy dog.")["input_ids"]
    df = pd.DataFrame(
        {"id": ["d:0"], "doc_id": ["d"], "window": [0], "input_ids": [ids], "loss_mask": [[True] * len(ids)],
         "weight": [[1.0] * len(ids)], "label": [[None] * len(ids)]}
    )
    tf = token_frame(df, tokenizer=tokenizer)
    assert tf["token"].tolist() == [tokenizer.decode([i]) for i in ids]
    assert "<|im_end|>" in tf["token"].tolist() and tf["token"].iloc[0] == "<s>"


def test_token_frame_names_the_row_of_a_length_mismatch(shards):
    df = pd.read_parquet(shards)
    df.at[1, "weight"] = np.array([0.0, 1.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"frame row 1 \(id b:0\): column 'weight' has 2 values for 4 tokens"):
        token_frame(df)


def test_write_shards_round_trips_an_edited_frame(shards, tmp_path):
    df = pd.read_parquet(shards)
    df["weight"] = [np.asarray(w, dtype=np.float64) * 3 for w in df["weight"]]  # float64 cells, as pandas edits give
    manifest = write_shards(df, like=shards, out=tmp_path / "edited")

    back = pd.read_parquet(tmp_path / "edited")
    for got, row in zip(back["weight"], ROWS):
        np.testing.assert_array_equal(got, np.array(row["weight"], dtype=np.float32) * 3)
    pd.testing.assert_frame_equal(back.drop(columns="weight"), pd.read_parquet(shards).drop(columns="weight"))
    edited = open_shards(tmp_path / "edited")
    assert edited.metadata == METADATA | {"shard": {"index": 0, "records": 2}} and edited.stat_prefixes == ["ref", "base"]
    assert manifest["metadata"] == METADATA and manifest["edited_from"]["folder"] == str(shards)
    assert manifest["totals"] == {"records": 2, "skipped_records": 0, "truncated_tokens": 0, "rows": 3, "tokens": 10, "targets": 6}
    assert json.loads((tmp_path / "edited" / MANIFEST_NAME).read_text()) == manifest
    read_table(edited.paths[0])  # full validation passes


def test_write_shards_accepts_arrow_backed_frames(shards, tmp_path):
    df = pd.read_parquet(shards, dtype_backend="pyarrow")  # large_string and Arrow list columns
    write_shards(df, like=shards, out=tmp_path / "copy")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "copy"), pd.read_parquet(shards))


def test_write_shards_splits_into_shards_of_about_shard_tokens(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(frames, "SHARD_TOKENS", 4)
    manifest = write_shards(pd.read_parquet(shards), like=shards, out=tmp_path / "split")
    assert [(s["file"], s["rows"], s["tokens"], s["targets"]) for s in manifest["shards"]] == [
        ("part-00000.parquet", 1, 4, 3),
        ("part-00001.parquet", 1, 4, 2),
        ("part-00002.parquet", 1, 2, 1),
    ]
    assert pd.read_parquet(tmp_path / "split")["id"].tolist() == ["a:0", "b:0", "b:1"]


def _shorter_weight(df):
    df.at[1, "weight"] = [0.0, 0.0, 2.0]


def _nan_weight(df):
    df.at[0, "weight"] = [0.0, 1.0, NAN, 0.5]


def _weight_off_mask(df):
    df.at[1, "weight"] = [0.0, 0.0, 0.7, 2.0]


def _helper_column(df):
    df["note"] = "x"


def _duplicate_row(df):
    df.loc[3] = df.loc[0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (_shorter_weight, r"row 1: column 'weight' has 3 values for 4 tokens"),
        (_nan_weight, r"row 0 \(id a:0\), column 'weight', position 2: value nan is not finite"),
        (_weight_off_mask, r"row 1 \(id b:0\), position 2: weight 0.7 where loss_mask is false"),
        (_helper_column, r"not in the shard schema \['note'\]"),
        (_duplicate_row, r"row 3: id 'a:0' appears twice"),
    ],
)
def test_write_shards_rejects_bad_edits_naming_row_and_column(shards, tmp_path, edit, message):
    df = pd.read_parquet(shards)
    edit(df)
    with pytest.raises(ShardError, match=message):
        write_shards(df, like=shards, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_write_shards_refuses_to_overwrite(shards, tmp_path):
    df = pd.read_parquet(shards)
    with pytest.raises(ValueError, match="is the source shard folder"):
        write_shards(df, like=shards, out=shards)
    with pytest.raises(ValueError, match="is the source shard folder"):
        write_shards(df, like=shards, out=shards / "inside")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        write_shards(df, like=shards, out=tmp_path / "used")
