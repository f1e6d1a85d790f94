"""Encoding records into ids with targets, labels and character offsets (`encode_record` → `Encoded`).

Targets (docs/design.md "Targets"): position t describes the prediction of token t, so position 0 is never a
target. Plain text: every text token plus an appended EOS. Prompt/completion: completion tokens plus EOS.
Chat: assistant content plus the end-of-turn token that closes it, never role headers. `char_start` /
`char_end` index `text` (Python str indices); tokens with no characters in `text` (a BOS added by the
tokenizer's post-processor, the appended EOS) have -1 and never take a label.

Chat masks come from the template's {% generation %} markers when it has them, else from locating each
assistant content in the rendered string. `encode_record` raises InputError for a bad record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from scoring.inputs.layout import Layout
from scoring.inputs.readers import FieldNames, InputError, Record, surrogate_problem, where

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects {% generation %}


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # targets; position 0 is never one
    label: list[str | None]  # span label per token, None where none
    text: str  # the rendered text that char offsets index
    char_start: list[int]  # Python str index into `text`, -1 for tokens with no characters there
    char_end: list[int]
    layout: Layout  # how `text` was built: kind, parts, label spans (stored in shards for `tokenprio project`)


def tokenize_with_offsets(tokenizer, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[int], list[int]]:
    """(ids, char_start, char_end) of `text`, never truncated; tokens the post-processor adds get offsets -1."""
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, truncation=False)
    ids = list(encoding["input_ids"])
    # sequence_ids is None exactly for tokens added by the post-processor (BOS/EOS), not for specials in `text`.
    sequence_ids = encoding.encodings[0].sequence_ids
    starts = [start if seq is not None else -1 for (start, _), seq in zip(encoding["offset_mapping"], sequence_ids)]
    ends = [end if seq is not None else -1 for (_, end), seq in zip(encoding["offset_mapping"], sequence_ids)]
    return ids, starts, ends


def check_string(value: str, what: str, at: str) -> str:
    """`value` unchanged, or InputError when it holds a lone surrogate (the tokenizer would raise TypeError)."""
    problem = surrogate_problem(value, what)
    if problem:
        raise InputError(f"{at}: {problem}")
    return value


def string_field(data: dict, name: str, at: str, *, allow_empty: bool = False) -> str:
    """data[name] as a string (non-empty unless allow_empty) of valid Unicode, else InputError."""
    value = data.get(name)
    if not isinstance(value, str):
        raise InputError(f"{at}: field {name!r} must be a string, got {type(value).__name__}; fix the record.")
    check_string(value, f"field {name!r}", at)
    if not value.strip() and not allow_empty:
        raise InputError(f"{at}: field {name!r} is empty (an empty document has nothing to train on); remove the record.")
    return value


def read_span(span, index: int, text_length: int, at: str, indexes: str) -> tuple[int, int, str]:
    """Validate one span {start, end, label}: character offsets [start, end) into a text of `text_length` chars."""
    name = f"spans[{index}]"
    if not isinstance(span, dict):
        raise InputError(f"{at}: {name} must be an object {{start, end, label}}, got {type(span).__name__}.")
    start, end, label = span.get("start"), span.get("end"), span.get("label")
    for key, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{at}: {name}.{key} must be an integer character offset, got {value!r:.80}.")
    if not isinstance(label, str) or not label:
        raise InputError(f"{at}: {name} has no label (got {label!r:.80}); give every span a non-empty string 'label'.")
    check_string(label, f"{name}.label", at)
    if not 0 <= start < end <= text_length:
        raise InputError(
            f"{at}: {name} [{start}, {end}) is not a non-empty range inside {indexes} ({text_length} characters); "
            "spans are Python str offsets with 0 <= start < end <= len(text)."
        )
    return start, end, label


def span_list(data: dict, fields: FieldNames, at: str) -> list:
    spans = data.get(fields.spans)
    if spans is None:
        return []
    if not isinstance(spans, list):
        raise InputError(f"{at}: field {fields.spans!r} must be a list of {{start, end, label}} objects, got {type(spans).__name__}.")
    return spans


def labels_from_spans(spans: list[tuple[int, int, str]], char_start: list[int], char_end: list[int], text: str, at: str) -> list[str | None]:
    """Per-token labels: a token takes a span's label when [char_start, char_end) overlaps the span [start, end).

    Spans are absolute offsets into `text`; tokens with offset -1 never take a label. Two spans with
    different labels on one token are an InputError naming both spans.
    """
    starts, ends = np.asarray(char_start, dtype=np.int64), np.asarray(char_end, dtype=np.int64)  # (T,)
    owner = np.full(len(starts), -1, dtype=np.int64)  # index of the span that labelled each token
    labels: list[str | None] = [None] * len(starts)
    for index, (start, end, label) in enumerate(spans):
        hit = (starts >= 0) & (starts < end) & (ends > start)
        for t in np.flatnonzero(hit).tolist():
            if labels[t] is not None and labels[t] != label:
                token = text[char_start[t] : char_end[t]]
                raise InputError(
                    f"{at}: spans[{owner[t]}] ({labels[t]!r}) and spans[{index}] ({label!r}) both cover token {t} {token!r}; "
                    "spans with different labels must not share a token: move their boundaries apart."
                )
            labels[t], owner[t] = label, index
    return labels


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; text and completions end with EOS as a target: use a tokenizer with eos_token.")
    return tokenizer.eos_token_id


def encode_text(record: Record, tokenizer) -> Encoded:
    """Plain text: the tokenizer's own specials (BOS if its post-processor adds one), the text, EOS; targets = text + EOS."""
    at, fields = where(record.source, record.line), record.fields
    text = string_field(record.data, fields.text, at)
    spans = [read_span(s, i, len(text), at, f"{fields.text!r}") for i, s in enumerate(span_list(record.data, fields, at))]
    ids, starts, ends = tokenize_with_offsets(tokenizer, text, add_special_tokens=True)
    ids, starts, ends = ids + [eos_id(tokenizer)], starts + [-1], ends + [-1]
    mask = [start >= 0 for start in starts[:-1]] + [True]
    layout = Layout(kind="text", segments=(("text", 0, len(text)),), spans=tuple(spans))
    return finish(ids, mask, labels_from_spans(spans, starts, ends, text, at), text, starts, ends, layout)


