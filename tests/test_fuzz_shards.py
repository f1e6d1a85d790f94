"""Fuzzing the shard reader with hypothesis (issue 14, item 4).

Starting from a valid shard (records, layout and reference statistics), files are truncated, bit-flipped (in the
data pages and, more often, in the Parquet footer), or rewritten with their schema altered (columns dropped,
renamed, retyped or repeated; the `tokenprio` metadata removed, replaced by bytes that are not JSON, by JSON that
is not an object, nested too deeply, or with any schema_version), and manifests are damaged the same ways. Every
outcome is either a ShardError that names the file (and the fix) or, where the change left a valid shard, a
table that passes the contract's checks. Never a pyarrow, json, KeyError or RecursionError exception.

Two readers: the file readers (`read_metadata`, `read_table`), and `open_shards` over a folder whose manifest
describes the altered file (a writer that broke the contract and recorded it faithfully), then `read_table` of
each shard. Example counts are fixed and the search is derandomized (as in tests/test_fuzz_inputs.py).

Run: .venv/bin/pytest -q tests/test_fuzz_shards.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pipelines.score import ScoreConfig, score
from scoring.shards import (
    MANIFEST_NAME,
    METADATA_KEY,
    ShardError,
    build_manifest,
    open_shards,
    read_metadata,
    read_table,
    sha256_file,
    with_statistics,
    write_json_atomic,
    write_shard_file,
)

FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
SCHEMA_FUZZ = settings(FUZZ, max_examples=150)

RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog.", "spans": [{"start": 4, "end": 9, "label": "toxic"}]},
    {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you!"}]},
    {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    {"text": "To be, or not to be, that is the question. " * 3},
]


@pytest.fixture(scope="module")
def valid_shard(tmp_path_factory, tokenizer_dir) -> Path:
    """One valid schema-1.1 shard with ref statistics (random values: the reader does not care where they came from)."""
    work = tmp_path_factory.mktemp("fuzz_shards")
    (work / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    score(ScoreConfig(inputs=(str(work / "corpus.jsonl"),), out=str(work / "unscored"), tokenizer=str(tokenizer_dir), max_length=16, n_context=4))
    path = work / "unscored" / "part-00000.parquet"
    table, rng = read_table(path), np.random.default_rng(0)
    stats = []
    for n in table.column("n_tokens").to_numpy():
        logprob, entropy = -rng.uniform(0.1, 6, n).astype(np.float32), rng.uniform(0.1, 5, n).astype(np.float32)
        logprob[0] = entropy[0] = np.nan
        stats.append((logprob, entropy))
    table = with_statistics(table, "ref", stats).replace_schema_metadata(pq.read_schema(path).metadata)
    write_shard_file(table, work / "valid", 0)
    return work / "valid" / "part-00000.parquet"


def outcome_of_file(path: Path) -> str:
    """'refused' (a ShardError naming the file) or 'read' (a table that passed the checks); anything else escapes."""
    try:
        read_metadata(path)
        read_table(path)
    except ShardError as error:
        assert str(path) in str(error), error
        return "refused"
    return "read"


def outcome_of_folder(folder: Path) -> str:
    """open_shards (verification, schema checks), then every shard read; the manifest describes the files as they are."""
    try:
        shards = open_shards(folder)
        shards.stat_prefixes, shards.spec_columns, shards.has_record_fields  # noqa: B018 (each reads the schema)
        for path in shards.paths:
            read_table(path)
    except ShardError as error:
        assert str(folder) in str(error), error
        return "refused"
    return "read"


def faithful_folder(work: Path, data: bytes) -> Path:
    """A folder holding `data` as its one shard, with a manifest entry that matches the bytes."""
    folder = work / "folder"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "part-00000.parquet").write_bytes(data)
    entry = {"file": "part-00000.parquet", "index": 0, "rows": 1, "tokens": 1, "targets": 1, "records": 1, "skipped_records": 0,
             "truncated_tokens": 0, "sha256": sha256_file(folder / "part-00000.parquet"), "bytes": len(data), "row_groups": [{"rows": 1, "tokens": 1, "targets": 1}]}
    write_json_atomic(folder / MANIFEST_NAME, build_manifest([entry], {"schema_version": "1.1"}))
    return folder


def check_both(data: bytes) -> set[str]:
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "part-00000.parquet"
        path.write_bytes(data)
        outcomes = (outcome_of_file(path), outcome_of_folder(faithful_folder(Path(work), data)))
        event(f"file reader: {outcomes[0]}, folder reader: {outcomes[1]}")  # pytest --hypothesis-show-statistics
        return set(outcomes)


# ---- damaged bytes -----------------------------------------------------------------------------


@given(cut=st.floats(0.0, 1.0, exclude_max=True))
@settings(FUZZ, max_examples=60)
@example(cut=0.0)
def test_truncated_shards_are_refused(valid_shard, cut):
    data = valid_shard.read_bytes()
    assert check_both(data[: int(cut * len(data))]) == {"refused"}  # a Parquet file without its tail is never readable


FLIPS = st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7), st.booleans()), min_size=1, max_size=3)


@given(flips=FLIPS)
@settings(FUZZ)
def test_bit_flipped_shards_are_refused_or_read_as_valid(valid_shard, flips):
    """The file readers alone (no manifest) may read a flip that leaves valid values; they never raise anything else.
    With the manifest recording the original bytes, every flip is refused (tests/test_verify_shards.py)."""
    data = bytearray(valid_shard.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for where, bit, in_footer in flips:
        offset = footer_start + int(where * (len(data) - footer_start)) if in_footer else int(where * footer_start)
        data[offset] ^= 1 << bit
    assert check_both(bytes(data)) <= {"refused", "read"}


# ---- altered schemas and metadata --------------------------------------------------------------

NAME = st.text(st.characters(codec="utf-8"), max_size=12)


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


METADATA = st.one_of(
    st.just(None),  # removed
    st.binary(max_size=40),  # not JSON, not UTF-8
    st.builds(lambda v: json.dumps(v).encode(), st.none() | st.booleans() | st.integers() | st.floats() | NAME | st.lists(st.integers(), max_size=3)),
    st.builds(lambda v: json.dumps({"schema_version": v}).encode(), st.none() | st.integers() | st.floats() | NAME | st.sampled_from(["1.0", "1.1", "1.9", "2.0", "0.1", "1"])),
    st.builds(deep_json, st.integers(500, 50_000)),
    st.builds(lambda n: json.dumps({"schema_version": "1.1", "x": int("9" * n)}).encode() if n < 4000 else b'{"schema_version": "1.1", "x": ' + b"9" * n + b"}",
              st.integers(1, 6000)),
)
RETYPES = [pa.int64(), pa.float64(), pa.string(), pa.large_string(), pa.list_(pa.int64()), pa.list_(pa.float64()), pa.list_(pa.string()),
           pa.large_list(pa.int32()), pa.bool_(), pa.list_(pa.bool_())]


def retyped(column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    """`column` cast to `to` where Arrow can, else a column of that type holding nulls (same length)."""
    try:
        return column.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.chunked_array([pa.nulls(len(column), to)])


@st.composite
def alterations(draw, names: list[str]):
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "rename", "retype", "repeat", "metadata"]))
        target = draw(st.sampled_from(names))
        if kind == "rename":
            ops.append((kind, target, draw(st.one_of(st.sampled_from(names), NAME))))
        elif kind == "retype":
            ops.append((kind, target, draw(st.sampled_from(RETYPES))))
        elif kind == "metadata":
            ops.append((kind, None, draw(METADATA)))
        else:
            ops.append((kind, target, None))
    return ops


def altered(table: pa.Table, ops) -> pa.Table:
    metadata = dict(table.schema.metadata)
    for kind, name, value in ops:
        index = table.schema.get_field_index(name) if name is not None else None
        if index == -1:
            continue  # an earlier operation removed, renamed or repeated it
        if kind == "drop" and table.num_columns > 1:
            table = table.remove_column(index)
        elif kind == "rename":
            table = table.rename_columns([value if i == index else n for i, n in enumerate(table.schema.names)])
        elif kind == "retype":
            table = table.set_column(index, pa.field(name, value), retyped(table.column(index), value))
        elif kind == "repeat":
            table = table.append_column(name, table.column(index))
        elif kind == "metadata":
            metadata = {k: v for k, v in metadata.items() if k != METADATA_KEY} | ({METADATA_KEY: value} if value is not None else {})
    return table.replace_schema_metadata(metadata)


@given(data=st.data())
@settings(SCHEMA_FUZZ)
@example(data=None)  # the unaltered shard reads
def test_schema_altered_shards_are_refused_with_the_column_named(valid_shard, data):
    table = pq.read_table(valid_shard)
    ops = [] if data is None else data.draw(alterations(table.schema.names))
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "altered.parquet"
        pq.write_table(altered(table, ops), path)
        outcomes = check_both(path.read_bytes())
    assert outcomes <= {"refused", "read"}
    if data is None:
        assert outcomes == {"read"}


# ---- damaged manifests -------------------------------------------------------------------------

MANIFEST_VALUES = st.none() | st.booleans() | st.integers() | NAME | st.lists(st.integers(), max_size=2) | st.dictionaries(NAME, st.integers(), max_size=2)


@given(field=st.sampled_from(["shards", "checksum", "schema_version", "totals", "metadata", None]), value=MANIFEST_VALUES,
       cut=st.none() | st.floats(0.0, 1.0, exclude_max=True), entry_field=st.sampled_from(["file", "index", "sha256", "bytes", None]))
@settings(FUZZ)
def test_damaged_manifests_are_refused(valid_shard, field, value, cut, entry_field):
    with tempfile.TemporaryDirectory() as work:
        folder = faithful_folder(Path(work), valid_shard.read_bytes())
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        if entry_field is not None:
            manifest["shards"][0][entry_field] = value
        if field is not None:
            manifest[field] = value
        text = json.dumps(manifest)
        (folder / MANIFEST_NAME).write_text(text[: int(cut * len(text))] if cut is not None else text)
        outcome = outcome_of_folder(folder)
        event(outcome)
        assert outcome in {"refused", "read"}


# ---- what the fuzzing found, and the checks it exercises, as plain tests ----------------------------------------------------


def test_metadata_nested_too_deeply_is_a_named_error(valid_shard, tmp_path):
    """Found by test_schema_altered_shards_are_refused_with_the_column_named (metadata `[[[...]]]` 1,987 deep): json.loads
    raised RecursionError out of read_metadata."""
    table = pq.read_table(valid_shard)
    path = tmp_path / "deep.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: deep_json(50_000)}), path)
    with pytest.raises(ShardError, match=r"deep\.parquet: its 'tokenprio' metadata is not valid JSON \(maximum recursion depth"):
        read_metadata(path)


def test_a_retyped_column_is_named(valid_shard, tmp_path):
    """input_ids as list<int64> (what pandas writes after an edit) is named before pyarrow.compute sees it (a check added with
    this suite, not found by it)."""
    table = pq.read_table(valid_shard)
    path = tmp_path / "retyped.parquet"
    index = table.schema.get_field_index("input_ids")
    pq.write_table(table.set_column(index, pa.field("input_ids", pa.list_(pa.int64())), table.column(index).cast(pa.list_(pa.int64()))), path)
    with pytest.raises(ShardError, match=r"retyped\.parquet: column 'input_ids' is list<\w+: int64>, the shard contract says list<item: int32>"):
        read_table(path)


def test_a_repeated_column_is_named(valid_shard, tmp_path):
    """Refused before the fuzzing too, but by pyarrow's 'Multiple matches for FieldRef' with the whole schema; now named."""
    table = pq.read_table(valid_shard)
    path = tmp_path / "repeated.parquet"
    pq.write_table(table.append_column("weight", table.column("weight")), path)
    with pytest.raises(ShardError, match=r"repeated\.parquet: columns \['weight'\] appear more than once"):
        read_table(path)
