"""The trainer's data order: a pure function of (seed, epoch, manifest), laid out under a token budget, split by rank.

Every batching (packed, the default; grouped; sorted) is checked for coverage, budget, determinism, rank split
and resume; packed batches also for their layout (position ids, block structure) and the alignment of every
flat column with the token it describes; and the per-step share of labelled tokens against the corpus share
on a corpus whose labels correlate with length. Run: pytest tests/test_train_data.py
"""

from __future__ import annotations

import numpy as np
import pytest
from train_shards import make_rows, write_shards

from scoring.shards import open_shards
from training.batching import BATCHINGS, GROUPED_MEGA_BATCH, Layout, mega_batches, plan_rows
from training.data import count_micro_batches, iter_epoch, read_groups, row_groups

COLUMNS = ["weight"]


def layout_for(batching: str, batch_tokens: int, longest: int) -> Layout:
    return Layout(batching, batch_tokens, longest if batching == "packed" else 0)


@pytest.fixture(scope="module")
def groups(tmp_path_factory, tokenizer):
    folder = write_shards(tmp_path_factory.mktemp("data_shards"), tokenizer, n_rows=60, n_shards=5, seed=2)
    return row_groups(open_shards(folder))


def longest_row(groups) -> int:
    return max(int(read_groups([g], ["n_tokens"]).column("n_tokens").to_numpy().max()) for g in groups)


def epoch(groups, batching="packed", seed=0, number=0, rank=0, world_size=1, batch_tokens=200, columns=COLUMNS, label_names=(), **kw):
    layout = layout_for(batching, batch_tokens, longest_row(groups))
    return list(iter_epoch(groups, seed=seed, epoch=number, window_groups=2, layout=layout, columns=columns,
                           label_names=list(label_names), rank=rank, world_size=world_size, **kw))


def row_keys(mb) -> list[tuple]:
    """Each row's (ids, weights), from the flat columns: identifies a row (weights are random per row)."""
    seq = mb.tokens["seq_index"].numpy()
    ids, weight = mb.targets.numpy(), mb.tokens["weight"].numpy()
    return [(tuple(ids[seq == r].tolist()), tuple(weight[seq == r].round(6))) for r in range(mb.rows)]


def test_layouts_keep_every_row_within_budget():
    n_tokens = np.random.default_rng(0).integers(1, 50, size=500)
    padding = {}
    for batching in BATCHINGS:
        buckets = plan_rows(n_tokens, layout_for(batching, 128, 49), np.random.default_rng(1))
        rows = np.concatenate([b.rows for b in buckets])
        assert sorted(rows.tolist()) == list(range(500)), batching
        if batching == "packed":
            for b in buckets:
                fill = np.bincount(b.sequence, weights=n_tokens[b.rows])
                assert (np.diff(b.sequence) >= 0).all() and (fill > 0).all()  # sequence-major, no empty sequence
                assert fill.max() <= 49 and len(fill) <= 128 // 49  # B sequences of at most L tokens
            padded = sum((b.sequence[-1] + 1) * np.bincount(b.sequence, weights=n_tokens[b.rows]).max() for b in buckets)
        else:
            assert all(b.sequence is None and len(b.rows) * n_tokens[b.rows].max() <= 128 for b in buckets), batching
            padded = sum(len(b.rows) * n_tokens[b.rows].max() for b in buckets)
        padding[batching] = 1 - n_tokens.sum() / padded
    assert padding["sorted"] < 0.15  # sorted within a window: rows of a micro-batch have similar lengths
    # grouped: every micro-batch lies inside one mega-batch (a run of the seeded permutation of ~50 micro-batches' tokens).
    megas = mega_batches(np.random.default_rng(1).permutation(500), n_tokens, GROUPED_MEGA_BATCH * 128)
    assert len(megas) >= 2
    mega_of = np.concatenate([np.full(len(m), k) for k, m in enumerate(megas)])[np.argsort(np.concatenate(megas))]
    grouped = plan_rows(n_tokens, layout_for("grouped", 128, 49), np.random.default_rng(1))
    assert all(len(set(mega_of[b.rows])) == 1 for b in grouped)
    assert len({int(mega_of[b.rows[0]]) for b in grouped[:10]}) > 1  # micro-batches of different mega-batches interleave
    assert padding["grouped"] < 0.15
    with pytest.raises(ValueError, match="batch_tokens"):
        plan_rows(np.array([10, 300]), Layout("sorted", 128), np.random.default_rng(0))
    with pytest.raises(ValueError, match="packed sequence length"):
        plan_rows(np.array([10, 60]), Layout("packed", 128, 50), np.random.default_rng(0))
    with pytest.raises(ValueError, match="pack_tokens"):
        Layout("sorted", 128, 50)


