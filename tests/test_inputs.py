"""Corpus inputs: every format and kind, exact targets and labels, windows, stable ids, and each bad input's message.

Run: .venv/bin/pytest tests/test_inputs.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from scoring.inputs import (
    Encoded,
    FieldNames,
    InputError,
    Layout,
    Record,
    check_inputs,
    encode_record,
    iter_records,
    split_windows,
)

GPT2_DIR = Path(__file__).resolve().parents[1] / "data" / "gpt2-tokenizer"
FIELDS = FieldNames()

# One record of each kind, used by the format tests.
RECORDS = [
    {"id": "t1", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "c1", "prompt": "To be, or not to be,", "completion": " that is the question."},
    {"id": "m1", "messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you!"}]},
]

# Hand-rendered ChatML, as the fixture template renders it: "<|im_start|>{role}\n{content}<|im_end|>\n".
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chatml(messages) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def record(data: dict, kind: str, source: str = "data.jsonl", line: int = 1) -> Record:
    return Record(source=source, line=line, doc_id="x", kind=kind, data=data, error=None)


def decoded_targets(tokenizer, encoded: Encoded) -> list[str]:
    """The target tokens as strings, in order."""
    return [tokenizer.decode([i]) for i, m in zip(encoded.input_ids, encoded.loss_mask) if m]


@pytest.fixture(scope="module")
def plain_chat_tokenizer(tokenizer_dir, tokenizer):
    """The fixture tokenizer with the same ChatML template but WITHOUT {% generation %} markers."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" not in tok.chat_template and "{% generation %}" in tokenizer.chat_template
    return tok


@pytest.fixture(scope="module")
def gpt2():
    tok = AutoTokenizer.from_pretrained(GPT2_DIR)
    assert tok.backend_tokenizer.truncation is None or tok.backend_tokenizer.truncation["max_length"] == 50
    return tok


def write_jsonl(path: Path, rows: list, blank_line_after: int | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Formats


def test_every_format_yields_the_same_records(tmp_path):
    import datasets

    flat = [{"id": r["id"], "text": r.get("text"), "prompt": r.get("prompt"), "completion": r.get("completion"),
             "messages": json.dumps(r["messages"]) if "messages" in r else ""} for r in RECORDS]
    paths = {
        "jsonl": write_jsonl(tmp_path / "a.jsonl", RECORDS),
        "json": tmp_path / "a.json",
        "parquet": tmp_path / "a.parquet",
        "csv": tmp_path / "a.csv",
        "dataset": tmp_path / "ds",
    }
    paths["json"].write_text(json.dumps(RECORDS))
    pd.DataFrame(RECORDS).to_parquet(paths["parquet"])
    pd.DataFrame(flat).to_csv(paths["csv"], index=False)
    datasets.Dataset.from_pandas(pd.DataFrame(RECORDS)).save_to_disk(str(paths["dataset"]))
    check_inputs([str(p) for p in paths.values()])

    for name, path in paths.items():
        records = list(iter_records([str(path)], FIELDS))
        assert [r.kind for r in records] == ["text", "completion", "chat"], name
        assert [r.doc_id for r in records] == ["t1", "c1", "m1"], name
        # JSONL/CSV count file lines (the CSV header is line 1); the others count rows from 1.
        assert [r.line for r in records] == ([2, 3, 4] if name == "csv" else [1, 2, 3]), name
        assert records[0].data["text"] == RECORDS[0]["text"], name
        assert records[1].data["completion"] == RECORDS[1]["completion"], name
        assert [dict(role=m["role"], content=m["content"]) for m in records[2].data["messages"]] == RECORDS[2]["messages"], name


def test_dataset_dict_folder_uses_the_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"text": "a b"}, {"text": "c d"}]),
        "test": datasets.Dataset.from_list([{"text": "e f"}]),
    }).save_to_disk(str(folder))
    assert [r.data["text"] for r in iter_records([str(folder)], FIELDS, split="test")] == ["e f"]
    assert [r.line for r in iter_records([str(folder)], FIELDS)] == [1, 2]
    with pytest.raises(InputError, match=r"no split 'validation' \(found \['test', 'train'\]\); pass --split"):
        list(iter_records([str(folder)], FIELDS, split="validation"))


