"""Records back from shard rows (`documents_of`): each record's tokens once, with its text and layout.

A row is a window; window 0 of a record holds its first tokens and window k > 0 repeats `n_context`
tokens of window k − 1 before its own, so a record's tokens are window 0 whole followed by every later
window without its first `n_context` positions. Their statistics are the ones scored there (each token is
scored, and is a target, in exactly one row), so document position 0 alone has none (NaN). The statistics a
token has where it is repeated context (scored from a shorter context) are kept apart, in `context_stats`.

The layout (how `text` was built) is read from the schema-1.1 record columns. Schema-1.0 shards do not
have them; for those it is inferred from the targets (`layout_v10`): a record with an appended EOS (a token
without characters at its end) whose text tokens after position 0 are all targets is plain text; one whose
targets begin at a later character P and run to the end is a prompt/completion split at P; anything else,
in particular a rendered chat (no appended EOS), cannot be told apart and is refused. Label spans of 1.0
shards are the runs of labelled tokens (their characters), so every labelled character stays labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring.inputs.layout import KINDS, Layout
from scoring.shards.schema import ShardError, has_record_fields, stat_prefixes_of, stat_columns


@dataclass(frozen=True)
class Documents:
    """The records of one shard; token arrays are flat over records: record d has tokens [token_offsets[d], token_offsets[d+1])."""

    doc_id: list[str]
    text: list[str]
    layout: list[Layout]
    first_row: np.ndarray  # (D,) int64 row of each record's window 0 (for messages)
    token_offsets: np.ndarray  # (D+1,) int64
    input_ids: np.ndarray  # (T,) int64
    loss_mask: np.ndarray  # (T,) bool
    weight: np.ndarray  # (T,) float64 stored Φ
    label: np.ndarray  # (T,) object: str or None
    char_start: np.ndarray  # (T,) int64 into the record's text, -1 for tokens without characters
    char_end: np.ndarray  # (T,) int64
    stats: dict[str, np.ndarray]  # {prefix}_logprob / {prefix}_entropy: (T,) float64 nats, NaN at each record's position 0
    context_stats: dict[str, np.ndarray]  # the same where the token is repeated context of a later window (the last one), else NaN

    @property
    def doc_of_token(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.doc_id)), np.diff(self.token_offsets))


def flat(table: pa.Table, name: str) -> np.ndarray:
    return pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)


def documents_of(table: pa.Table, where: str) -> Documents:
    """The records of one shard table (rows of a record are consecutive, windows 0, 1, ...).

    Raises ShardError naming `where`, the row and the fix when the rows cannot give their records back:
    windows out of order, no text, character offsets missing (every token −1) or outside the text.
    """
    # ---- rows → records: window 0 starts one, later windows follow it in order
    n_rows = table.num_rows
    window = table.column("window").to_numpy().astype(np.int64)
    n_context = table.column("n_context").to_numpy().astype(np.int64)
    row_ids = table.column("doc_id").to_pylist()
    starts = np.flatnonzero(window == 0)
    if n_rows and (not len(starts) or starts[0] != 0):
        raise ShardError(f"{where}: row 0 is window {window[0]}, not 0; the rows of a record must start with its window 0. Rescore the shard.")
    doc_of_row = np.cumsum(window == 0) - 1
    expected = np.arange(n_rows) - starts[doc_of_row] if n_rows else window
    bad = np.flatnonzero((window != expected) | (np.array(row_ids, dtype=object) != np.array(row_ids, dtype=object)[starts][doc_of_row]))
    if len(bad):
        row = int(bad[0])
        raise ShardError(f"{where}: row {row} (doc {row_ids[row]}, window {window[row]}) does not continue the record before it; "
                         "the windows of a record must be consecutive rows 0, 1, 2, ... Rescore the shard.")
    texts = table.column("text").to_pylist()
    missing_text = [row for row in starts.tolist() if not isinstance(texts[row], str)]
    if missing_text:
        row = missing_text[0]
        raise ShardError(f"{where}: row {row} (doc {row_ids[row]}) has no `text`; these shards do not record the text their tokens come from, "
                         "so they cannot be projected. Score the corpus again with `tokenprio score`, which stores it.")

    # ---- tokens: window 0 whole, later windows without their repeated context
    lengths = table.column("n_tokens").to_numpy().astype(np.int64)
    row_start = np.concatenate([[0], np.cumsum(lengths)])
    position = np.arange(row_start[-1]) - np.repeat(row_start[:-1], lengths)
    keep = position >= np.repeat(n_context, lengths)
    tokens_per_doc = np.bincount(np.repeat(doc_of_row, lengths)[keep], minlength=len(starts)) if n_rows else np.zeros(0, np.int64)
    token_offsets = np.concatenate([[0], np.cumsum(tokens_per_doc)]).astype(np.int64)
    char_start = flat(table, "char_start").astype(np.int64)[keep]
    char_end = flat(table, "char_end").astype(np.int64)[keep]
    names = [name for p in stat_prefixes_of(table.schema) for name in stat_columns(p)]
    all_stats = {name: flat(table, name).astype(np.float64) for name in names}
    # Context position p of row k is record token (first kept token of row k) − n_context + p, in flat record order.
    first_kept = np.cumsum(lengths - n_context) - (lengths - n_context)
    token_of_context = np.repeat(first_kept - n_context, lengths)[~keep] + position[~keep]
    context_stats = {}
    for name, values in all_stats.items():
        context_stats[name] = np.full(int(keep.sum()), np.nan)
        context_stats[name][token_of_context] = values[~keep]  # rows in order: the last window's value stays
    stats = {name: values[keep] for name, values in all_stats.items()}
    docs = Documents(
        doc_id=[row_ids[row] for row in starts.tolist()], text=[texts[row] for row in starts.tolist()], layout=[], first_row=starts,
        token_offsets=token_offsets, input_ids=flat(table, "input_ids").astype(np.int64)[keep],
        loss_mask=flat(table, "loss_mask").astype(bool)[keep], weight=flat(table, "weight").astype(np.float64)[keep],
        label=flat(table, "label").astype(object)[keep], char_start=char_start, char_end=char_end, stats=stats,
        context_stats=context_stats,
    )
    check_offsets(docs, where)

    # ---- layouts: stored (schema 1.1) or inferred from the targets (1.0)
    if has_record_fields(table.schema):
        kinds, segments, spans = (table.column(name).take(pa.array(starts)).to_pylist() for name in ("record_kind", "segments", "label_spans"))
        for d, kind in enumerate(kinds):
            if kind not in KINDS:
                raise ShardError(f"{where}: row {starts[d]} (doc {docs.doc_id[d]}): record_kind {kind!r} is not one of {KINDS}; rescore the shard.")
        docs.layout.extend(
            Layout(kind=kind, segments=tuple((s["role"], s["start"], s["end"]) for s in segs), spans=tuple((s["start"], s["end"], s["label"]) for s in sp))
            for kind, segs, sp in zip(kinds, segments, spans)
        )
    else:
        docs.layout.extend(layout_v10(docs, d, where) for d in range(len(docs.doc_id)))
    return docs


def check_offsets(docs: Documents, where: str) -> None:
    """Every record has tokens with characters, and every character span lies inside its text."""
    doc = docs.doc_of_token
    text_length = np.array([len(text) for text in docs.text], dtype=np.int64)
    has_chars = docs.char_start >= 0
    with_chars = np.bincount(doc[has_chars], minlength=len(docs.doc_id))
    empty = np.flatnonzero(with_chars == 0)
    if len(empty):
        d = int(empty[0])
        raise ShardError(
            f"{where}: row {docs.first_row[d]} (doc {docs.doc_id[d]}): no token has a character span (char_start/char_end are all -1), "
            "so nothing says which characters each token covers; these shards cannot be projected. Score the corpus with `tokenprio score`, "
            "which stores every token's offsets."
        )
    outside = has_chars & ((docs.char_end < docs.char_start) | (docs.char_end > text_length[doc]))
    if outside.any():
        t = int(np.flatnonzero(outside)[0])
        d = int(doc[t])
        raise ShardError(f"{where}: row {docs.first_row[d]} (doc {docs.doc_id[d]}): a token's character span [{docs.char_start[t]}, {docs.char_end[t]}) "
                         f"lies outside its text of {text_length[d]} characters; the offsets are damaged. Rescore the shard.")


def layout_v10(docs: Documents, d: int, where: str) -> Layout:
    """The layout of record d of a schema-1.0 shard, inferred from its targets (see the module docstring)."""
    lo, hi = docs.token_offsets[d], docs.token_offsets[d + 1]
    start, end, mask, label = docs.char_start[lo:hi], docs.char_end[lo:hi], docs.loss_mask[lo:hi], docs.label[lo:hi]
    text = docs.text[d]
    at = f"{where}: row {docs.first_row[d]} (doc {docs.doc_id[d]})"
    has_chars = start >= 0
    if has_chars[-1] or not mask[-1]:
        raise ShardError(
            f"{at}: a schema-1.0 record without an appended EOS target, such as a rendered chat; 1.0 shards do not record where message "
            "contents sit in the text, so chat records cannot be projected. Score the corpus again with this tokenprio (schema 1.1)."
        )
    later = has_chars & (np.arange(len(start)) >= 1)
    if mask[later].all():
        kind, segments = "text", (("text", 0, len(text)),)
    else:
        split = int(start[has_chars & mask].min()) if (has_chars & mask).any() else len(text)
        if mask[has_chars & (start < split)].any() or not mask[has_chars & (start >= split)].all():
            raise ShardError(f"{at}: the targets are neither a whole text nor a completion after a prompt; this 1.0 record cannot be rebuilt "
                             "for another tokenizer. Score the corpus again with this tokenprio (schema 1.1).")
        kind, segments = "completion", (("prompt", 0, split), ("completion", split, len(text)))
    # Spans: runs of consecutive character tokens with one label, as the characters those tokens cover.
    spans, run = [], None
    for t in np.flatnonzero(has_chars & (label != None)).tolist():  # noqa: E711 (elementwise on an object array)
        if run is not None and run[2] == label[t] and run[3] == t - 1:
            run = (run[0], max(run[1], int(end[t])), run[2], t)
        else:
            if run is not None:
                spans.append(run[:3])
            run = (int(start[t]), int(end[t]), label[t], t)
    if run is not None:
        spans.append(run[:3])
    return Layout(kind=kind, segments=segments, spans=tuple(spans))