@pytest.mark.parametrize("batching", BATCHINGS)
def test_epoch_covers_every_row_once_within_budget(groups, batching):
    mbs = epoch(groups, batching)
    keys = [k for mb in mbs for k in row_keys(mb)]
    assert len(keys) == 60 == len(set(keys))
    assert all(mb.padded_tokens <= 200 for mb in mbs)
    layout = layout_for(batching, 200, longest_row(groups))
    assert [mb.index for mb in mbs] == list(range(len(mbs))) == list(range(count_micro_batches(groups, 0, 0, 2, layout)))
    # Flat columns line up with the model inputs: targets are the real tokens, hidden_index points one before.
    for mb in mbs:
        assert (mb.input_ids.view(-1)[mb.hidden_index + 1][mb.tokens["loss_mask"]] == mb.targets[mb.tokens["loss_mask"]]).all()
    assert (batching == "packed") == all(mb.attention_mask is None and mb.position_ids is not None for mb in mbs)
    if batching == "packed":
        assert sum(mb.rows for mb in mbs) > sum(mb.input_ids.shape[0] for mb in mbs)  # rows do share sequences


@pytest.mark.parametrize("batching", BATCHINGS)
def test_order_is_a_pure_function_of_seed_and_epoch(groups, batching):
    first = [row_keys(mb) for mb in epoch(groups, batching)]
    assert first == [row_keys(mb) for mb in epoch(groups, batching)]
    assert first != [row_keys(mb) for mb in epoch(groups, batching, seed=1)]
    assert first != [row_keys(mb) for mb in epoch(groups, batching, number=1)]


@pytest.mark.parametrize("batching", BATCHINGS)
def test_ranks_read_disjoint_micro_batches_of_the_same_global_sequence(groups, batching):
    single = epoch(groups, batching)
    ranks = [epoch(groups, batching, rank=r, world_size=2) for r in range(2)]
    assert [mb.index % 2 for mb in ranks[1]] == [1] * len(ranks[1])
    merged = sorted(ranks[0] + ranks[1], key=lambda mb: mb.index)
    assert [row_keys(mb) for mb in merged] == [row_keys(mb) for mb in single]


@pytest.mark.parametrize("batching", BATCHINGS)
def test_skip_and_stop_resume_inside_an_epoch(groups, batching):
    full = epoch(groups, batching)
    tail = epoch(groups, batching, skip=2, stop=5)
    assert [mb.index for mb in tail] == [2, 3, 4]
    assert [row_keys(mb) for mb in tail] == [row_keys(mb) for mb in full[2:5]]


def test_packed_layout_restarts_positions_per_row_and_aligns_every_column(tmp_path, tokenizer):
    """Packing must keep Φ, labels and statistics on the token they describe (TRL users hit shifted weights under
    packing). The stored columns encode the token itself: weight = id / 1000 on targets, ref_logprob = −position / 100,
    label "odd" on odd ids; after packing every flat position must still decode to its own token and position."""
    cols = make_rows(tokenizer, 40, seed=7)
    cols["weight"] = [[(i / 1000 if m else 0.0) for i, m in zip(ids, mask)] for ids, mask in zip(cols["input_ids"], cols["loss_mask"])]
    cols["ref_logprob"] = [[float("nan")] + [-t / 100 for t in range(1, len(ids))] for ids in cols["input_ids"]]
    cols["label"] = [["odd" if i % 2 else None for i in ids] for ids in cols["input_ids"]]
    folder = write_shards(tmp_path / "s", tokenizer, n_rows=40, n_shards=2, rows_override=cols)
    groups = row_groups(open_shards(folder))
    mbs = epoch(groups, "packed", batch_tokens=120, columns=["weight", "ref_logprob", "label"], label_names=["odd"])
    assert any(mb.rows > mb.input_ids.shape[0] for mb in mbs)
    for mb in mbs:
        ids, mask = mb.input_ids.view(-1), mb.tokens["loss_mask"]
        flat = mb.hidden_index + 1  # each flat token's index in the (B·T) grid (flat position 0 sits at 0)
        flat[0] = 0
        position = mb.position_ids.view(-1)[flat]  # each flat token's position id in its sequence
        assert (ids[flat] == mb.targets).all()
        assert np.allclose(mb.tokens["weight"][mask].numpy(), mb.targets[mask].numpy() / 1000)
        assert np.allclose(mb.tokens["ref_logprob"][mask].numpy(), -position[mask].numpy() / 100)  # position ids restart per row
        assert ((mb.tokens["label"] == 0) == (mb.targets % 2 == 1)).all()
        # Position ids: 0..n−1 for each row in turn, then 0.. again over a sequence's padding.
        seq = mb.tokens["seq_index"]
        starts = np.nonzero(np.diff(seq.numpy(), prepend=-1))[0]
        assert (position[starts] == 0).all() and (position[~np.isin(np.arange(len(seq)), starts)] > 0).all()
        real = np.zeros(mb.input_ids.numel(), dtype=bool)
        real[flat.numpy()] = True
        for b in range(mb.input_ids.shape[0]):
            row = mb.position_ids[b].numpy()
            pads = ~real.reshape(mb.input_ids.shape)[b]
            if pads.any():
                assert (row[pads] == np.arange(pads.sum())).all() and (mb.input_ids[b].numpy()[pads] == 0).all()