def test_records_are_numbered_across_inputs_and_lines_count_blank_and_multiline_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}], blank_line_after=1)
    b = tmp_path / "b.csv"
    b.write_text('id,text\n7,"first\nsecond"\n8,third\n')
    records = list(iter_records([str(a), str(b)], FIELDS))
    assert [(Path(r.source).name, r.line) for r in records] == [("a.jsonl", 1), ("a.jsonl", 3), ("b.csv", 2), ("b.csv", 4)]
    assert records[2].data["text"] == "first\nsecond" and records[2].doc_id == "7"


def test_csv_cells_longer_than_the_csv_module_default_are_read(tmp_path):
    path = tmp_path / "long.csv"
    pd.DataFrame([{"text": "ab" * 100_000}]).to_csv(path, index=False)  # 200,000 characters > the 131,072 default
    (rec,) = iter_records([str(path)], FIELDS)
    assert rec.kind == "text" and len(rec.data["text"]) == 200_000


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"key": 5, "question": "What is 2+2?", "answer": " 4"}])
    fields = FieldNames(prompt="question", completion="answer", id="key")
    (rec,) = iter_records([str(path)], fields)
    assert (rec.kind, rec.doc_id, rec.fields) == ("completion", "5", fields)


def test_csv_decodes_messages_and_spans_cells(tmp_path, tokenizer):
    path = tmp_path / "s.csv"
    spans = json.dumps([{"start": 4, "end": 9, "label": "adj"}])
    pd.DataFrame([{"text": "The quick fox.", "spans": spans}, {"text": "no spans", "spans": ""}]).to_csv(path, index=False)
    first, second = iter_records([str(path)], FIELDS)
    assert first.data["spans"] == [{"start": 4, "end": 9, "label": "adj"}] and "spans" not in second.data
    encoded = encode_record(first, tokenizer)
    assert "".join(encoded.text[s:e] for s, e, l in zip(encoded.char_start, encoded.char_end, encoded.label) if l == "adj") == " quick"


# ----------------------------------------------------------------------------------------------
# Kinds and targets


def test_text_targets_every_text_token_and_eos(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    encoded = encode_record(record({"text": text}, "text"), tokenizer)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id]
    assert encoded.loss_mask == [False] + [True] * (len(body) + 1)
    assert encoded.char_start[0] == encoded.char_end[0] == -1 and encoded.char_start[-1] == encoded.char_end[-1] == -1
    assert "".join(text[s:e] for s, e in zip(encoded.char_start[1:-1], encoded.char_end[1:-1])) == text
    assert encoded.label == [None] * len(encoded.input_ids) and encoded.text == text


def test_gpt2_has_no_bos_and_never_truncates(gpt2):
    text = " ".join(["word"] * 120)  # 120 tokens, more than the truncation length 50 saved in tokenizer.json
    encoded = encode_record(record({"text": text}, "text"), gpt2)
    assert encoded.input_ids == [gpt2.convert_tokens_to_ids("word")] + [gpt2.convert_tokens_to_ids("Ġword")] * 119 + [gpt2.eos_token_id]
    assert encoded.loss_mask == [False] + [True] * 120  # position 0 predicts nothing, even without BOS
    assert encoded.char_start[:3] == [0, 4, 9] and encoded.char_end[:3] == [4, 9, 14]


def test_completion_targets_completion_and_eos(tokenizer):
    prompt, completion = "To be, or not to be,", " that is the question."
    encoded = encode_record(record({"prompt": prompt, "completion": completion}, "completion"), tokenizer)
    p_ids = tokenizer(prompt)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert p_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids == p_ids + c_ids + [tokenizer.eos_token_id]
    assert encoded.loss_mask == [False] * len(p_ids) + [True] * (len(c_ids) + 1)
    assert encoded.text == prompt + completion
    assert "".join(encoded.text[s:e] for s, e in zip(encoded.char_start[len(p_ids) : -1], encoded.char_end[len(p_ids) : -1])) == completion


CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "assistant"},  # a content equal to a role name must not be mistaken for the header
    {"role": "assistant", "content": "user assistant system"},
    {"role": "user", "content": "thank you"},
    {"role": "assistant", "content": "I am fine!"},
]


