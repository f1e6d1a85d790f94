"""Streaming shards into micro-batches, in an order that is a pure function of (seed, epoch, manifest).

The order (docs/design.md "Data order, distribution and resume"):

    1. permute the corpus's row groups with rng(seed, epoch);
    2. take windows of `window_groups` consecutive groups of that permutation;
    3. inside a window, turn the rows into micro-batches with rng(seed, epoch, window) as the layout says
       (training/batching.py): `packed` (default) draws rows at random and packs them into sequences,
       `grouped` sorts by length inside random mega-batches, `sorted` sorts the whole window by length.

Micro-batch j of an epoch (counted over all windows) goes to rank j mod W, and optimizer step s of the epoch
consumes micro-batches [s·GA·W, (s+1)·GA·W); a final partial step is dropped. So the global batch of a step
does not depend on how it is split into ranks and accumulation steps, and resuming at (epoch, step) only
recomputes the plan. Memory holds one window of row groups (about `window_groups` × 1M tokens), never the
corpus: the planning pass reads only the `n_tokens` column, one row group at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from scoring.shards import ShardSet, flat_token_columns
from training.batching import Bucket, Layout, plan_rows


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int  # row group index inside the file
    rows: int


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: model inputs (B sequences of T tokens) plus flat per-token columns over the rows' real positions.

    Padded layouts (grouped, sorted) hold one row per sequence, right-padded, with an attention mask. Packed
    layouts hold several rows per sequence one after the other, with position ids that restart at 0 for each
    row (and for the padding at a sequence's end) and no attention mask: from those, transformers' masking
    (masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask, so no row sees another.

    The flat columns list the rows in sequence order, each row's tokens in order, which is also the row-major
    order of the real positions in (B, T). Flat position i is token t of a row that starts at column o of
    sequence b; it is predicted by the hidden state at index `hidden_index[i]` = b·T + o + t − 1 of the (B·T)
    flattened hidden states (meaningless for t = 0, where loss_mask is false: training.checks.scan_corpus checks it).
    """

    index: int  # global micro-batch index j within the epoch
    input_ids: torch.Tensor  # (B, T) int64, padding 0
    attention_mask: torch.Tensor | None  # (B, T) int64 for padded layouts; None when packed
    position_ids: torch.Tensor | None  # (B, T) int64 restarting per row when packed; None for padded layouts (0..T−1)
    tokens: dict[str, torch.Tensor]  # (N,) each: "loss_mask" bool, "seq_index" int64 (row), stored columns
    hidden_index: torch.Tensor  # (N,) int64 into the (B·T) flattened hidden states
    targets: torch.Tensor  # (N,) int64 token ids
    padded_tokens: int  # B·T
    rows: int  # shard rows in this micro-batch (B for padded layouts, ≥ B when packed)


def row_groups(shards: ShardSet) -> list[RowGroup]:
    """Every row group of the corpus, in manifest order (the manifest lists each shard's groups)."""
    groups = []
    for entry, path in zip(sorted(shards.manifest["shards"], key=lambda s: s["index"]), shards.paths):
        groups += [RowGroup(path, k, g["rows"]) for k, g in enumerate(entry["row_groups"])]
    return groups


def epoch_windows(n_groups: int, seed: int, epoch: int, window_groups: int) -> list[np.ndarray]:
    """Row-group indices of each window of an epoch: a seeded permutation cut into windows of K groups."""
    order = np.random.default_rng([seed, epoch]).permutation(n_groups)
    return [order[i : i + window_groups] for i in range(0, n_groups, window_groups)]


def read_groups(groups: list[RowGroup], columns: list[str]) -> pa.Table:
    """The rows of several row groups (only `columns`), concatenated in the given order."""
    tables = [pq.ParquetFile(g.path).read_row_group(g.index, columns=columns) for g in groups]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def window_plan(groups: list[RowGroup], window: np.ndarray, seed: int, epoch: int, window_number: int, layout: Layout) -> list[Bucket]:
    """Micro-batches (row indices into the window's concatenated rows, and their packing) of one window."""
    n_tokens = read_groups([groups[g] for g in window], ["n_tokens"]).column("n_tokens").to_numpy()
    return plan_rows(n_tokens, layout, np.random.default_rng([seed, epoch, window_number]))