def length_correlated_shards(folder, tokenizer, n_rows=800, seed=0):
    """Rows of 6–60 tokens; every target of a row shorter than 30 tokens is labelled `toxic`, longer rows never."""
    rng = np.random.default_rng(seed)
    cols = make_rows(tokenizer, n_rows, seed=seed)
    vocab = len(tokenizer)
    lengths = rng.integers(6, 61, size=n_rows)
    cols["input_ids"] = [rng.integers(5, vocab, size=n).tolist() for n in lengths]
    cols["n_tokens"] = lengths.tolist()
    cols["loss_mask"] = [[t >= 1 for t in range(n)] for n in lengths]
    cols["n_targets"] = (lengths - 1).tolist()
    cols["weight"] = [[float(t >= 1) for t in range(n)] for n in lengths]
    cols["label"] = [[("toxic" if (n < 30 and t >= 1) else None) for t in range(n)] for n in lengths]
    for key in ("char_start", "char_end"):
        cols[key] = [[-1] * n for n in lengths]
    for key in ("ref_logprob", "ref_entropy"):
        cols[key] = [[float("nan")] + [-1.0] * (n - 1) for n in lengths]
    cols["id"] = [f"doc{i}:0" for i in range(n_rows)]
    return write_shards(folder, tokenizer, n_rows=n_rows, n_shards=4, rows_override=cols)


def test_labelled_share_per_step_tracks_the_corpus_under_the_default(tmp_path, tokenizer):
    """On a corpus whose labels go with length, each step's share of labelled targets must stay near the corpus
    share under the default (packed); sorted batching, which puts one length in each micro-batch, must not.

    Steps of GA × W = 2 micro-batches of 1024 tokens, 4 epochs of 800 rows (corpus share ≈ 0.21). Bounds tested
    on |share − corpus share| per step: packed median ≤ 0.05 and max ≤ 0.2, and at most 10 % of steps off by more
    than half the corpus share (measured: 0.032, 0.162, 3 %); sorted median > 0.15, max > 0.5 and at least 80 % of
    steps off by more than half (measured: 0.21, 0.79, 93 %: most steps hold no labelled token at all).
    """
    groups = row_groups(open_shards(length_correlated_shards(tmp_path / "s", tokenizer)))
    gaps = {}
    for batching in ("packed", "sorted"):
        shares, labelled_all, targets_all = [], 0, 0
        for number in range(4):
            mbs = epoch(groups, batching, number=number, batch_tokens=1024, columns=["label"], label_names=["toxic"])
            for s in range(len(mbs) // 2):
                step = mbs[2 * s : 2 * s + 2]
                labelled = sum(int(((mb.tokens["label"] == 0) & mb.tokens["loss_mask"]).sum()) for mb in step)
                targets = sum(int(mb.tokens["loss_mask"].sum()) for mb in step)
                shares.append(labelled / targets)
                labelled_all, targets_all = labelled_all + labelled, targets_all + targets
        corpus = labelled_all / targets_all  # the same for both: every row once per epoch, the final partial step aside
        gap = np.abs(np.array(shares) - corpus)
        gaps[batching] = (float(np.median(gap)), float(gap.max()), float((gap > corpus / 2).mean()), corpus)
    packed, ordered = gaps["packed"], gaps["sorted"]
    assert 0.15 < packed[3] < 0.3 and abs(packed[3] - ordered[3]) < 0.02, gaps
    assert packed[0] <= 0.05 and packed[1] <= 0.2 and packed[2] <= 0.1, gaps
    assert ordered[0] > 0.15 and ordered[1] > 0.5 and ordered[2] >= 0.8, gaps
