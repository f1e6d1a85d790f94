"""The trainer's data order: a pure function of (seed, epoch, manifest), bucketed to a token budget, split by rank."""

from __future__ import annotations

import numpy as np
import pytest
from train_shards import write_shards

from scoring.shards import open_shards
from training.data import bucket_rows, count_micro_batches, iter_epoch, row_groups

COLUMNS = ["weight"]


@pytest.fixture(scope="module")
def groups(tmp_path_factory, tokenizer):
    folder = write_shards(tmp_path_factory.mktemp("data_shards"), tokenizer, n_rows=60, n_shards=5, seed=2)
    return row_groups(open_shards(folder))


def epoch(groups, seed=0, number=0, rank=0, world_size=1, batch_tokens=200, **kw):
    return list(iter_epoch(groups, seed=seed, epoch=number, window_groups=2, batch_tokens=batch_tokens, columns=COLUMNS,
                           label_names=[], rank=rank, world_size=world_size, **kw))


def row_keys(mb) -> list[tuple]:
    """Each row's (ids, weights): identifies a row (weights are random per row)."""
    lengths = mb.attention_mask.sum(1).tolist()
    starts = np.cumsum([0] + lengths)
    weight = mb.tokens["weight"].numpy()
    return [(tuple(mb.input_ids[b, :n].tolist()), tuple(weight[starts[b] : starts[b] + n].round(6))) for b, n in enumerate(lengths)]


def test_bucketing_respects_budget_and_keeps_every_row():
    n_tokens = np.random.default_rng(0).integers(1, 50, size=500)
    batches = bucket_rows(n_tokens, 128, np.random.default_rng(1))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))
    assert all(len(b) * n_tokens[b].max() <= 128 for b in batches)
    # Little padding: rows of a micro-batch have similar lengths (sorted within a window).
    padded = sum(len(b) * n_tokens[b].max() for b in batches)
    assert padded / n_tokens.sum() < 1.15
    with pytest.raises(ValueError, match="batch_tokens"):
        bucket_rows(np.array([10, 300]), 128, np.random.default_rng(0))


def test_epoch_covers_every_row_once_within_budget(groups):
    mbs = epoch(groups)
    keys = [k for mb in mbs for k in row_keys(mb)]
    assert len(keys) == 60 == len(set(keys))
    assert all(mb.padded_tokens <= 200 for mb in mbs)
    assert [mb.index for mb in mbs] == list(range(len(mbs))) == list(range(count_micro_batches(groups, 0, 0, 2, 200)))
    # Flat columns line up with the padded ids: targets are the real tokens, hidden_index points one before.
    mb = mbs[0]
    assert (mb.input_ids.view(-1)[mb.hidden_index + 1][mb.tokens["loss_mask"]] == mb.targets[mb.tokens["loss_mask"]]).all()


def test_order_is_a_pure_function_of_seed_and_epoch(groups):
    first = [row_keys(mb) for mb in epoch(groups)]
    assert first == [row_keys(mb) for mb in epoch(groups)]
    assert first != [row_keys(mb) for mb in epoch(groups, seed=1)]
    assert first != [row_keys(mb) for mb in epoch(groups, number=1)]


def test_ranks_read_disjoint_micro_batches_of_the_same_global_sequence(groups):
    single = epoch(groups)
    ranks = [epoch(groups, rank=r, world_size=2) for r in range(2)]
    assert [mb.index % 2 for mb in ranks[1]] == [1] * len(ranks[1])
    merged = sorted(ranks[0] + ranks[1], key=lambda mb: mb.index)
    assert [row_keys(mb) for mb in merged] == [row_keys(mb) for mb in single]


def test_skip_and_stop_resume_inside_an_epoch(groups):
    full = epoch(groups)
    tail = epoch(groups, skip=5, stop=9)
    assert [mb.index for mb in tail] == [5, 6, 7, 8]
    assert [row_keys(mb) for mb in tail] == [row_keys(mb) for mb in full[5:9]]
