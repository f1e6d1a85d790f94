"""Fuzzing record reading and encoding with hypothesis (issue 14, item 4).

Arbitrary records (any JSON value in any field, Unicode with lone surrogates, combining marks, RTL, emoji
and control characters, huge fields, spans at any offsets, any message structure) and arbitrary lines
(malformed JSON, invalid UTF-8, deep nesting, huge numbers) are written as JSONL, JSON, CSV or Parquet
(typed, nulls anywhere) and read with iter_records, encoded with encode_record on the test tokenizer (byte-level BPE, with and
without {% generation %} markers) and the demo's character tokenizer, and cut with split_windows.
Every outcome is either a valid encoding (ids, mask, labels and offsets aligned; position 0 never a target;
every span's characters' tokens labelled and no other token; windows that cover every target exactly
once) or an InputError that names the file and line. No other exception type, ever.
Example counts are fixed and the search is derandomized, so CI runs the same examples every time.

Run: .venv/bin/pytest -q tests/test_fuzz_inputs.py
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, example, find, given, settings
from hypothesis import strategies as st

from conftest import build_tokenizer
from pipelines.demo.data import build_tokenizer as build_char_tokenizer
from scoring.inputs import Encoded, FieldNames, InputError, check_inputs, encode_record, iter_records, split_windows, where
from scoring.inputs.layout import Layout
from scoring.inputs.readers import make_record

FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
FORMATS = settings(FUZZ, max_examples=50)  # JSON, CSV and Parquet: the same records as JSONL, fewer examples
FIELDS = FieldNames()


def plain_template(tokenizer):
    """The same tokenizer with its chat template stripped of {% generation %} markers (targets from offsets)."""
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return tokenizer


TOKENIZERS = {"bpe": build_tokenizer(), "bpe-plain": plain_template(build_tokenizer()), "char": build_char_tokenizer()}


# ----------------------------------------------------------------------------------------------
# Strategies

ODD_CHARACTERS = [
    "\x00", "\x07", "\x1b", "\x7f", "\x85", "\t", "\r", "\n", "\u2028", "\x0c",  # controls and line breaks
    "\u0301", "\u0308", "\u20dd", "e\u0301",  # combining marks
    "א", "ש", "ا", "\u200f", "\u202e", "\u2067",  # RTL letters and marks
    "😀", "👍🏽", "👩\u200d💻", "🇫🇷", "中", "\u200b", "\ufeff", "\U0010ffff",  # emoji, ZWJ, flags, CJK, zero-width, BOM
    "\ud800", "\udfff", "\udc80",  # lone surrogates (JSON can hold them as \\uXXXX escapes)
    "<s>", "</s>", "<|im_end|>", "<|im_start|>", "<|assistant|>", "<|end|>", "<<tokenprio-content-0>>", "{{", "{%",
]
CHARACTER = st.one_of(st.sampled_from(ODD_CHARACTERS), st.characters(codec=None, exclude_categories=()), st.sampled_from("ab cd.,!?0123"))
SMALL_TEXT = st.lists(CHARACTER, max_size=24).map("".join)
HUGE_TEXT = st.builds(lambda text, n: (text * n)[:20_000], st.lists(CHARACTER, min_size=1, max_size=8).map("".join), st.integers(200, 5_000))
TEXT = st.one_of(*[SMALL_TEXT] * 14, HUGE_TEXT)  # a huge field about once in 15 strings (a 200k-character one: a plain test)


def json_containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(SMALL_TEXT, inner, max_size=3)


JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | SMALL_TEXT, json_containers, max_leaves=8)
WILD_OFFSET = st.one_of(st.integers(-5, -1), st.integers(-(2**70), 2**70))


def rare(draw, one_in: int = 20) -> bool:
    """True once in `one_in` draws: where a well-formed part is replaced by any JSON value."""
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def span(draw, lengths: list[int], chat: bool):
    """A span {start, end, label[, message]} over one of the strings of `lengths` (one per message for chat,
    else one): mostly inside it, sometimes past either end, overlapping others, or with any JSON value in any key."""
    if rare(draw):
        return draw(JSON_VALUE)
    index = draw(st.integers(0, len(lengths) - 1)) if lengths else 0
    n = lengths[index] if lengths else 0
    start = draw(st.integers(-2, n + 2)) if rare(draw, 4) else draw(st.integers(0, max(n - 1, 0)))
    end = start + (draw(st.integers(-1, 12)) if rare(draw, 4) else draw(st.integers(1, max(1, min(12, n - start)))))
    out = {"start": draw(WILD_OFFSET) if rare(draw) else start, "end": draw(WILD_OFFSET) if rare(draw) else end}
    out["label"] = draw(JSON_VALUE) if rare(draw) else draw(st.sampled_from(["toxic", "toxic", "good", "x"]))
    if chat or rare(draw, 10):
        out["message"] = draw(st.one_of(JSON_VALUE, st.integers(-1, len(lengths)))) if rare(draw) else index
    if rare(draw, 10):
        out[draw(SMALL_TEXT)] = draw(JSON_VALUE)
    return out


@st.composite
def message(draw, role: str, text):
    if rare(draw, 40):
        return draw(JSON_VALUE)
    out = {"role": draw(SMALL_TEXT | JSON_VALUE) if rare(draw, 40) else role, "content": draw(JSON_VALUE) if rare(draw, 40) else draw(text)}
    if rare(draw, 40):
        del out[draw(st.sampled_from(["role", "content"]))]
    if rare(draw, 10):
        out[draw(st.sampled_from(["name", "extra"]))] = draw(JSON_VALUE)
    return out


@st.composite
def record(draw, text=TEXT) -> dict:
    """A record of any kind, mostly shaped like one of text / completion / chat; spans sized to its strings."""
    kind = draw(st.sampled_from(["text", "completion", "chat", "chat", "any"]))
    data: dict = {}
    lengths: list[int] = []
    if kind == "text":
        data["text"] = draw(JSON_VALUE) if rare(draw) else draw(text)
        lengths = [len(data["text"]) if isinstance(data["text"], str) else 5]
    elif kind == "completion":
        data["prompt"] = draw(JSON_VALUE) if rare(draw) else draw(text)
        data["completion"] = draw(JSON_VALUE) if rare(draw) else draw(text)
        lengths = [len(data["completion"]) if isinstance(data["completion"], str) else 5]
    elif kind == "chat":
        roles = draw(st.lists(st.sampled_from(["system", "user", "assistant", "user", "assistant"]), min_size=1, max_size=4))
        data["messages"] = draw(JSON_VALUE) if rare(draw) else [draw(message(role, text)) for role in roles]
        if isinstance(data["messages"], list):
            lengths = [len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), str) else 5 for m in data["messages"]]
    else:
        data = draw(st.dictionaries(st.sampled_from(["text", "prompt", "completion", "messages", "spans", "id", "other"]), JSON_VALUE, max_size=4))
    if draw(st.booleans()):
        data["spans"] = draw(JSON_VALUE) if rare(draw) else draw(st.lists(span(lengths or [0], kind == "chat"), max_size=3))
    if rare(draw, 3):
        data["id"] = draw(st.one_of(JSON_VALUE, SMALL_TEXT)) if rare(draw, 5) else draw(st.one_of(SMALL_TEXT.filter(bool), st.integers(-(2**70), 2**70)))
    return data


def raw_line(kind: str, value) -> bytes:
    """One JSONL line from a drawn record or value."""
    if kind == "ascii":  # lone surrogates become \\uXXXX escapes, as JSON allows
        return json.dumps(value, ensure_ascii=True).encode()
    if kind == "utf8":  # lone surrogates written raw: invalid UTF-8 on disk
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    raise AssertionError(kind)


ODD_LINES = st.sampled_from([
    b"", b"   ", b"\t", b"\xef\xbb\xbf{\"text\": \"bom\"}", b"\xff\xfe\x00", b"{\"text\": \"caf\xe9\"}", b"{\"text\": ", b"[1, 2]", b"null",
    b"\"just a string\"", b"{\"text\": NaN}", b"{\"text\": \"a\", \"n\": 1" + b"0" * 5000 + b"}", b"{\"text\": \"a\", \"x\": " + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000 + b"]" * 100_000, b"{\"text\": \"\\ud800\"}", b"{\"text\": \"\\udc00x\\ud83d\"}", b"{\"text\": \"ok\", \"text\": 5}", b"\x00",
])
LINES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["ascii", "utf8"]), record()).map(lambda pair: raw_line(*pair)),
        st.tuples(st.sampled_from(["ascii", "utf8"]), record()).map(lambda pair: raw_line(*pair)),
        ODD_LINES,
        st.tuples(st.just("ascii"), JSON_VALUE).map(lambda pair: raw_line(*pair)),
        SMALL_TEXT.map(lambda text: text.replace("\n", " ").encode("utf-8", "surrogatepass")),
    ),
    min_size=1, max_size=5,
)
WINDOWS = st.sampled_from([2, 3, 5, 8, 64, 4096]).flatmap(
    lambda max_length: st.tuples(st.just(max_length), st.integers(1, max_length - 1), st.sampled_from(["window", "window", "truncate"]))
)


# ----------------------------------------------------------------------------------------------
# The invariants


def span_regions(data: dict, kind: str, text: str) -> list[tuple[int, int, str]] | None:
    """Absolute [start, end, label) of every span of an encoded text / completion record (None for chat)."""
    if kind == "chat":
        return None
    base = len(data[FIELDS.prompt]) if kind == "completion" else 0
    return [(base + s["start"], base + s["end"], s["label"]) for s in data.get(FIELDS.spans) or []]


def check_encoded(encoded, rec, tokenizer, vocab_size: int) -> None:
    """The invariants of one encoding (numpy over the tokens: huge fields stay fast)."""
    ids, mask, labels, text = encoded.input_ids, encoded.loss_mask, encoded.label, encoded.text
    n = len(ids)
    assert n >= 2 and len(mask) == len(labels) == len(encoded.char_start) == len(encoded.char_end) == n
    assert not mask[0] and any(mask), "position 0 is never a target; every record has a target"
    ids_array = np.asarray(ids)
    assert ids_array.dtype.kind == "i" and bool(((ids_array >= 0) & (ids_array < vocab_size)).all())
    starts, ends = np.asarray(encoded.char_start, dtype=np.int64), np.asarray(encoded.char_end, dtype=np.int64)  # (T,)
    outside = (starts == -1) & (ends == -1)
    assert bool((outside | ((starts >= 0) & (starts <= ends) & (ends <= len(text)))).all()), "offsets outside the text"
    # every character of the text belongs to some token: +1 at each token's start, −1 at its end, running sum > 0
    inside = ~outside
    depth = np.zeros(len(text) + 1, dtype=np.int64)
    np.add.at(depth, starts[inside], 1)
    np.add.at(depth, ends[inside], -1)
    assert bool((np.cumsum(depth)[: len(text)] > 0).all()), "a character of the text is in no token"
    if rec.kind == "text":
        assert text == rec.data[FIELDS.text] and ids[-1] == tokenizer.eos_token_id
        assert mask == [False] + (starts[1:-1] >= 0).tolist() + [True]
    if rec.kind == "completion":
        prompt = rec.data[FIELDS.prompt]
        assert text == prompt + rec.data[FIELDS.completion] and ids[-1] == tokenizer.eos_token_id
        n_prompt = max(int((starts[:-1] < len(prompt)).sum()), 1)  # prompt tokens (and BOS) come first
        assert mask == [False] * n_prompt + [True] * (n - n_prompt)
    regions = span_regions(rec.data, rec.kind, text)
    if regions is None:  # chat: spans index message contents; labels come only from the spans
        span_labels = {s["label"] for s in rec.data.get(FIELDS.spans) or []}
        assert {label for label in labels if label is not None} == span_labels
        return
    expected = np.full(n, None, dtype=object)  # the label of the span whose characters each token holds
    for start, end, label in regions:
        holds = inside & (starts < end) & (ends > start)
        assert all(other in (None, label) for other in expected[holds]), "two labels on one token were accepted"
        expected[holds] = label
    assert labels == expected.tolist()


def check_windows(encoded, max_length: int, n_context: int, long_docs: str) -> None:
    n = len(encoded.input_ids)
    if n > 64 * max_length:  # a huge field: at most ~64 windows, so the suite stays fast (small windows: small records)
        max_length, n_context = n // 64, n_context * (n // 64) // max_length
    windows, truncated = split_windows(encoded, max_length=max_length, n_context=n_context, long_docs=long_docs)
    if long_docs == "truncate" or n <= max_length:
        assert len(windows) == 1 and truncated == max(0, n - max_length)
    else:
        assert truncated == 0
    times_a_target = [0] * n
    start = 0
    for k, w in enumerate(windows):
        size = len(w.input_ids)
        assert w.window == k and 2 <= size <= max_length
        assert w.n_context == (0 if k == 0 else n_context) and not w.loss_mask[0]
        for column in ("input_ids", "label", "char_start", "char_end"):
            assert getattr(w, column) == getattr(encoded, column)[start : start + size]
        assert w.loss_mask == [j >= w.n_context and encoded.loss_mask[start + j] for j in range(size)]
        for j, m in enumerate(w.loss_mask):
            times_a_target[start + j] += m
        start += size - n_context
    if long_docs == "window":
        assert start + n_context == n  # the last window ends at the last token
        assert times_a_target == [int(m) for m in encoded.loss_mask]  # every target exactly once


def read_and_encode(path: Path, expected_lines: list[int] | None, windows) -> dict[str, int]:
    """Read every record of `path`, encode it with every tokenizer and window it; check every invariant.

    Returns how many encodings succeeded (in all and per kind) and how many were refused.
    """
    counts = {"encoded": 0, "refused": 0}
    try:
        records = list(iter_records([str(path)], FIELDS))
    except InputError as error:  # a file that cannot be read at all (.json, .csv): named by its path
        assert str(error).startswith(str(path)), str(error)
        counts["refused"] += 1
        return counts
    if expected_lines is not None:
        assert [r.line for r in records] == expected_lines
    for rec in records:
        assert rec.source == str(path) and isinstance(rec.doc_id, str) and rec.doc_id
        windowed = False
        for name, tokenizer in TOKENIZERS.items():
            try:
                encoded = encode_record(rec, tokenizer)
            except InputError as error:
                assert str(error).startswith(where(str(path), rec.line) + ": "), (name, str(error))
                counts["refused"] += 1
                continue
            assert rec.kind in ("text", "completion", "chat")
            check_encoded(encoded, rec, tokenizer, len(tokenizer))
            if not windowed:  # windows do not depend on the tokenizer: one encoding per record is enough
                check_windows(encoded, *windows)
                windowed = True
            counts[rec.kind] = counts.get(rec.kind, 0) + 1
            counts["encoded"] += 1
    return counts


def write_lines(directory: str, lines: list[bytes]) -> tuple[Path, list[int]]:
    path = Path(directory) / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, [i for i, line in enumerate(lines, start=1) if line.strip()]


# ----------------------------------------------------------------------------------------------
# The properties


@FUZZ
@given(LINES, WINDOWS)
@example([b'{"text": "a", "n": 1' + b"0" * 5000 + b"}"], (8, 2, "window"))  # found: ValueError (int digits limit)
@example([b"[" * 100_000 + b"]" * 100_000], (8, 2, "window"))  # found: RecursionError in json.loads
@example([b'{"text": "\\ud800"}', b'{"prompt": "x", "completion": "a\\udfffb"}'], (8, 2, "window"))  # found: TypeError in the tokenizer
@example([b'{"text": "ok", "\\ud800": 1}'], (8, 2, "window"))  # found: UnicodeEncodeError deriving the id
@example([b'{"messages": [{"role": "user\\ud800", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'], (8, 2, "window"))
def test_jsonl_lines_encode_or_are_refused_by_file_and_line(lines, windows):
    with tempfile.TemporaryDirectory() as directory:
        path, expected = write_lines(directory, lines)
        check_inputs([str(path)])
        read_and_encode(path, expected, windows)


@FUZZ
@given(st.lists(record(), min_size=1, max_size=4), WINDOWS)
def test_well_formed_jsonl_records_encode_or_are_refused_by_file_and_line(records, windows):
    with tempfile.TemporaryDirectory() as directory:
        path, expected = write_lines(directory, [raw_line("ascii", r) for r in records])
        read_and_encode(path, expected, windows)


@FORMATS
@given(st.lists(st.one_of(record(), record(), JSON_VALUE), max_size=4), WINDOWS, st.sampled_from(["ascii", "utf8"]))
@example([{"text": "a", "x": 10**5000}], (8, 2, "window"), "ascii")  # huge int: the whole .json file is refused by name
def test_json_lists_encode_or_are_refused_by_file_and_item(items, windows, encoding):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.json"
        limit = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)  # only to write the huge example; the reader runs with the default limit
        try:
            path.write_bytes(raw_line(encoding, items))
        finally:
            sys.set_int_max_str_digits(limit)
        read_and_encode(path, list(range(1, len(items) + 1)), windows)


CSV_HEADER = ["id", "text", "prompt", "completion", "messages", "spans"]


@FORMATS
@given(st.lists(record(), min_size=1, max_size=4), WINDOWS)
def test_csv_rows_encode_or_are_refused_by_file_and_line(records, windows):
    """Cells are strings (messages and spans as JSON); surrogates cannot be written as UTF-8, so they become '?'."""
    def cell(name: str, value) -> str:
        if value is None:
            return ""
        text = value if isinstance(value, str) and name not in ("messages", "spans") else json.dumps(value, ensure_ascii=False)
        return text.encode("utf-8", "replace").decode()

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.csv"
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(CSV_HEADER)
        first_lines = []  # a row's line: 1 + the line breaks before it (quoted cells may hold some)
        for r in records:
            first_lines.append(buffer.getvalue().count("\n") + 1)
            writer.writerow([cell(name, r.get(name)) for name in CSV_HEADER])
        path.write_bytes(buffer.getvalue().encode())
        read_and_encode(path, first_lines, windows)


def parquet_rows(records: list[dict]) -> list[dict]:
    """The records cast to one Parquet schema: values of another type become null, strings valid UTF-8."""
    def string(value):
        return value.encode("utf-8", "replace").decode() if isinstance(value, str) else None

    def int64(value):
        return value if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63 else None

    def items(value, cast):
        return [cast(item if isinstance(item, dict) else {}) for item in value] if isinstance(value, list) else None

    return [
        {
            "id": string(r.get("id")), "text": string(r.get("text")), "prompt": string(r.get("prompt")), "completion": string(r.get("completion")),
            "messages": items(r.get("messages"), lambda m: {"role": string(m.get("role")), "content": string(m.get("content"))}),
            "spans": items(r.get("spans"), lambda s: {"start": int64(s.get("start")), "end": int64(s.get("end")), "label": string(s.get("label")), "message": int64(s.get("message"))}),
        }
        for r in records
    ]


PARQUET_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("spans", pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()), ("label", pa.string()), ("message", pa.int64())]))),
])


@FORMATS
@given(st.lists(record(), min_size=1, max_size=4), WINDOWS)
def test_parquet_rows_encode_or_are_refused_by_file_and_row(records, windows):
    """Typed columns with nulls anywhere (a span's start, a message's role), spans at any offsets."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.parquet"
        pq.write_table(pa.Table.from_pylist(parquet_rows(records), schema=PARQUET_SCHEMA), path)
        check_inputs([str(path)])
        read_and_encode(path, list(range(1, len(records) + 1)), windows)