def expected_chat_mask(encoded: Encoded, messages) -> list[bool]:
    """Targets by hand: tokens inside each assistant content + its <|im_end|>, located from the hand rendering."""
    ranges, at = [], 0
    for m in messages:
        at += len(IM_START) + len(m["role"]) + 1
        if m["role"] == "assistant":
            ranges.append((at, at + len(m["content"]) + len(IM_END)))
        at += len(m["content"]) + len(IM_END) + 1
    return [any(a <= s and e <= b for a, b in ranges) for s, e in zip(encoded.char_start, encoded.char_end)]


@pytest.mark.parametrize("which", ["markers", "offsets"])
def test_chat_targets_exactly_assistant_content_and_end_of_turn(tokenizer, plain_chat_tokenizer, which):
    tok = tokenizer if which == "markers" else plain_chat_tokenizer
    encoded = encode_record(record({"messages": CHAT}, "chat"), tok)
    assert encoded.text == chatml(CHAT)
    assert encoded.input_ids == tok(encoded.text, add_special_tokens=False)["input_ids"]
    assert encoded.loss_mask == expected_chat_mask(encoded, CHAT)
    targets = "".join(decoded_targets(tok, encoded))
    assert targets == f"user assistant system{IM_END}I am fine!{IM_END}"
    assert sum(encoded.loss_mask) == len(tok("user assistant system", add_special_tokens=False)["input_ids"]) + len(
        tok("I am fine!", add_special_tokens=False)["input_ids"]) + 2


def test_chat_with_a_given_template_on_gpt2(gpt2):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    encoded = encode_record(record({"messages": messages}, "chat"), gpt2, chat_template=template)
    assert encoded.text == "user: Hi\nassistant: Hello there<|endoftext|>\n"
    # " Hello" carries the template's space; the EOS that closes the turn is a target, the role header is not.
    assert decoded_targets(gpt2, encoded) == [" Hello", " there", "<|endoftext|>"]


def test_chat_without_any_template_names_the_option(gpt2):
    rec = record({"messages": [{"role": "assistant", "content": "x"}]}, "chat", source="c.jsonl", line=4)
    with pytest.raises(ValueError, match=r"c\.jsonl, line 4: .*has no chat template; pass --chat-template") as caught:
        encode_record(rec, gpt2)
    # A configuration problem, not a bad record: `--on-error skip` must not swallow it for every chat record.
    assert not isinstance(caught.value, InputError)


def test_chat_template_that_changes_content_without_markers_is_refused(plain_chat_tokenizer):
    template = plain_chat_tokenizer.chat_template.replace("message['content']", "message['content'] | upper")
    rec = record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]}, "chat", line=2)
    with pytest.raises(InputError, match=r"data\.jsonl, line 2: the content of message 1 \(assistant\) does not appear verbatim.*--chat-template"):
        encode_record(rec, plain_chat_tokenizer, chat_template=template)


# ----------------------------------------------------------------------------------------------
# Spans and labels


def expected_labels(encoded: Encoded, spans: list[tuple[int, int, str]]) -> list[str | None]:
    """Reference labels: token t takes the label of any span [start, end) its characters overlap."""
    labels = []
    for s, e in zip(encoded.char_start, encoded.char_end):
        overlap = {label for start, end, label in spans if s >= 0 and s < end and e > start}
        assert len(overlap) <= 1
        labels.append(overlap.pop() if overlap else None)
    return labels


def labelled(encoded: Encoded) -> list[tuple[str, str]]:
    return [(encoded.text[s:e], l) for s, e, l in zip(encoded.char_start, encoded.char_end, encoded.label) if l is not None]


def test_text_spans_label_every_overlapping_token(tokenizer):
    text = "The quick brown fox."
    # "qu" cuts a token: the whole token takes the label; two adjacent spans with the same label may share a token.
    spans = [{"start": 4, "end": 6, "label": "a"}, {"start": 6, "end": 9, "label": "a"}, {"start": 16, "end": 19, "label": "b"}]
    encoded = encode_record(record({"text": text, "spans": spans}, "text"), tokenizer)
    assert encoded.label == expected_labels(encoded, [(sp["start"], sp["end"], sp["label"]) for sp in spans])
    assert "".join(tok for tok, l in labelled(encoded) if l == "a").strip() == "quick"
    assert "".join(tok for tok, l in labelled(encoded) if l == "b").strip() == "fox"
    assert encoded.label[0] is None and encoded.label[-1] is None  # BOS and EOS have no characters


