"""Projection of per-token statistics from the reference's tokens onto a student's tokens of the same
characters (`tokenprio project`): pure functions over flat numpy arrays, no tokenizer, no model.

Both tokenisations cover the records of one shard, flat over records (record d's tokens are
[token_offsets[d], token_offsets[d+1])), each token with its character span [char_start, char_end) in
its own rendering of the record (−1: no characters, e.g. BOS/EOS). The renderings agree on the
`Alignment`: character ranges that are the same text in both (whole texts for plain and prompt/completion
records; for chat the message contents, and the template text between two contents where both
templates render it identically).

The rule (PROJECTION_RULE, recorded in the shards' metadata):

- **Aligned tokens.** A reference token r spreads its log-prob evenly over its n_r aligned characters.
  Each character is shared between the m reference and k student tokens covering it (m, k > 1 only
  where a byte-level tokenizer splits one character): when m = k the j-th reference token's share goes
  to the j-th student token, otherwise each of the k student tokens takes 1/k of every share. So
  log p(σ) = Σ_r Σ_c w(r, σ, c) · log p(r) / n_r, and the total over any set of characters is conserved.
  The same weights w make the overlap (in characters) of r and σ.
- **Tokens without aligned characters** (BOS, EOS, template specials, template text the two templates
  render differently) are matched within their record's gap (the stretch between two segments, counted
  by position) and class (target or not): the student's EOS takes the reference's EOS statistics, an
  end-of-turn token the reference's end-of-turn of the same turn. Equal counts match in order, else
  each student token takes an equal share of the class's log-prob (its total is conserved) and the mean
  of its entropies.
- **loss_mask**: a student token is a target when its own encoding makes it one (the student's chat
  template decides role headers and end-of-turn tokens, exactly as scoring) and it overlaps a reference
  target (a target character, or a target of its gap class). A target's statistics come from the
  reference targets it overlaps only; a non-target's from every reference token it overlaps that has
  statistics, NaN where none has (e.g. characters the reference predicted nothing for).
- **Repeated context.** A row's context tokens (never targets) carry the reference's statistics from a row
  where those characters were repeated context (scored from a shorter context), where there is one, so
  projecting onto the same tokenizer and windows gives the source back; elsewhere the statistics above.
- **Entropy**: overlap-weighted mean. **Φ** (targets only): overlap-weighted `mean`, or `min` / `max`,
  over the reference targets it overlaps; if any of them has Φ < 0 only the negative ones count, so a
  student token overlapping an unlearned token is unlearned under every reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHI_REDUCE = ("mean", "min", "max")
PROJECTION_RULE = {
    "version": 1,
    "logprob": "conserved: each reference token's log-prob spread evenly over its aligned characters, summed over a student token's characters",
    "entropy": "overlap-weighted mean of the overlapping reference tokens (characters in common)",
    "phi": "overlap-weighted mean|min|max over the overlapping reference targets; negative reference Φ, where present, alone counts",
    "loss_mask": "the student's own encoding's targets that overlap a reference target",
    "no_characters": "tokens without aligned characters match within their gap and class (student EOS ← reference EOS, in order when counts agree)",
}


class ProjectionError(ValueError):
    """The student's tokens cannot carry the reference's statistics (a character it does not cover, ...)."""


@dataclass(frozen=True)
class Tokenisation:
    """One tokenisation of a shard's records, flat over records."""

    texts: list[str]  # each record's rendered text (its characters; used for lengths and messages)
    names: list[str]  # each record as messages name it, e.g. "part-00000.parquet, row 3 (doc x)"
    token_offsets: np.ndarray  # (D+1,) int64
    char_start: np.ndarray  # (T,) int64 index into the record's text, -1 for tokens without characters
    char_end: np.ndarray  # (T,) int64
    target: np.ndarray  # (T,) bool: the reference's loss_mask, or the student's own encoding's
    segment_offsets: np.ndarray  # (D+1,) int64: record d's segments are [segment_offsets[d], segment_offsets[d+1])
    segment_end: np.ndarray  # (S,) int64 end of each segment in its record's text, non-decreasing within a record

    @property
    def doc(self) -> np.ndarray:
        """(T,) int64 record of each token."""
        return np.repeat(np.arange(len(self.texts), dtype=np.int64), np.diff(self.token_offsets))

    @property
    def char_base(self) -> np.ndarray:
        """(D+1,) int64 first global character of each record: texts joined with one spare character between
        records, so a position at a record's end never equals the next record's first character."""
        return np.concatenate([[0], np.cumsum([len(text) + 1 for text in self.texts])]).astype(np.int64)