@FUZZ
@given(st.lists(st.lists(CHARACTER, max_size=300).map("".join), max_size=3))
@example(["a" * 5000])  # found: OSError (File name too long) instead of an InputError
@example(["a" * 300 + ".jsonl", "x/" * 3000])
@example(["a\x00b.jsonl", "\ud800.csv", "gsm8k", "openai/gsm8k"])
def test_check_inputs_accepts_or_names_every_bad_input(names):
    try:
        check_inputs(names)
    except InputError as error:
        assert names or "no inputs given" in str(error)
        return
    assert names  # check_inputs([]) is an error


@FUZZ
@given(st.integers(2, 600), WINDOWS, st.randoms(use_true_random=False))
def test_windows_of_any_length_cover_every_target_exactly_once(n_tokens, windows, random):
    """split_windows alone, on synthetic encodings: ids are positions, targets and labels at random."""
    mask = [False] + [random.random() < 0.7 for _ in range(n_tokens - 1)]
    labels = [random.choice([None, "toxic"]) for _ in range(n_tokens)]
    layout = Layout(kind="text", segments=(("text", 0, n_tokens),), spans=())
    encoded = Encoded(list(range(n_tokens)), mask, labels, "x" * n_tokens, list(range(n_tokens)), list(range(1, n_tokens + 1)), layout)
    check_windows(encoded, *windows)