def encode_completion(record: Record, tokenizer) -> Encoded:
    """Prompt (with the tokenizer's specials) + completion (without) + EOS, tokenised apart; targets = completion + EOS.

    `text` = prompt + completion; spans index the completion.
    """
    at, fields = where(record.source, record.line), record.fields
    prompt = string_field(record.data, fields.prompt, at, allow_empty=True)
    completion = string_field(record.data, fields.completion, at)
    spans = [read_span(s, i, len(completion), at, f"{fields.completion!r}") for i, s in enumerate(span_list(record.data, fields, at))]
    spans = [(start + len(prompt), end + len(prompt), label) for start, end, label in spans]
    p_ids, p_starts, p_ends = tokenize_with_offsets(tokenizer, prompt, add_special_tokens=True)
    c_ids, c_starts, c_ends = tokenize_with_offsets(tokenizer, completion, add_special_tokens=False)
    ids = p_ids + c_ids + [eos_id(tokenizer)]
    starts = p_starts + [s + len(prompt) for s in c_starts] + [-1]
    ends = p_ends + [e + len(prompt) for e in c_ends] + [-1]
    mask = [False] * len(p_ids) + [True] * (len(c_ids) + 1)
    text = prompt + completion
    layout = Layout(kind="completion", segments=(("prompt", 0, len(prompt)), ("completion", len(prompt), len(text))), spans=tuple(spans))
    return finish(ids, mask, labels_from_spans(spans, starts, ends, text, at), text, starts, ends, layout)


