"""Streaming shards into length-bucketed micro-batches, in an order that is a pure function of (seed, epoch, manifest).

The order (docs/design.md "Data order, distribution and resume"):

    1. permute the corpus's row groups with rng(seed, epoch);
    2. take windows of `window_groups` consecutive groups of that permutation;
    3. inside a window, permute the rows with rng(seed, epoch, window), sort them by length (stable, so
       equal lengths keep the permuted order) and cut them greedily into micro-batches whose padded size
       B·T_max stays within `batch_tokens`; then permute the micro-batches with the same rng.

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


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int  # row group index inside the file
    rows: int


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: padded model inputs plus flat per-token columns over the rows' real positions.

    Flat position i is token t of row b; it is predicted by the hidden state at padded index
    `hidden_index[i]` = b·T + t − 1 (meaningless for t = 0, where loss_mask is false by contract).
    """

    index: int  # global micro-batch index j within the epoch
    input_ids: torch.Tensor  # (B, T) int64, right-padded with 0
    attention_mask: torch.Tensor  # (B, T) int64
    tokens: dict[str, torch.Tensor]  # (N,) each: "loss_mask" bool, "seq_index" int64, stored columns
    hidden_index: torch.Tensor  # (N,) int64 into the (B·T) flattened hidden states
    targets: torch.Tensor  # (N,) int64 token ids
    padded_tokens: int  # B·T


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


def bucket_rows(n_tokens: np.ndarray, batch_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut rows into micro-batches with B·T_max ≤ batch_tokens (little padding), in a seeded order.

    Rows are permuted, stably sorted by length, then taken greedily; the list of micro-batches is permuted.
    Returns row indices (into n_tokens) per micro-batch.
    """
    if len(n_tokens) and n_tokens.max() > batch_tokens:
        raise ValueError(f"a row of {n_tokens.max()} tokens exceeds batch_tokens={batch_tokens}; raise --batch-tokens.")
    permuted = rng.permutation(len(n_tokens))
    by_length = permuted[np.argsort(n_tokens[permuted], kind="stable")]
    batches, start = [], 0
    for end in range(1, len(by_length) + 1):
        # Sorted ascending, so the newest row is the longest: the batch's padded size is (count)·its length.
        if end == len(by_length) or (end + 1 - start) * n_tokens[by_length[end]] > batch_tokens:
            batches.append(by_length[start:end])
            start = end
    return [batches[i] for i in rng.permutation(len(batches))]


def read_groups(groups: list[RowGroup], columns: list[str]) -> pa.Table:
    """The rows of several row groups (only `columns`), concatenated in the given order."""
    tables = [pq.ParquetFile(g.path).read_row_group(g.index, columns=columns) for g in groups]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def window_plan(groups: list[RowGroup], window: np.ndarray, seed: int, epoch: int, window_number: int, batch_tokens: int) -> list[np.ndarray]:
    """Micro-batches (row indices into the window's concatenated rows) of one window."""
    n_tokens = read_groups([groups[g] for g in window], ["n_tokens"]).column("n_tokens").to_numpy()
    return bucket_rows(n_tokens, batch_tokens, np.random.default_rng([seed, epoch, window_number]))


def count_micro_batches(groups: list[RowGroup], seed: int, epoch: int, window_groups: int, batch_tokens: int) -> int:
    """Micro-batches in one epoch (reads only the n_tokens column)."""
    windows = epoch_windows(len(groups), seed, epoch, window_groups)
    return sum(len(window_plan(groups, w, seed, epoch, i, batch_tokens)) for i, w in enumerate(windows))


def make_micro_batch(table: pa.Table, index: int, columns: list[str], label_names: list[str]) -> MicroBatch:
    """Pad `input_ids` into (B, T) and flatten the per-token columns; label codes map into `label_names`."""
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    batch, width = len(lengths), int(lengths.max())
    real = np.arange(width)[None, :] < lengths[:, None]  # (B, T) bool
    flat_ids = pc.list_flatten(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    input_ids = np.zeros((batch, width), dtype=np.int64)
    input_ids[real] = flat_ids  # row-major fill matches the concatenation order of the flat columns
    tokens, local_names = flat_token_columns(table, columns)
    if "label" in tokens and local_names:
        lookup = np.array([label_names.index(name) for name in local_names], dtype=np.int64)
        codes = tokens["label"].numpy()
        tokens["label"] = torch.from_numpy(np.where(codes >= 0, lookup[np.maximum(codes, 0)], -1))
    flat_padded = np.nonzero(real.reshape(-1))[0]  # (N,) b·T + t
    return MicroBatch(
        index=index,
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(real.astype(np.int64)),
        tokens=tokens,
        hidden_index=torch.from_numpy(np.maximum(flat_padded - 1, 0)),
        targets=torch.from_numpy(flat_ids),
        padded_tokens=batch * width,
    )


def iter_epoch(
    groups: list[RowGroup],
    *,
    seed: int,
    epoch: int,
    window_groups: int,
    batch_tokens: int,
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
        plan = window_plan(groups, window, seed, epoch, number, batch_tokens)
        mine = [k for k in range(len(plan)) if (first + k) % world_size == rank and skip <= first + k and (stop is None or first + k < stop)]
        if mine:
            table = read_groups([groups[g] for g in window], read_columns)
            for k in mine:
                yield make_micro_batch(table.take(plan[k]), first + k, columns, label_names)
        first += len(plan)
        if stop is not None and first >= stop:
            return