@pytest.mark.parametrize("kind", ["text", "completion", "chat"])
def test_the_record_strategy_reaches_valid_encodings_of_every_kind(kind):
    """The suites above would pass vacuously if every drawn record were refused: each kind does encode."""
    def encodes(records: list[dict]) -> bool:
        with tempfile.TemporaryDirectory() as directory:
            path, _ = write_lines(directory, [raw_line("ascii", r) for r in records])
            return read_and_encode(path, None, (8, 2, "window")).get(kind, 0) > 0

    found = find(st.lists(record(SMALL_TEXT), min_size=1, max_size=4), encodes, settings=settings(FUZZ, max_examples=300, phases=[Phase.generate]))  # the first one found, not shrunk
    assert found


# ----------------------------------------------------------------------------------------------
# The examples that found bugs, as plain tests


def encode_line(tmp_path: Path, line: bytes):
    path = tmp_path / "one.jsonl"
    path.write_bytes(line + b"\n")
    (rec,) = iter_records([str(path)], FIELDS)
    return rec, path


@pytest.mark.parametrize(
    "line, words",
    [
        (b'{"text": "a", "n": 1' + b"0" * 5000 + b"}", "integer"),  # json.loads raised ValueError (int max str digits)
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # json.loads raised RecursionError
    ],
)
def test_lines_json_cannot_hold_become_error_records(tmp_path, line, words):
    rec, path = encode_line(tmp_path, line)
    assert rec.kind == "error" and rec.error.startswith(f"{path}, line 1: ") and words in rec.error
    with pytest.raises(InputError, match="line 1"):
        encode_record(rec, TOKENIZERS["bpe"])