@dataclass(frozen=True)
class Alignment:
    """Character ranges [ref_start, ref_end) of the reference's text of record `doc` that are the same text at
    [student_start, student_start + length) of the student's; (N,) int64 each."""

    doc: np.ndarray
    ref_start: np.ndarray
    ref_end: np.ndarray
    student_start: np.ndarray


@dataclass(frozen=True)
class Projected:
    """The student tokens' columns, (T_student,) each, and what the projection could not carry."""

    loss_mask: np.ndarray  # bool
    logprob: dict[str, np.ndarray]  # float64 nats, NaN where no reference token has a statistic
    entropy: dict[str, np.ndarray]  # float64 nats
    context_logprob: dict[str, np.ndarray]  # the same for the student's repeated-context positions (non-targets)
    context_entropy: dict[str, np.ndarray]
    phi: np.ndarray  # float64, 0 off the mask
    dropped_student_targets: int  # the student's own targets with no reference target (made non-targets)
    lost_reference_targets: int  # reference targets whose log-prob did not all reach student targets
    lost_target_logprob: dict[str, float]  # Σ reference target log-prob − Σ student target log-prob (nats)


def aligned_intervals(ref_texts, ref_segments, student_texts, student_segments, names) -> Alignment:
    """The Alignment of two renderings of the same records, from their segments ((role, start, end) lists).

    Segment i of the reference and of the student hold the same text (the same message content); the
    gap before segment i (and after the last) aligns when both renderings have the same text there.
    Raises ProjectionError naming the record when the segments disagree in number, roles or text.
    """
    rows = []
    for d, (ref_text, ref_segs, student_text, student_segs) in enumerate(zip(ref_texts, ref_segments, student_texts, student_segments)):
        if [s[0] for s in ref_segs] != [s[0] for s in student_segs]:
            raise ProjectionError(f"{names[d]}: the student's rendering has parts {[s[0] for s in student_segs]}, the reference's {[s[0] for s in ref_segs]}.")
        ref_bounds = [0] + [b for _, a, e in ref_segs for b in (a, e)] + [len(ref_text)]
        student_bounds = [0] + [b for _, a, e in student_segs for b in (a, e)] + [len(student_text)]
        for i in range(len(ref_bounds) // 2):  # gap i is [bounds[2i], bounds[2i+1]); segment i follows it
            (ra, rb), (sa, sb) = ref_bounds[2 * i : 2 * i + 2], student_bounds[2 * i : 2 * i + 2]
            if rb > ra and ref_text[ra:rb] == student_text[sa:sb]:
                rows.append((d, ra, rb, sa))
            if i < len(ref_segs):
                (_, ra, rb), (role, sa, sb) = ref_segs[i], student_segs[i]
                if ref_text[ra:rb] != student_text[sa:sb]:
                    raise ProjectionError(f"{names[d]}: segment {i} ({role}) differs between the reference's and the student's rendering.")
                if rb > ra:
                    rows.append((d, ra, rb, sa))
    columns = np.array(rows, dtype=np.int64).reshape(-1, 4).T
    return Alignment(doc=columns[0], ref_start=columns[1], ref_end=columns[2], student_start=columns[3])


# ----------------------------------------------------------------------------------------------
# Building blocks


def ramp(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n in lengths, concatenated: (Σ lengths,) int64."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def char_pairs(tok: Tokenisation) -> tuple[np.ndarray, np.ndarray]:
    """(token, global character) for every character of every token: two (P,) int64 arrays, in token order."""
    has_chars = (tok.char_start >= 0) & (tok.char_end > tok.char_start)
    token = np.flatnonzero(has_chars)
    n_chars = (tok.char_end - tok.char_start)[token]
    first = tok.char_base[tok.doc[token]] + tok.char_start[token]
    return np.repeat(token, n_chars), np.repeat(first, n_chars) + ramp(n_chars)


def gap_ids(tok: Tokenisation) -> np.ndarray:
    """(T,) int64 global id of the gap each token sits in: record d has gaps 0..n_segments(d), gap g lying after
    segment g − 1. A token with characters sits at its first character; one without, where the previous
    token with characters ended (so EOS after the last segment is in the last gap, BOS in gap 0)."""
    doc, base = tok.doc, tok.char_base
    has_chars = (tok.char_start >= 0) & (tok.char_end > tok.char_start)
    ends = np.where(has_chars, base[doc] + tok.char_end, -1)
    previous_end = np.concatenate([[-1], np.maximum.accumulate(ends)[:-1]]) if len(ends) else ends
    at = np.where(has_chars, base[doc] + tok.char_start, np.maximum(previous_end, base[doc]))
    segment_doc = np.repeat(np.arange(len(tok.texts), dtype=np.int64), np.diff(tok.segment_offsets))
    segment_end = base[segment_doc] + tok.segment_end
    gap = np.searchsorted(segment_end, at, side="right") - tok.segment_offsets[doc]
    return tok.segment_offsets[doc] + doc + gap


def ranks(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): a stable sort of `keys` and each element's rank among equal keys (in array order)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    new = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]) if len(keys) else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(new, np.arange(len(keys)), 0)) if len(keys) else np.zeros(0, np.int64)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - group_start
    return order, rank


@dataclass(frozen=True)
class Links:
    """The projection's sparse weights: link i sends w_mass[i] of reference token ref[i]'s log-prob to
    student token student[i], with overlap w_overlap[i] (characters in common)."""

    ref: np.ndarray
    student: np.ndarray
    w_mass: np.ndarray
    w_overlap: np.ndarray


def aligned_links(ref: Tokenisation, student: Tokenisation, alignment: Alignment) -> Links:
    """Links of tokens that share aligned characters (the first bullet of the module docstring)."""
    ref_base, student_base = ref.char_base, student.char_base
    # ---- reference characters → student characters
    to_student = np.full(int(ref_base[-1]), -1, dtype=np.int64)
    lengths = alignment.ref_end - alignment.ref_start
    to_student[np.repeat(ref_base[alignment.doc] + alignment.ref_start, lengths) + ramp(lengths)] = (
        np.repeat(student_base[alignment.doc] + alignment.student_start, lengths) + ramp(lengths)
    )
    ref_token, ref_char = char_pairs(ref)
    ref_char = to_student[ref_char]
    aligned = ref_char >= 0
    ref_token, ref_char = ref_token[aligned], ref_char[aligned]
    n_aligned = np.bincount(ref_token, minlength=len(ref.char_start))  # n_r

    # ---- who covers each student character, in token order: CSR over characters
    student_token, student_char = char_pairs(student)
    order = np.argsort(student_char, kind="stable")
    student_token, student_char = student_token[order], student_char[order]
    n_chars = int(student_base[-1])
    k = np.bincount(student_char, minlength=n_chars)
    first = np.concatenate([[0], np.cumsum(k)])[:-1]
    ref_order, rank = ranks(ref_char)
    m = np.bincount(ref_char, minlength=n_chars)
    uncovered = np.flatnonzero((m > 0) & (k == 0))
    if len(uncovered):
        char = int(uncovered[0])
        d = int(np.searchsorted(student_base, char, side="right") - 1)
        c = char - int(student_base[d])
        raise ProjectionError(
            f"{student.names[d]}: no student token covers character {c} ({student.texts[d][c:c + 1]!r}) of the text, which the reference "
            "scored; the student tokenizer drops characters (a pre-tokenizer that removes whitespace?) and cannot reproduce the text."
        )
    # ---- m = k: the j-th reference token's share to the j-th student token; else 1/k to each
    matched = m[ref_char] == k[ref_char]
    links_ref = [ref_token[matched]]
    links_student = [student_token[first[ref_char[matched]] + rank[matched]]]
    weights = [np.ones(int(matched.sum()))]
    spread = np.flatnonzero(~matched)
    if len(spread):
        fan = k[ref_char[spread]]
        links_ref.append(np.repeat(ref_token[spread], fan))
        links_student.append(student_token[np.repeat(first[ref_char[spread]], fan) + ramp(fan)])
        weights.append(np.repeat(1.0 / fan, fan))
    r, s, w = np.concatenate(links_ref), np.concatenate(links_student), np.concatenate(weights)
    return Links(ref=r, student=s, w_mass=w / n_aligned[r], w_overlap=w)


def gap_links(ref: Tokenisation, student: Tokenisation, ref_free: np.ndarray, student_free: np.ndarray) -> Links:
    """Links of tokens without aligned characters (`*_free`, (T,) bool), matched by (gap, class) (second bullet)."""
    ref_index = np.flatnonzero(ref_free)
    ref_key = gap_ids(ref)[ref_index] * 2 + ref.target[ref_index]
    ref_order = np.argsort(ref_key, kind="stable")
    ref_index, ref_key = ref_index[ref_order], ref_key[ref_order]
    keys, key_first, key_count = np.unique(ref_key, return_index=True, return_counts=True)
    keys, key_first, key_count = (np.append(a, fill) for a, fill in ((keys, -1), (key_first, 0), (key_count, 0)))  # a sentinel for "none"

    def members(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first position in the sorted reference tokens, count) of each class key; count 0 where the reference has none."""
        at = np.minimum(np.searchsorted(keys[:-1], key), len(keys) - 1)
        at = np.where(keys[at] == key, at, len(keys) - 1)
        return key_first[at], key_count[at]

    student_index = np.flatnonzero(student_free)
    target_key = gap_ids(student)[student_index] * 2 + 1
    # A student target whose gap has no reference target is no target here: it takes the non-target class.
    student_key = np.where(student.target[student_index] & (members(target_key)[1] > 0), target_key, target_key - 1)
    ref_first, ref_count = members(student_key)
    _, student_rank = ranks(student_key)
    _, inverse, counts = np.unique(student_key, return_inverse=True, return_counts=True)
    student_count = counts[inverse]
    in_order = (ref_count == student_count) & (ref_count > 0)
    r = [ref_index[ref_first[in_order] + student_rank[in_order]]]
    s = [student_index[in_order]]
    w = [np.ones(int(in_order.sum()))]
    shared = np.flatnonzero(~in_order & (ref_count > 0))
    if len(shared):
        fan = ref_count[shared]
        r.append(ref_index[np.repeat(ref_first[shared], fan) + ramp(fan)])
        s.append(np.repeat(student_index[shared], fan))
        w.append(np.repeat(1.0 / student_count[shared], fan))
    weights = np.concatenate(w)
    return Links(ref=np.concatenate(r), student=np.concatenate(s), w_mass=weights, w_overlap=weights)


# ----------------------------------------------------------------------------------------------
# The projection


def reduce_phi(links: Links, phi_ref: np.ndarray, use: np.ndarray, n_student: int, phi_reduce: str) -> np.ndarray:
    """(T_student,) Φ over the links `use` (targets to targets): negatives alone where a token has any."""
    phi = phi_ref[links.ref]
    negative = use & (phi < 0)
    has_negative = np.bincount(links.student[negative], minlength=n_student) > 0
    use = use & (negative | ~has_negative[links.student])
    student = links.student[use]
    if phi_reduce == "mean":
        total = np.bincount(student, weights=(links.w_overlap * phi)[use], minlength=n_student)
        weight = np.bincount(student, weights=links.w_overlap[use], minlength=n_student)
        return np.divide(total, weight, out=np.zeros(n_student), where=weight > 0)
    out = np.full(n_student, np.inf if phi_reduce == "min" else -np.inf)
    (np.minimum if phi_reduce == "min" else np.maximum).at(out, student, phi[use])
    return np.where(np.isfinite(out), out, 0.0)


def carry(links: Links, values: np.ndarray, use: np.ndarray, n_student: int, kind: str) -> np.ndarray:
    """(T_student,) one reference column over the links `use`: "logprob" sums each link's share of the log-prob,
    "entropy" takes the overlap-weighted mean; NaN where a student token has no such link."""
    student = links.student[use]
    if kind == "logprob":
        total = np.bincount(student, weights=(links.w_mass * values[links.ref])[use], minlength=n_student)
        return np.where(np.bincount(student, minlength=n_student) > 0, total, np.nan)
    total = np.bincount(student, weights=(links.w_overlap * values[links.ref])[use], minlength=n_student)
    weight = np.bincount(student, weights=links.w_overlap[use], minlength=n_student)
    return np.divide(total, weight, out=np.full(n_student, np.nan), where=weight > 0)


def project(ref: Tokenisation, student: Tokenisation, alignment: Alignment, logprob: dict[str, np.ndarray], entropy: dict[str, np.ndarray],
            phi: np.ndarray, phi_reduce: str, context_logprob: dict[str, np.ndarray], context_entropy: dict[str, np.ndarray]) -> Projected:
    """Project the reference's columns onto the student's tokens by the rule of the module docstring.

    logprob / entropy: (T_ref,) float64 per model prefix, the statistics where each token is scored as a target;
    context_*: the same where the token is repeated context of a later window (NaN where it is not); phi: (T_ref,)
    the stored weight.
    """
    if phi_reduce not in PHI_REDUCE:
        raise ValueError(f"--phi-reduce {phi_reduce!r}: choose one of {', '.join(PHI_REDUCE)}.")
    n_ref, n_student = len(ref.char_start), len(student.char_start)
    # ---- links: aligned characters, then tokens without any, matched by gap and class
    aligned = aligned_links(ref, student, alignment)
    ref_free = np.bincount(aligned.ref, minlength=n_ref) == 0
    student_free = np.bincount(aligned.student, minlength=n_student) == 0
    gaps = gap_links(ref, student, ref_free, student_free)
    links = Links(*(np.concatenate([getattr(aligned, f), getattr(gaps, f)]) for f in ("ref", "student", "w_mass", "w_overlap")))

    # ---- targets: the student's own, where they overlap a reference target
    from_target = ref.target[links.ref]
    loss_mask = student.target & (np.bincount(links.student[from_target], minlength=n_student) > 0)
    to_target = loss_mask[links.student]

    # ---- statistics: targets from reference targets only, others from every reference token with a value
    out, lost = {"logprob": {}, "entropy": {}, "context_logprob": {}, "context_entropy": {}}, {}
    for kind, columns, context in (("logprob", logprob, context_logprob), ("entropy", entropy, context_entropy)):
        for name, values in columns.items():
            out[kind][name] = carry(links, values, np.where(to_target, from_target, np.isfinite(values[links.ref])), n_student, kind)
            as_context = np.where(np.isfinite(context[name]), context[name], values)  # context rows' own values where they exist
            out[f"context_{kind}"][name] = carry(links, as_context, np.isfinite(as_context[links.ref]), n_student, kind)
    for name, values in logprob.items():
        lost[name] = float(values[ref.target].sum() - out["logprob"][name][loss_mask].sum())
    out_phi = np.where(loss_mask, reduce_phi(links, phi, to_target & from_target, n_student, phi_reduce), 0.0)

    # ---- what could not be carried
    received = np.bincount(links.ref[to_target & from_target], weights=links.w_mass[to_target & from_target], minlength=n_ref)
    return Projected(
        loss_mask=loss_mask, logprob=out["logprob"], entropy=out["entropy"], context_logprob=out["context_logprob"],
        context_entropy=out["context_entropy"], phi=out_phi, dropped_student_targets=int((student.target & ~loss_mask).sum()),
        lost_reference_targets=int((ref.target & (received < 1 - 1e-9)).sum()), lost_target_logprob=lost,
    )