def test_completion_spans_index_the_completion(tokenizer):
    data = {"prompt": "To be, or", "completion": " not to be", "spans": [{"start": 1, "end": 4, "label": "neg"}]}
    encoded = encode_record(record(data, "completion"), tokenizer)
    assert "".join(tok for tok, _ in labelled(encoded)).strip() == "not"
    assert all(l is None for l, s in zip(encoded.label, encoded.char_start) if 0 <= s < len("To be, or"))


@pytest.mark.parametrize("which", ["markers", "offsets"])
def test_chat_spans_index_the_message_content(tokenizer, plain_chat_tokenizer, which):
    tok = tokenizer if which == "markers" else plain_chat_tokenizer
    spans = [{"message": 2, "start": 5, "end": 14, "label": "toxic"}, {"message": 1, "start": 0, "end": 9, "label": "q"}]
    encoded = encode_record(record({"messages": CHAT, "spans": spans}, "chat"), tok)
    # Content starts by hand: message 1 follows "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n".
    system = len(chatml(CHAT[:1]))
    user_content = system + len(IM_START) + len("user\n")
    assistant_content = len(chatml(CHAT[:2])) + len(IM_START) + len("assistant\n")
    absolute = [(assistant_content + 5, assistant_content + 14, "toxic"), (user_content, user_content + 9, "q")]
    assert encoded.text[absolute[0][0] : absolute[0][1]] == "assistant" == encoded.text[absolute[1][0] : absolute[1][1]]
    assert encoded.label == expected_labels(encoded, absolute)
    # The user message "assistant" is labelled as content, never the role header "<|im_start|>assistant".
    assert "".join(t for t, l in labelled(encoded) if l == "q") == "assistant"
    assert "".join(t for t, l in labelled(encoded) if l == "toxic").strip() == "assistant"


@pytest.mark.parametrize(
    "spans, message",
    [
        ([{"start": 0, "end": 3, "label": "a"}, {"start": 2, "end": 5, "label": "b"}], r"spans\[0\] \('a'\) and spans\[1\] \('b'\) both cover token 2 'he'"),
        ([{"start": 0, "end": 2, "label": "a"}, {"start": 2, "end": 5, "label": "b"}], r"spans\[0\] \('a'\) and spans\[1\] \('b'\) both cover token 2 'he'.* move"),
        ([{"start": 5, "end": 99, "label": "a"}], r"spans\[0\] \[5, 99\) is not a non-empty range inside 'text' \(14 characters\)"),
        ([{"start": 4, "end": 4, "label": "a"}], r"spans\[0\] \[4, 4\) is not a non-empty range"),
        ([{"start": 0, "end": 2, "label": "ok"}, {"start": 0, "end": 2}], r"spans\[1\] has no label"),
        ([{"start": "0", "end": 2, "label": "a"}], r"spans\[0\]\.start must be an integer"),
        ("nope", r"field 'spans' must be a list"),
    ],
)
def test_bad_spans_name_file_line_and_span(tokenizer, spans, message):
    # The fixture tokenizer splits "The quick fox." as <s>|T|he| qu|i|c|k| fox|.: token 2 "he" is chars [1, 3).
    rec = record({"text": "The quick fox.", "spans": spans}, "text", source="s.jsonl", line=7)
    with pytest.raises(InputError, match=r"s\.jsonl, line 7: " + message):
        encode_record(rec, tokenizer)


def test_bad_chat_span_message_index(tokenizer):
    rec = record({"messages": CHAT, "spans": [{"message": 9, "start": 0, "end": 1, "label": "a"}]}, "chat", line=3)
    with pytest.raises(InputError, match=r"line 3: spans\[0\]\.message must be a message index in \[0, 5\), got 9"):
        encode_record(rec, tokenizer)


# ----------------------------------------------------------------------------------------------
# Windows


