"""Checks that run before any training: the corpus (one streaming pass) and the student against the shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from scoring.shards import ShardError, ShardSet, read_metadata, tokenizer_fingerprint
from training.data import RowGroup


@dataclass(frozen=True)
class CorpusSummary:
    rows: int
    targets: int  # loss_mask tokens
    max_row_tokens: int
    label_names: list[str]  # sorted; the codes every rank and every resume agree on


def first_bad_row(table, column: str, bad: np.ndarray) -> str:
    """The `id` of the row holding the first flagged flat position of list column `column`."""
    offsets = table.column(column).combine_chunks().offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced list array's offsets start where its values do
    row = int(np.searchsorted(offsets, int(np.flatnonzero(bad)[0]), side="right")) - 1
    return str(table.column("id")[row])


def scan_corpus(shards: ShardSet, groups: list[RowGroup], *, read_labels: bool, statistics: tuple[str, ...] = ()) -> CorpusSummary:
    """One pass over the corpus, a row group at a time: schema version of every shard, finite `weight`, finite
    `statistics` (the stored columns the Φ spec reads, e.g. ref_logprob) at every target, the longest row, the
    number of targets, and (when the priority reads labels) the label names.

    Raises ShardError naming the file, row group, column, first row id and fix.
    """
    for path in shards.paths:
        read_metadata(path)  # refuses an unknown schema MAJOR
    rows = targets = longest = 0
    labels: set[str] = set()
    columns = ["id", "n_tokens", "n_targets", "weight"] + (["label"] if read_labels else []) + (["loss_mask", *statistics] if statistics else [])
    for group in tqdm(groups, desc="checking shards", unit="group", leave=False, disable=len(groups) < 50):
        table = pq.ParquetFile(group.path).read_row_group(group.index, columns=columns)
        weight = pc.list_flatten(table.column("weight")).to_numpy(zero_copy_only=False)
        if not np.isfinite(weight).all():
            raise ShardError(
                f"{group.path} row group {group.index}: column 'weight' has {int((~np.isfinite(weight)).sum())} non-finite values "
                f"(first in row {first_bad_row(table, 'weight', ~np.isfinite(weight))!r}); "
                "recompute it with `tokenprio reweight`, or train with a --priority that does not read it."
            )
        if statistics:  # position 0 of a row has no prediction (NaN by contract): only targets must be finite
            mask = pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False)
            for column in statistics:
                values = pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False)
                bad = mask & ~np.isfinite(values)
                if bad.any():
                    raise ShardError(
                        f"{group.path} row group {group.index}: column {column!r} has {int(bad.sum())} non-finite values at targets "
                        f"(first in row {first_bad_row(table, column, bad)!r}); the model that scored it returned NaN or infinity there. "
                        f"Rescore those rows (tokenprio score / add-model), or train with a --priority that does not read {column}."
                    )
        n_tokens = table.column("n_tokens").to_numpy()
        rows += table.num_rows
        targets += int(table.column("n_targets").to_numpy().sum())
        longest = max(longest, int(n_tokens.max()) if len(n_tokens) else 0)
        if read_labels:
            names = pc.unique(pc.list_flatten(table.column("label"))).drop_null()
            labels.update(str(name) for name in names.to_pylist())  # a handful of distinct names, not the tokens
    if targets == 0:
        raise ShardError(f"{shards.folder}: no row has a trainable token (every loss_mask is false); nothing to train on.")
    return CorpusSummary(rows=rows, targets=targets, max_row_tokens=longest, label_names=sorted(labels))


def check_student(shards: ShardSet, tokenizer, model_config, summary: CorpusSummary, model_path: str) -> None:
    """Refuse a student whose token ids or context length do not fit the shards."""
    stored = shards.metadata.get("tokenizer", {}).get("fingerprint")  # written by `tokenprio score`
    if stored is None:
        raise ShardError(f"{shards.paths[0]}: the metadata has no tokenizer fingerprint; rescore with this tokenprio version.")
    if tokenizer_fingerprint(tokenizer) != stored:
        raise ValueError(
            f"{model_path}: the student's tokenizer differs from the one the shards in {shards.folder} were tokenised with "
            "(tokenizer fingerprints differ), so its token ids mean other tokens. Train a student that shares the scoring "
            "tokenizer, or rescore the corpus with the student's tokenizer."
        )
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and summary.max_row_tokens > context:
        raise ValueError(
            f"{shards.folder}: a row has {summary.max_row_tokens} tokens but the student {model_path} has a context of {context} "
            "(max_position_embeddings); the trainer never re-windows. Rescore with --max-length ≤ the student's context."
        )
    vocab = model_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"{model_path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; resize the embeddings.")
