"""How a record's rendered text was built (`Layout`), and the record rebuilt from it (`record_from_layout`).

Scoring stores each record's rendered `text` and its layout (shard schema 1.1: `record_kind`, `segments`,
`label_spans`), so `tokenprio project` can encode the same record again with another tokenizer and chat
template, exactly as `tokenprio score` would have encoded it:

    text         segments ("text", 0, len(text))
    completion   segments ("prompt", 0, P), ("completion", P, len(text)); text = prompt + completion
    chat         one segment per message: (role, start, end) of its content in the rendered text, or
                 (role, -1, -1) where the template did not copy the content verbatim

`spans` are the input's label spans as absolute [start, end) offsets into `text`.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoring.inputs.readers import InputError, Record

KINDS = ("text", "completion", "chat")


@dataclass(frozen=True)
class Layout:
    kind: str  # text | completion | chat
    segments: tuple[tuple[str, int, int], ...]  # (role, start, end) of each part of `text`; chat: message contents
    spans: tuple[tuple[int, int, str], ...]  # label spans (start, end, label), absolute offsets into `text`


def record_from_layout(text: str, layout: Layout, *, source: str, line: int, doc_id: str) -> Record:
    """The input record that renders to `text` under `layout` (spans included), for encoding with another tokenizer.

    Raises InputError (naming `source, row line`) when the layout cannot give the record back: a chat
    message whose content the reference's template did not copy verbatim, a span outside every message.
    """
    at = f"{source}, row {line}"
    spans = [{"start": start, "end": end, "label": label} for start, end, label in layout.spans]
    if layout.kind == "text":
        return Record(source=source, line=line, doc_id=doc_id, kind="text", data={"text": text, "spans": spans}, error=None)
    if layout.kind == "completion":
        split = layout.segments[0][2]
        data = {
            "prompt": text[:split],
            "completion": text[split:],
            "spans": [{**span, "start": span["start"] - split, "end": span["end"] - split} for span in spans],
        }
        return Record(source=source, line=line, doc_id=doc_id, kind="completion", data=data, error=None)
    if layout.kind != "chat":
        raise InputError(f"{at}: record_kind {layout.kind!r} is not one of {KINDS}; the shard is damaged, rescore it.")
    messages = []
    for i, (role, start, end) in enumerate(layout.segments):
        if start < 0:
            raise InputError(
                f"{at} (doc {doc_id}): the reference's chat template did not copy the content of message {i} ({role}) verbatim, "
                "so the shards cannot give the message back; rescore with a template that copies content unchanged to project it."
            )
        messages.append({"role": role, "content": text[start:end]})
    chat_spans = []
    for span in spans:
        owner = [i for i, (_, start, end) in enumerate(layout.segments) if start <= span["start"] and span["end"] <= end]
        if not owner:
            raise InputError(f"{at} (doc {doc_id}): label span [{span['start']}, {span['end']}) lies in no message content; the shard is damaged, rescore it.")
        base = layout.segments[owner[0]][1]
        chat_spans.append({"message": owner[0], "start": span["start"] - base, "end": span["end"] - base, "label": span["label"]})
    data = {"messages": messages, "spans": chat_spans}
    return Record(source=source, line=line, doc_id=doc_id, kind="chat", data=data, error=None)