def synthetic(n_tokens: int) -> Encoded:
    """A record whose ids are their positions; every third token is not a target, position 0 never is."""
    mask = [t > 0 and t % 3 != 1 for t in range(n_tokens)]
    layout = Layout(kind="text", segments=(("text", 0, n_tokens),), spans=())
    return Encoded(list(range(n_tokens)), mask, [f"l{t}" for t in range(n_tokens)], "", list(range(n_tokens)), list(range(1, n_tokens + 1)), layout)


@pytest.mark.parametrize("n_tokens, max_length, n_context", [(5, 8, 2), (8, 8, 2), (9, 8, 2), (30, 8, 3), (31, 8, 7), (30, 2, 1), (100, 16, 1)])
def test_windows_cover_every_target_exactly_once(n_tokens, max_length, n_context):
    encoded = synthetic(n_tokens)
    windows, truncated = split_windows(encoded, max_length=max_length, n_context=n_context)
    assert truncated == 0
    target_count = [0] * n_tokens
    previous = None
    for k, w in enumerate(windows):
        assert w.window == k and len(w.input_ids) <= max_length and not w.loss_mask[0]
        assert len(w.input_ids) == len(w.loss_mask) == len(w.label) == len(w.char_start) == len(w.char_end)
        assert w.n_context == (0 if k == 0 else n_context)
        if previous is not None:
            assert w.input_ids[:n_context] == previous.input_ids[-n_context:]  # context repeated from window k-1
            assert w.loss_mask[:n_context] == [False] * n_context
        for position, token, m in zip(range(len(w.input_ids)), w.input_ids, w.loss_mask):
            assert w.label[position] == f"l{token}" and w.char_start[position] == token  # columns stay aligned
            target_count[token] += m
        previous = w
    assert target_count == [int(m) for m in encoded.loss_mask]
    # Dropping the context tokens gives back the record.
    assert sum((w.input_ids[w.n_context :] for w in windows), []) == encoded.input_ids
    assert len(windows) == (1 if n_tokens <= max_length else 1 + -(-(n_tokens - max_length) // (max_length - n_context)))


def test_truncate_keeps_the_first_tokens_and_counts_the_rest():
    encoded = synthetic(30)
    (window,), truncated = split_windows(encoded, max_length=8, n_context=2, long_docs="truncate")
    assert truncated == 22 and window.input_ids == list(range(8)) and window.loss_mask == encoded.loss_mask[:8]
    assert split_windows(synthetic(5), max_length=8, n_context=2, long_docs="truncate")[1] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_length=8, n_context=0), r"--context 0"), (dict(max_length=8, n_context=8), r"--context 8"),
    (dict(max_length=1, n_context=1), r"--max-length 1"), (dict(max_length=8, n_context=2, long_docs="cut"), r"--long-docs 'cut'"),
])
def test_window_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_windows(synthetic(4), **kwargs)


# ----------------------------------------------------------------------------------------------
# Ids


def test_derived_ids_are_stable_and_distinct(tmp_path):
    rows = [{"text": "same"}, {"text": "same"}, {"text": "other"}]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "moved").mkdir()
    moved = shutil.copy(first, tmp_path / "moved" / "a.jsonl")
    ids = [r.doc_id for r in iter_records([str(first)], FIELDS)]
    assert ids == [r.doc_id for r in iter_records([str(first)], FIELDS)]
    assert ids == [r.doc_id for r in iter_records([str(moved)], FIELDS)]  # the file name counts, not its folder
    assert len(set(ids)) == 3 and all(len(i) == 16 for i in ids)
    write_jsonl(tmp_path / "b.jsonl", rows)
    assert set(ids).isdisjoint(r.doc_id for r in iter_records([str(tmp_path / "b.jsonl")], FIELDS))