def test_nesting_that_json_loads_accepts_but_json_dumps_cannot_write_is_an_error_record(tmp_path):
    """Found by the JSONL suite: a line nested just under json.loads' limit was read, then json.dumps (hashing the
    record for its id) raised RecursionError. The limit depends on the stack depth, so it is searched for here."""
    low, high = 1, 100_000  # the deepest list json.loads reads from this frame
    while low < high:
        middle = (low + high + 1) // 2
        try:
            json.loads("[" * middle + "]" * middle)
            low = middle
        except RecursionError:
            high = middle - 1
    data = json.loads('{"text": "a", "x": ' + "[" * (low - 1) + "]" * (low - 1) + "}")  # as deep as json.loads reads
    rec = make_record("deep.jsonl", 1, data, None, "", FIELDS)  # json.dumps raised RecursionError here
    assert rec.kind == "error" and rec.error == "deep.jsonl, line 1: JSON nested too deeply to read (about 1000 levels or more)."
    for depth in range(max(low - 12, 1), low + 1):  # and through the reader, whichever of the two limits is hit
        line = '{"text": "a", "x": ' + "[" * depth + "]" * depth + "}"
        path = tmp_path / "deep.jsonl"
        path.write_text(line + "\n")
        (rec,) = iter_records([str(path)], FIELDS)
        if rec.kind == "error":
            assert rec.error.startswith(f"{path}, line 1: ") and "nested too deeply" in rec.error
        else:
            assert encode_record(rec, TOKENIZERS["bpe"]).text == "a"