def count_micro_batches(groups: list[RowGroup], seed: int, epoch: int, window_groups: int, layout: Layout) -> int:
    """Micro-batches in one epoch (reads only the n_tokens column)."""
    windows = epoch_windows(len(groups), seed, epoch, window_groups)
    return sum(len(window_plan(groups, w, seed, epoch, i, layout)) for i, w in enumerate(windows))


def make_micro_batch(table: pa.Table, index: int, columns: list[str], label_names: list[str], sequence: np.ndarray | None = None) -> MicroBatch:
    """Lay the rows of `table` out as (B, T) model inputs and flatten the per-token columns (label codes map into `label_names`).

    `sequence` (R,) nondecreasing gives the packed sequence of each row (a Bucket's); None pads one row per sequence.
    """
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    packed = sequence is not None
    sequence = np.asarray(sequence, dtype=np.int64) if packed else np.arange(len(lengths))
    if len(sequence) != len(lengths) or (np.diff(sequence) < 0).any():
        raise ValueError("make_micro_batch: `sequence` must give one nondecreasing packed sequence per row (rows sequence-major).")
    fill = np.bincount(sequence, weights=lengths).astype(np.int64)  # (B,) real tokens per sequence
    batch, width = len(fill), int(fill.max())
    real = np.arange(width)[None, :] < fill[:, None]  # (B, T) bool; rows of a sequence are contiguous from column 0
    flat_ids = pc.list_flatten(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    input_ids = np.zeros((batch, width), dtype=np.int64)
    input_ids[real] = flat_ids  # row-major fill matches the concatenation order of the flat columns
    row_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (R,) flat position of each row's token 0
    tokens, local_names = flat_token_columns(table, columns)
    if "label" in tokens and local_names:
        lookup = np.array([label_names.index(name) for name in local_names], dtype=np.int64)
        codes = tokens["label"].numpy()
        tokens["label"] = torch.from_numpy(np.where(codes >= 0, lookup[np.maximum(codes, 0)], -1))
    flat_padded = np.nonzero(real.reshape(-1))[0]  # (N,) b·T + o + t
    position_ids = None
    if packed:
        positions = np.arange(width)[None, :] - np.where(real, 0, fill[:, None])  # (B, T): the padding after a sequence restarts at 0 too
        positions[real] = np.arange(len(flat_ids)) - np.repeat(row_starts, lengths)  # t within its row
        position_ids = torch.from_numpy(positions)
    return MicroBatch(
        index=index,
        input_ids=torch.from_numpy(input_ids),
        attention_mask=None if packed else torch.from_numpy(real.astype(np.int64)),
        position_ids=position_ids,
        tokens=tokens,
        hidden_index=torch.from_numpy(np.maximum(flat_padded - 1, 0)),
        targets=torch.from_numpy(flat_ids),
        padded_tokens=batch * width,
        rows=len(lengths),
    )


def iter_epoch(
    groups: list[RowGroup],
    *,
    seed: int,
    epoch: int,
    window_groups: int,
    layout: Layout,
    columns: list[str],
    label_names: list[str],
    rank: int,
    world_size: int,
    skip: int = 0,
    stop: int | None = None,
) -> Iterator[MicroBatch]:
    """This rank's micro-batches j (j mod W = rank, skip ≤ j < stop) of an epoch, in order.

    `columns` are the per-token columns to flatten besides loss_mask; a window whose micro-batches all lie
    before `skip` is planned (n_tokens only) but not read.
    """
    read_columns = sorted({"input_ids", "loss_mask", *columns})
    first = 0
    for number, window in enumerate(epoch_windows(len(groups), seed, epoch, window_groups)):
        plan = window_plan(groups, window, seed, epoch, number, layout)
        mine = [k for k in range(len(plan)) if (first + k) % world_size == rank and skip <= first + k and (stop is None or first + k < stop)]
        if mine:
            table = read_groups([groups[g] for g in window], read_columns)
            for k in mine:
                yield make_micro_batch(table.take(plan[k].rows), first + k, columns, label_names, plan[k].sequence)
        first += len(plan)
        if stop is not None and first >= stop:
            return
