"""Checks that run before any training: the corpus (one streaming pass) and the student against the shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from scoring.shards import ShardError, ShardSet, read_metadata, tokenizer_fingerprint
from scoring.stats import final_hidden
from training.data import RowGroup
from training.loss import TokenLoss


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
    `statistics` (the stored columns the Φ spec and the loss read, e.g. ref_logprob) at every target, loss_mask
    false at each row's position 0 (packed rows follow each other, so a target there would be predicted from
    another row), the longest row, the number of targets, and (when the priority reads labels) the label names.

    Raises ShardError naming the file, row group, column, first row id and fix.
    """
    for path in shards.paths:
        read_metadata(path)  # refuses an unknown schema MAJOR
    rows = targets = longest = 0
    labels: set[str] = set()
    columns = ["id", "n_tokens", "n_targets", "weight", "loss_mask"] + (["label"] if read_labels else []) + list(statistics)
    for group in tqdm(groups, desc="checking shards", unit="group", leave=False, disable=len(groups) < 50):
        table = pq.ParquetFile(group.path).read_row_group(group.index, columns=columns)
        weight = pc.list_flatten(table.column("weight")).to_numpy(zero_copy_only=False)
        if not np.isfinite(weight).all():
            raise ShardError(
                f"{group.path} row group {group.index}: column 'weight' has {int((~np.isfinite(weight)).sum())} non-finite values "
                f"(first in row {first_bad_row(table, 'weight', ~np.isfinite(weight))!r}); "
                "recompute it with `tokenprio reweight`, or train with a --priority that does not read it."
            )
        mask = pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False).astype(bool)
        if statistics:  # position 0 of a row has no prediction (NaN by contract): only targets must be finite
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
        starts = np.concatenate([[0], np.cumsum(n_tokens)[:-1]]).astype(np.int64)[n_tokens > 0]
        if mask[starts].any():
            row = int(np.nonzero(n_tokens > 0)[0][np.nonzero(mask[starts])[0][0]])
            raise ShardError(f"{group.path} row group {group.index}, row {row}: loss_mask is true at position 0, which has no prediction "
                             "(shard contract: position t is predicted from positions < t of its own row); set it false and rewrite the shard.")
        rows += table.num_rows
        targets += int(table.column("n_targets").to_numpy().sum())
        longest = max(longest, int(n_tokens.max()) if len(n_tokens) else 0)
        if read_labels:
            names = pc.unique(pc.list_flatten(table.column("label"))).drop_null()
            labels.update(str(name) for name in names.to_pylist())  # a handful of distinct names, not the tokens
    if targets == 0:
        raise ShardError(f"{shards.folder}: no row has a trainable token (every loss_mask is false); nothing to train on.")
    return CorpusSummary(rows=rows, targets=targets, max_row_tokens=longest, label_names=sorted(labels))


def check_ref_column(shards: ShardSet, loss: TokenLoss, neg_ref: str) -> str | None:
    """The `<neg_ref>_logprob` column the loss reads (None when it reads none); refuses shards that lack it."""
    if not loss.needs_ref:
        return None
    column = f"{neg_ref}_logprob"
    if column not in shards.spec_columns:
        raise ValueError(
            f"{loss.ref_options} compares with the stored log-prob of --neg-ref {neg_ref}, but {shards.folder} has no column {column!r} "
            f"(scored models: {', '.join(sorted(shards.stat_prefixes)) or 'none'}). Score the student's starting checkpoint as that model: "
            f"`tokenprio add-model {shards.folder} --model START --prefix {neg_ref} --out NEW`, or pass --neg-ref PREFIX of a scored model."
        )
    return column


def check_student(shards: ShardSet, tokenizer, model_config, summary: CorpusSummary, model_path: str) -> None:
    """Refuse a student whose token ids or context length do not fit the shards."""
    stored = shards.metadata.get("tokenizer", {}).get("fingerprint")  # written by `tokenprio score`
    if stored is None:
        raise ShardError(f"{shards.paths[0]}: the metadata has no tokenizer fingerprint; rescore with this tokenprio version.")
    if tokenizer_fingerprint(tokenizer) != stored:
        raise ValueError(
            f"{model_path}: the student's tokenizer differs from the one the shards in {shards.folder} were tokenised with "
            "(tokenizer fingerprints differ), so its token ids mean other tokens. Project the shards onto the student's tokenizer "
            f"first (no model needed): `tokenprio project {shards.folder} --tokenizer {model_path} --out NEW`, then train on NEW."
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


@torch.no_grad()
def check_packed_attention(model, device: torch.device, tolerance: float = 1e-4) -> None:
    """Refuse packed batches when two rows packed into one sequence do not give each row's hidden states alone.

    Packing relies on the model building a block-diagonal causal mask from position ids that restart per row
    (attention_mask=None, no cache; transformers' masking_utils does this for its sdpa, eager, flex and flash
    paths). A model whose attention ignores that would let a row attend to the one before it.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in (6, 5))
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None].to(device)
    packed = final_hidden(model, torch.cat([first, second], 1), None, positions).float()
    alone = torch.cat([final_hidden(model, first, None).float(), final_hidden(model, second, None).float()], 1)
    gap, scale = (packed - alone).abs().max().item(), alone.abs().max().item()
    if not gap <= tolerance * max(1.0, scale):
        raise ValueError(
            f"the student's attention ({getattr(model.config, '_attn_implementation', '?')}) is not confined to each packed row: two rows "
            f"packed into one sequence differ from each row alone by {gap:.3g}; train with --batching grouped (or sorted), which pad instead."
        )