def chat_messages(record: Record) -> list[dict]:
    """Validate the messages: a non-empty list of {role, content} with string fields and non-empty assistant content."""
    at, name = where(record.source, record.line), record.fields.messages
    messages = record.data[name]
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{at}: field {name!r} must be a non-empty list of {{role, content}} messages, got {messages!r:.80}.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"{at}: {name}[{i}] must be an object {{role, content}}, got {type(message).__name__}.")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"{at}: {name}[{i}].{key} must be a string, got {type(message.get(key)).__name__}; fix the record.")
            check_string(message[key], f"{name}[{i}].{key}", at)
        if message["role"] == "assistant" and not message["content"].strip():
            raise InputError(f"{at}: {name}[{i}] is an assistant message with empty content (nothing to train on); remove it.")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{at}: {name!r} has no assistant message (chat targets are assistant content); add one or remove the record.")
    return messages


def render_chat(tokenizer, messages: list[dict], template: str, at: str) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except jinja2.TemplateError as error:
        raise InputError(f"{at}: the chat template failed on this record ({error}); fix the messages or pass --chat-template.") from None


def content_starts(tokenizer, messages: list[dict], template: str, text: str, at: str) -> list[int | None]:
    """Where each message's content starts in the rendered `text` (None where the template does not copy it verbatim).

    The chat is rendered again with each content replaced by a unique placeholder, so a content that also
    occurs in a role header ("user") is not mistaken for it; each position is then checked in `text`.
    """
    placeholders = [f"<<tokenprio-content-{i}>>" for i in range(len(messages))]
    shadow = render_chat(tokenizer, [{**m, "content": p} for m, p in zip(messages, placeholders)], template, at)
    found: list[int | None] = [None] * len(messages)
    shift = 0  # length difference between `text` and `shadow` up to the current placeholder
    for match in re.finditer(r"<<tokenprio-content-(\d+)>>", shadow):
        i = int(match.group(1))
        start = match.start() + shift
        if shadow.count(placeholders[i]) == 1 and text[start : start + len(messages[i]["content"])] == messages[i]["content"]:
            found[i] = start
        shift += len(messages[i]["content"]) - len(placeholders[i])
    return found


def marker_mask(tokenizer, messages: list[dict], template: str, ids: list[int]) -> list[bool]:
    """Targets from the template's {% generation %} markers, via transformers' return_assistant_tokens_mask
    (a token is a target when its characters overlap a generation block)."""
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == ids, "apply_chat_template tokenised the rendered chat differently"
    return [bool(m) for m in out["assistant_masks"]]


def offset_mask(tokenizer, messages: list[dict], starts_in_text: list[int | None], ids: list[int], char_start: list[int], char_end: list[int], at: str) -> list[bool]:
    """Targets without generation markers: tokens overlapping each assistant content, plus the token right after
    the content when it is a special token (the end-of-turn: <|im_end|>, <|eot_id|>, </s>, ...)."""
    special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    starts, ends = np.asarray(char_start, dtype=np.int64), np.asarray(char_end, dtype=np.int64)  # (T,)
    mask = np.zeros(len(ids), dtype=bool)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = starts_in_text[i]
        if start is None:
            raise InputError(
                f"{at}: the content of message {i} (assistant) does not appear verbatim in the rendered chat, so its tokens "
                "cannot be found; pass --chat-template with a template that copies content unchanged or marks it with {% generation %}."
            )
        hit = np.flatnonzero((starts >= 0) & (starts < start + len(message["content"])) & (ends > start))
        mask[hit] = True
        after = int(hit[-1]) + 1
        if after < len(ids) and ids[after] in special_ids:
            mask[after] = True
    return mask.tolist()