@pytest.mark.parametrize(
    "line, field",
    [
        (b'{"text": "a\\ud800b"}', "'text'"),
        (b'{"prompt": "p\\udfff", "completion": "c"}', "'prompt'"),
        (b'{"prompt": "p", "completion": "\\udc80"}', "'completion'"),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud83d"}]}', "messages[1].content"),
        (b'{"messages": [{"role": "user\\ud800", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "messages[0].role"),
        (b'{"text": "abc", "spans": [{"start": 0, "end": 1, "label": "t\\ud800"}]}', "spans[0].label"),
        (b'{"text": "abc", "id": "x\\ud800"}', "'id'"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(tmp_path, line, field):
    """JSON may spell an unpaired surrogate as a \\uXXXX escape; the tokenizer raised TypeError on it."""
    rec, path = encode_line(tmp_path, line)
    for tokenizer in TOKENIZERS.values():
        with pytest.raises(InputError) as info:
            encode_record(rec, tokenizer)
        message = str(info.value)
        assert message.startswith(f"{path}, line 1: ") and field in message and "surrogate" in message, message


def test_a_lone_surrogate_in_any_key_or_value_still_gets_a_stable_id(tmp_path):
    """Deriving the id hashed the record as strict UTF-8 and raised UnicodeEncodeError; now the record is read."""
    rec, _ = encode_line(tmp_path, b'{"text": "ok", "\\ud800": "\\udfff"}')
    again, _ = encode_line(tmp_path, b'{"text": "ok", "\\ud800": "\\udfff"}')
    assert rec.kind == "text" and rec.doc_id == again.doc_id and len(rec.doc_id) == 16
    assert encode_record(rec, TOKENIZERS["bpe"]).text == "ok"


def test_an_input_name_too_long_for_the_file_system_is_an_input_error():
    name = "a" * 5000
    with pytest.raises(InputError, match="cannot be checked") as info:
        check_inputs([name, "x" * 300 + ".jsonl"])
    assert str(info.value).count("\n") == 1  # both inputs named, one line each


def test_a_field_of_200k_characters_encodes_and_windows_cover_it(tmp_path):
    """A huge field, beyond what the fuzzers draw: mixed scripts, emoji and controls, a span at its very end."""
    text = ("The fox 😀 שלום e\u0301 中文\t\x00 " * 8_000)[:200_000]
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": text, "spans": [{"start": len(text) - 5, "end": len(text), "label": "toxic"}]}) + "\n")
    (rec,) = iter_records([str(path)], FIELDS)
    tokenizer = TOKENIZERS["bpe"]
    encoded = encode_record(rec, tokenizer)
    check_encoded(encoded, rec, tokenizer, len(tokenizer))
    assert encoded.label[-2] == "toxic" and encoded.label.count("toxic") >= 2  # the last text token, before EOS
    check_windows(encoded, 4096, 256, "window")