def test_given_ids_are_used_as_strings(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": 12, "text": "a"}, {"id": "x-1", "text": "b"}, {"id": 1.5, "text": "c"}])
    records = list(iter_records([str(path)], FIELDS))
    assert [r.doc_id for r in records[:2]] == ["12", "x-1"]
    assert records[2].kind == "error" and "line 3: field 'id' must be a non-empty string or integer, got 1.5" in records[2].error


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_lines_become_error_records_and_numbering_continues(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "broken\n\xff\xfe{"text": 1}\n[1, 2]\n{"question": "q"}\n{"text": "last"}\n')
    records = list(iter_records([str(path)], FIELDS))
    assert [r.line for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.kind for r in records] == ["text", "error", "error", "error", "error", "text"]
    assert f"{path}, line 2: malformed JSON at column" in records[1].error
    assert f"{path}, line 3: invalid UTF-8 at byte 0" in records[2].error
    assert "line 4: expected a JSON object, got list" in records[3].error
    assert (
        f"{path}, line 5: the record matches no input kind: it needs 'text' (text), 'messages' (chat) or 'prompt' and "
        "'completion' (completion), but has fields ['question']; name the fields with --text-field" in records[4].error
    )
    with pytest.raises(InputError, match=r"line 2: malformed JSON"):
        encode_record(records[1], tokenizer)


def test_invalid_utf8_in_csv_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'text\nfine\n"caf\xe9"\nalso,extra\n')
    records = list(iter_records([str(path)], FIELDS))
    assert [r.kind for r in records] == ["text", "error", "error"]
    assert f"{path}, line 3: invalid UTF-8 on line 3" in records[1].error
    assert "line 4: 2 cells but the header has 1" in records[2].error


@pytest.mark.parametrize(
    "data, kind, message",
    [
        ({"text": ""}, "text", r"field 'text' is empty"),
        ({"text": "   \n"}, "text", r"field 'text' is empty"),
        ({"text": 5}, "text", r"field 'text' must be a string, got int"),
        ({"prompt": "p", "completion": ""}, "completion", r"field 'completion' is empty"),
        ({"prompt": 3, "completion": "c"}, "completion", r"field 'prompt' must be a string, got int"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "chat", r"messages\[1\] is an assistant message with empty content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}, "chat", r"messages\[0\]\.content must be a string, got list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "chat", r"'messages' has no assistant message"),
        ({"messages": []}, "chat", r"field 'messages' must be a non-empty list"),
    ],
)
def test_bad_records_raise_with_line_field_and_fix(tokenizer, data, kind, message):
    with pytest.raises(InputError, match=r"in\.parquet, row 9: " + message):
        encode_record(record(data, kind, source="in.parquet", line=9), tokenizer)


def test_check_inputs_lists_every_bad_input(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.parquet").write_text("not parquet")
    good = write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    check_inputs([str(good), "openai/gsm8k", "gsm8k", "user/data-v1.2"])  # dataset names pass the form check
    bad = [str(tmp_path / "missing.jsonl"), str(tmp_path / "notes.txt"), str(tmp_path / "folder"), str(tmp_path / "broken.parquet"),
           "missing.txt", "a/b/c"]
    with pytest.raises(InputError) as error:
        check_inputs([str(good)] + bad)
    lines = str(error.value).splitlines()
    assert len(lines) == len(bad)
    assert lines[0] == f"{tmp_path / 'missing.jsonl'}: no such file; check the path."
    assert lines[1].startswith(f"{tmp_path / 'notes.txt'}: unknown extension '.txt'; use one of .jsonl, .json, .parquet, .csv")
    assert "not a dataset saved with datasets' save_to_disk" in lines[2]
    assert "not a readable Parquet file" in lines[3]
    assert lines[4].startswith("missing.txt: no such file, and unknown extension '.txt'")
    assert lines[5].startswith("a/b/c: no such file or folder, and not a dataset name")
    with pytest.raises(InputError, match="no inputs given"):
        check_inputs([])
    with pytest.raises(InputError, match=r"missing\.jsonl: no such file"):
        list(iter_records([str(tmp_path / "missing.jsonl")], FIELDS))


def test_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{"text": "a"}')
    with pytest.raises(InputError, match=r"one\.json: a \.json input must hold a list of objects, got dict; .*use \.jsonl"):
        list(iter_records([str(path)], FIELDS))
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(InputError, match=r"one\.json: malformed JSON at line 2, column"):
        list(iter_records([str(path)], FIELDS))


def test_unloadable_dataset_name_is_an_input_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline, so the test never waits on the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"nobody/nothing-here: could not load dataset split 'train' .*save_to_disk"):
        list(iter_records(["nobody/nothing-here"], FIELDS))