def chat_spans(record: Record, messages: list[dict], starts_in_text: list[int | None] | None, at: str) -> list[tuple[int, int, str]]:
    """Spans of chat records index the content of message `message`; returned as offsets into the rendered text."""
    spans = []
    for index, span in enumerate(span_list(record.data, record.fields, at)):
        if not isinstance(span, dict):
            raise InputError(f"{at}: spans[{index}] must be an object {{message, start, end, label}}, got {type(span).__name__}.")
        message = span.get("message")
        if isinstance(message, bool) or not isinstance(message, int) or not 0 <= message < len(messages):
            raise InputError(f"{at}: spans[{index}].message must be a message index in [0, {len(messages)}), got {message!r:.80}.")
        start, end, label = read_span(span, index, len(messages[message]["content"]), at, f"the content of message {message}")
        base = starts_in_text[message]
        if base is None:
            raise InputError(
                f"{at}: spans[{index}] indexes message {message}, whose content does not appear verbatim in the rendered chat; "
                "pass --chat-template with a template that copies content unchanged."
            )
        spans.append((base + start, base + end, label))
    return spans


def encode_chat(record: Record, tokenizer, chat_template: str | None) -> Encoded:
    """Render with the chat template, tokenise with add_special_tokens=False; targets = assistant content + end-of-turn.

    Masks come from {% generation %} markers when the template has them, else from locating each assistant
    content in the rendered string (see `offset_mask`).
    """
    at = where(record.source, record.line)
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError(f"{at}: a chat record, but the tokenizer has no chat template; pass --chat-template FILE (a Jinja template).")
    messages = chat_messages(record)
    template = chat_template if chat_template is not None else tokenizer.get_chat_template()
    text = check_string(render_chat(tokenizer, messages, template, at), f"the chat rendered from {record.fields.messages!r}", at)
    ids, starts, ends = tokenize_with_offsets(tokenizer, text, add_special_tokens=False)
    has_markers = GENERATION_MARKER.search(template) is not None
    try:  # also stored as the record's layout (for `tokenprio project`)
        starts_in_text = content_starts(tokenizer, messages, template, text, at)
    except InputError:
        if not has_markers or record.data.get(record.fields.spans) is not None:
            raise
        starts_in_text = [None] * len(messages)  # a template that refuses placeholders: masks come from its markers
    if has_markers:
        mask = marker_mask(tokenizer, messages, template, ids)
    else:
        mask = offset_mask(tokenizer, messages, starts_in_text, ids, starts, ends, at)
    if not any(mask[1:]):
        raise InputError(f"{at}: the chat template marks no assistant token as a target; pass --chat-template with a template that renders assistant content.")
    spans = chat_spans(record, messages, starts_in_text, at)
    segments = tuple(
        (m["role"], start, start + len(m["content"])) if start is not None else (m["role"], -1, -1) for m, start in zip(messages, starts_in_text)
    )
    layout = Layout(kind="chat", segments=segments, spans=tuple(spans))
    return finish(ids, mask, labels_from_spans(spans, starts, ends, text, at), text, starts, ends, layout)


def finish(ids: list[int], mask: list[bool], labels: list[str | None], text: str, starts: list[int], ends: list[int], layout: Layout) -> Encoded:
    """Position 0 predicts nothing, so it is never a target."""
    assert len(ids) == len(mask) == len(labels) == len(starts) == len(ends), "token columns must align"
    return Encoded(input_ids=ids, loss_mask=[False] + list(mask[1:]), label=labels, text=text, char_start=starts, char_end=ends, layout=layout)


def encode_record(record: Record, tokenizer, *, chat_template: str | None = None) -> Encoded:
    """Tokenise one record into ids, targets, labels and character offsets (see the module docstring).

    `tokenizer` must be a fast (Rust-backed) Hugging Face tokenizer: offsets come from it. `chat_template`
    is a Jinja string that replaces the tokenizer's template for chat records. Raises InputError for a bad
    record (including records of kind "error"); never truncates.
    """
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need one (AutoTokenizer with use_fast=True).")
    if record.kind == "error":
        raise InputError(record.error)
    if record.kind == "text":
        return encode_text(record, tokenizer)
    if record.kind == "completion":
        return encode_completion(record, tokenizer)
    if record.kind == "chat":
        return encode_chat(record, tokenizer, chat_template)
    raise ValueError(f"unknown record kind {record.kind!r}")
