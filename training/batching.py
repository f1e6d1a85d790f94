"""How one window's rows become micro-batches: `--batching packed | grouped | sorted` (docs/design.md "Data order").

Every layout is a pure function of the rows' lengths and a seeded generator, so the data order stays a pure
function of (seed, epoch, manifest). A micro-batch is a `Bucket`: row indices in layout order and, for packed
batches, the packed sequence each row goes to.

    packed   rows in a seeded random order, placed first-fit into the B = ⌊batch_tokens / L⌋ sequences of L
             tokens of the current micro-batch (L = `pack_tokens`, the corpus's longest row, so every row fits an
             empty sequence). A row that fits none of the B sequences closes the micro-batch and opens the next
             one; rows are never split or reordered to fill gaps, so a micro-batch's composition is a random draw
             of the corpus. The unused tails of its sequences are its only padding. Attention stays inside each
             row (position ids restart per row; training/packing.py).
    grouped  rows in a seeded random order, cut into mega-batches of about 50 micro-batches' worth of tokens;
             each mega-batch is sorted by length and cut like `sorted`; the window's micro-batches are then
             permuted (the mega-batch idea of Hugging Face's LengthGroupedSampler, megabatch_mult = 50, with a
             token budget instead of a row count).
    sorted   the whole window sorted by length and cut greedily under B·T_max ≤ batch_tokens, then permuted:
             least padding, but each micro-batch holds rows of one length (and whatever content goes with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BATCHINGS = ("packed", "grouped", "sorted")
GROUPED_MEGA_BATCH = 50  # micro-batches' worth of tokens per length-sorted mega-batch (LengthGroupedSampler's megabatch_mult)


@dataclass(frozen=True)
class Layout:
    """What the data order depends on besides (seed, epoch, manifest)."""

    batching: str  # packed | grouped | sorted
    batch_tokens: int  # tokens per micro-batch incl. padding: sequences × their length
    pack_tokens: int = 0  # packed: length L of one packed sequence (the corpus's longest row); 0 for the others

    def __post_init__(self):
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching={self.batching!r}: use one of {', '.join(BATCHINGS)}.")
        if self.batching == "packed" and not 1 <= self.pack_tokens <= self.batch_tokens:
            raise ValueError(f"packed batches need 1 ≤ pack_tokens ({self.pack_tokens}) ≤ batch_tokens ({self.batch_tokens}).")
        if self.batching != "packed" and self.pack_tokens != 0:
            raise ValueError(f"pack_tokens={self.pack_tokens} applies to packed batches only (batching={self.batching}).")


@dataclass(frozen=True)
class Bucket:
    """One micro-batch of a window's plan."""

    rows: np.ndarray  # (R,) int64 row indices into the window, in layout order
    sequence: np.ndarray | None  # packed: (R,) int64 packed sequence of each row, nondecreasing from 0; None: one padded row per sequence


def plan_rows(n_tokens: np.ndarray, layout: Layout, rng: np.random.Generator) -> list[Bucket]:
    """The micro-batches of one window's rows (their lengths `n_tokens`), in their seeded order."""
    if len(n_tokens) and n_tokens.max() > layout.batch_tokens:
        raise ValueError(f"a row of {n_tokens.max()} tokens exceeds batch_tokens={layout.batch_tokens}; raise --batch-tokens.")
    if layout.batching == "packed":
        return pack_rows(n_tokens, layout.pack_tokens, layout.batch_tokens // layout.pack_tokens, rng)
    permuted = rng.permutation(len(n_tokens))
    if layout.batching == "sorted":
        batches = cut_sorted(permuted, n_tokens, layout.batch_tokens)
    else:
        batches = []
        for mega in mega_batches(permuted, n_tokens, GROUPED_MEGA_BATCH * layout.batch_tokens):
            batches += cut_sorted(mega, n_tokens, layout.batch_tokens)
    return [Bucket(batches[i], None) for i in rng.permutation(len(batches))]


def cut_sorted(rows: np.ndarray, n_tokens: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """`rows` stably sorted by length (equal lengths keep their order), cut greedily under count × longest ≤ batch_tokens."""
    by_length = rows[np.argsort(n_tokens[rows], kind="stable")]
    batches, start = [], 0
    for end in range(1, len(by_length) + 1):
        # Sorted ascending, so the newest row is the longest: the batch's padded size is (count)·its length.
        if end == len(by_length) or (end + 1 - start) * n_tokens[by_length[end]] > batch_tokens:
            batches.append(by_length[start:end])
            start = end
    return batches


def mega_batches(rows: np.ndarray, n_tokens: np.ndarray, mega_tokens: int) -> list[np.ndarray]:
    """Consecutive runs of `rows` holding about `mega_tokens` tokens each (a run ends once it reaches that size)."""
    ends = np.nonzero(np.diff(np.cumsum(n_tokens[rows]) // mega_tokens, prepend=0))[0] + 1
    return [part for part in np.split(rows, ends) if len(part)]


def pack_rows(n_tokens: np.ndarray, pack_tokens: int, sequences: int, rng: np.random.Generator) -> list[Bucket]:
    """Rows in a seeded random order, first-fit into `sequences` sequences of `pack_tokens` tokens per micro-batch.

    A row that fits no sequence of the open micro-batch closes it (the unused tails are padding) and starts the
    next. Rows of a sequence keep their placement order; empty sequences are dropped. Plain Python on purpose:
    per row it scans at most `sequences` integers, cheaper than a numpy call for the small B of a micro-batch.
    """
    if len(n_tokens) and n_tokens.max() > pack_tokens:
        raise ValueError(f"a row of {n_tokens.max()} tokens exceeds the packed sequence length {pack_tokens}.")
    buckets = []
    lengths = n_tokens.tolist()
    fill, placed = [0] * sequences, [[] for _ in range(sequences)]  # per sequence: tokens used, rows in placement order

    def close():
        used = [rows for rows in placed if rows]
        buckets.append(Bucket(np.array([r for rows in used for r in rows], dtype=np.int64),
                              np.repeat(np.arange(len(used), dtype=np.int64), [len(rows) for rows in used])))

    for row in rng.permutation(len(lengths)).tolist():
        n = lengths[row]
        target = next((s for s in range(sequences) if fill[s] + n <= pack_tokens), None)
        if target is None:  # fits nowhere: close this micro-batch, start the next with this row
            close()
            fill, placed = [0] * sequences, [[] for _ in range(sequences)]
            target = 0
        fill[target] += n
        placed[target].append(row)
    if any(placed):
        close()
    return buckets
