"""Packed micro-batches: a row packed with others gives the same log-probs, loss and gradients as the row alone.

Run: pytest tests/test_train_packing.py
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from train_shards import write_shards

from scoring.shards import open_shards
from training.batching import Layout
from training.checks import check_packed_attention
from training.data import epoch_windows, make_micro_batch, read_groups, row_groups, window_plan
from training.distributed import Dist
from training.loss import TokenLoss, normalizer
from training.step import StepSettings, StudentLoss, accumulate_step, needs_prepass, on_device
from scoring.priority import parse_priority

ONE = Dist(rank=0, world_size=1, local_rank=0)
COLUMNS = ["label", "ref_logprob", "ref_entropy", "weight"]


@pytest.fixture(scope="module")
def packed_and_alone(tmp_path_factory, tokenizer):
    """The first packed micro-batch of a window holding several rows per sequence, and each of its rows alone."""
    folder = write_shards(tmp_path_factory.mktemp("pack_shards"), tokenizer, n_rows=24, n_shards=1, seed=5, negative_share=0.3)
    groups = row_groups(open_shards(folder))
    longest = int(read_groups(groups, ["n_tokens"]).column("n_tokens").to_numpy().max())
    plan = window_plan(groups, epoch_windows(len(groups), 0, 0, 1)[0], 0, 0, 0, Layout("packed", 160, longest))
    table = read_groups(groups, sorted({"input_ids", "loss_mask", *COLUMNS}))
    bucket = next(b for b in plan if len(b.rows) > b.sequence[-1] + 2)  # at least two sequences share rows
    packed = make_micro_batch(table.take(bucket.rows), 0, COLUMNS, ["toxic"], bucket.sequence)
    alone = [make_micro_batch(table.take([row]), k, COLUMNS, ["toxic"]) for k, row in enumerate(bucket.rows)]
    return packed, alone


def model_for(tokenizer, attn="sdpa"):
    model = build_model(len(tokenizer), seed=3, hidden_size=128, layers=2).train()
    model.config._attn_implementation = attn
    return model


def grads(model, core, mbs, settings):
    model.zero_grad(set_to_none=True)
    result = accumulate_step(core, core, mbs, settings, 0, ONE)
    z = normalizer(result.counts, settings.normalize)
    return {n: p.grad.detach().clone() / z for n, p in model.named_parameters()}, result.loss_sum / z


def settings_for(spec, normalize):
    priority = parse_priority(spec)
    return StepSettings(priority=priority, normalize=normalize, neg_ramp_steps=0, prepass=needs_prepass(priority, normalize),
                        with_entropy=False, label_names=["toxic"], device=torch.device("cpu"))


def assert_close_grads(a, b, rtol=1e-5):
    for name in a:
        scale = b[name].abs().max().item() + 1e-12
        gap = (a[name] - b[name]).abs().max().item()
        assert gap <= rtol * scale, f"{name}: {gap:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_have_the_log_probs_of_each_row_alone(packed_and_alone, tokenizer, attn):
    packed, alone = packed_and_alone
    assert packed.attention_mask is None and packed.rows > packed.input_ids.shape[0] >= 2
    core = StudentLoss(model_for(tokenizer, attn).eval(), chunk_rows=16, autocast_dtype=None, loss=TokenLoss())
    everything = torch.arange(packed.targets.numel())
    logprob, entropy = core.statistics(*on_device(packed, everything, torch.device("cpu")), with_entropy=True)
    seq = packed.tokens["seq_index"]
    gaps = []
    for r, mb in enumerate(alone):
        mine = torch.arange(mb.targets.numel())
        lp, ent = core.statistics(*on_device(mb, mine, torch.device("cpu")), with_entropy=True)
        here = (seq == r) & packed.tokens["loss_mask"]
        assert torch.equal(packed.targets[seq == r], mb.targets)
        gaps += [(logprob[here] - lp[mb.tokens["loss_mask"]]).abs().max().item(), (entropy[here] - ent[mb.tokens["loss_mask"]]).abs().max().item()]
    assert max(gaps) <= 1e-5, max(gaps)
    # The check the trainer runs before packing passes for this model.
    check_packed_attention(core.model, torch.device("cpu"))


@pytest.mark.parametrize("spec,normalize", [("stored", "per_sign"), ("uniform", "tokens"), ("rho1(k=0.5) * stored", "per_sign")])
def test_packed_loss_and_gradients_equal_the_rows_alone(packed_and_alone, tokenizer, spec, normalize):
    """One packed micro-batch vs its rows as separate one-row micro-batches of the same step (same global batch):
    equal loss and gradients, for a stored, a uniform and an online (global rho1 pre-pass) priority."""
    packed, alone = packed_and_alone
    model = model_for(tokenizer)
    core = StudentLoss(model, chunk_rows=7, autocast_dtype=None, loss=TokenLoss(neg_loss="clip", clip_nats=8.0))
    settings = settings_for(spec, normalize)
    g_packed, loss_packed = grads(model, core, [packed], settings)
    g_alone, loss_alone = grads(model, core, alone, settings)
    assert loss_packed == pytest.approx(loss_alone, rel=1e-5)
    assert_close_grads(g_packed, g_alone)


def test_one_packed_rows_gradient_equals_that_row_alone(packed_and_alone, tokenizer):
    """Φ on one packed row only (0 on its neighbours, which still share its sequence): its gradient is the row's alone."""
    packed, alone = packed_and_alone
    seq = packed.tokens["seq_index"]
    starts = torch.nonzero(torch.diff(seq, prepend=torch.tensor([-1]))).squeeze(1)  # flat index of each row's token 0
    column = (packed.hidden_index[starts] + 1) % packed.input_ids.shape[1]  # where each row starts inside its sequence
    r = int(torch.argmax(column))  # the row that starts furthest into its sequence, after other rows
    assert column[r] > 0 and r > 0
    model = model_for(tokenizer)
    core = StudentLoss(model, chunk_rows=7, autocast_dtype=None, loss=TokenLoss(neg_loss="none"))
    only = type(packed)(**{**packed.__dict__, "tokens": {**packed.tokens, "weight": packed.tokens["weight"] * (seq == r)}})
    settings = settings_for("stored", "abs_weight")
    g_packed, loss_packed = grads(model, core, [only], settings)
    g_alone, loss_alone = grads(model, core, [alone[r]], settings)
    assert loss_packed == pytest.approx(loss_alone, rel=1e-5)
    assert_close_grads(g_packed, g_alone)


def test_attention_that_crosses_rows_is_refused(tokenizer):
    """A model that ignores the packed position ids (here: a base model that always gets a full 2-D mask, which
    makes transformers skip packed-sequence detection) lets a row attend to the previous one: refused."""
    model = model_for(tokenizer).eval()

    class Leaky(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids, use_cache=use_cache)

    wrapper = type("Wrapper", (), {"base_model": Leaky(model.model), "config": model.config,
                                   "get_input_embeddings": lambda self: model.get_input_embeddings()})()
    with pytest.raises(ValueError, match="not confined to each packed row.*--batching grouped"):
        check_packed_attention(wrapper, torch.device("cpu"))
