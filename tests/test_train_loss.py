"""The trainer's weighted loss and step against float64 references, on every student path: full fine-tuning,
LoRA adapters (peft), and FSDP2 (a one-process gloo group, so the sharded parameters, the hooks around the
forward and `statistics`, and the gradient reduce-scatter all run), with and without LoRA. The two-process
FSDP equivalence is tests/test_train_fsdp.py. Run: pytest tests/test_train_loss.py"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pathlib import Path

from conftest import build_model
from train_shards import write_shards

from scoring.priority import parse_priority
from scoring.shards import open_shards
from training.batching import Layout
from training.data import epoch_windows, iter_epoch, make_micro_batch, read_groups, row_groups, window_plan
from training.distributed import Dist
from training.fsdp import full_tensor, shard_student
from training.head import fused_weighted_head
from training.lora import LoraSettings
from training.loss import LossWeights, TokenLoss, normalizer, token_terms
from training.step import StepSettings, StudentLoss, accumulate_step, global_priority, needs_prepass
from training.strategy import Strategy, build_student

ONE = Dist(rank=0, world_size=1, local_rank=0)
COLUMNS = ["label", "ref_logprob", "ref_entropy", "weight"]
KINDS = ["full", "lora", "fsdp", "fsdp_lora"]
LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0, targets=("all-linear",))


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group (in-memory store), so fully_shard runs in this process."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


@pytest.fixture(params=KINDS)
def kind(request):
    if request.param.startswith("fsdp"):
        request.getfixturevalue("process_group")
    return request.param


@dataclass
class PathStudent:
    """A test student on one path: the module that trains, its StudentLoss, and an unsharded copy for references."""

    model: torch.nn.Module  # the Hugging Face model that runs (LoRA layers in place; sharded under FSDP)
    core: StudentLoss
    reference: torch.nn.Module  # the same weights, unsharded (deep copy before sharding)
    trainable: list


def make_student(tokenizer, kind: str, prepare=None, neg_loss="none", clip_nats=1e9, chunk_rows=7) -> PathStudent:
    """The production set-up (training.strategy.build_student, training.fsdp.shard_student) on a tiny model.

    LoRA's B starts at 0, which would make every gradient of A vanish; B is randomised so both are exercised.
    """
    model = fresh_model(tokenizer)
    if prepare:
        prepare(model)
    strategy = Strategy(lora=LORA if "lora" in kind else None, fsdp=False, gradient_checkpointing=False)
    loss_args = {"chunk_rows": chunk_rows, "autocast_dtype": None, "loss": TokenLoss(neg_loss=neg_loss, clip_nats=clip_nats)}
    student = build_student(model, strategy, base_path=Path("base"), seed=0, resume_from=None, ctx=ONE, device=torch.device("cpu"),
                            compute_dtype=torch.float32, loss_args=loss_args)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    reference = copy.deepcopy(student.model)
    if kind.startswith("fsdp"):
        shard_student(student.core, student.model, torch.float32)
    student.model.train()
    return PathStudent(student.model, student.core, reference, [p for p in student.model.parameters() if p.requires_grad])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    return write_shards(tmp_path_factory.mktemp("loss_shards"), tokenizer, n_rows=24, n_shards=1, seed=5, negative_share=0.3)


@pytest.fixture(scope="module")
def label_names():
    return ["toxic"]


def layout_of(batching: str, batch_tokens: int, groups) -> Layout:
    """The trainer's layout: packed sequences as long as the corpus's longest row."""
    longest = max(int(read_groups([g], ["n_tokens"]).column("n_tokens").to_numpy().max()) for g in groups)
    return Layout(batching, batch_tokens, longest if batching == "packed" else 0)


def micro_batches(shards, label_names, batch_tokens=160, count=2, batching="sorted"):
    groups = row_groups(open_shards(shards))
    it = iter_epoch(groups, seed=0, epoch=0, window_groups=1, layout=layout_of(batching, batch_tokens, groups), columns=COLUMNS,
                    label_names=label_names, rank=0, world_size=1)
    return [next(it) for _ in range(count)]


def fresh_model(tokenizer, seed=1):
    return build_model(len(tokenizer), seed=seed, hidden_size=64, layers=1).train()


def settings_for(spec, normalize, label_names, neg_loss="none", clip_nats=1e9, ramp=0, prepass=None):
    priority = parse_priority(spec)
    settings = StepSettings(priority=priority, normalize=normalize, neg_ramp_steps=ramp,
                            prepass=needs_prepass(priority, normalize) if prepass is None else prepass,
                            with_entropy=False, label_names=label_names, device=torch.device("cpu"))
    return settings, {"loss": TokenLoss(neg_loss=neg_loss, clip_nats=clip_nats)}


def our_gradient(student: PathStudent, mbs, settings_and_loss, step=0):
    """The trainer's gradient of L = Σ w·f(ℓ) / Z: accumulate over micro-batches, then divide by Z (trainable parameters)."""
    settings, loss = settings_and_loss
    student.core.loss = loss["loss"]
    student.model.zero_grad(set_to_none=True)
    result = accumulate_step(student.core, student.core, mbs, settings, step, ONE)
    z = normalizer(result.counts, settings.normalize)
    grads = {n: full_tensor(p.grad).detach().clone() / z for n, p in student.model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in student.model.parameters() if not p.requires_grad)  # frozen base: no gradient at all
    return grads, result.loss_sum / z


def reference_terms(model64, mbs):
    """float64 log p(x_t) at every flat position of every micro-batch, from the model's full logits."""
    out = []
    for mb in mbs:
        logits = model64(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False).logits  # (B, T, V) float64
        logp = torch.log_softmax(logits, -1).flatten(0, 1)[mb.hidden_index]  # (N, V)
        out.append(logp.gather(-1, mb.targets[:, None]).squeeze(-1))
    return out


def reference_gradient(student: PathStudent, mbs, weights, normalize, neg_loss, clip_nats):
    """float64 gradient of Σ_t f(Φ_t, ℓ_t) / Z with Z computed by hand from the full Φ of the global batch."""
    model64 = fresh_copy(student).double()
    logprobs = torch.cat(reference_terms(model64, mbs))
    phi = torch.cat(weights).double()
    mask = torch.cat([mb.tokens["loss_mask"] for mb in mbs])
    nll = -logprobs
    if neg_loss == "clip":
        neg = phi * nll * (nll.detach() < clip_nats)
    elif neg_loss == "unlikelihood":
        p = logprobs.exp().clamp(max=1 - 1e-6)
        neg = phi.abs() * -torch.log(1 - p)
    else:
        neg = phi * nll
    terms = torch.where(phi > 0, phi * nll, torch.where(phi < 0, neg, torch.zeros_like(nll)))
    if normalize == "per_sign":
        n_pos, n_neg = (phi > 0).sum().clamp(min=1), (phi < 0).sum().clamp(min=1)
        loss = terms[phi > 0].sum() / n_pos + terms[phi < 0].sum() / n_neg
    else:
        z = {"tokens": mask.sum(), "selected": (phi != 0).sum(), "abs_weight": phi.abs().sum()}[normalize]
        loss = terms.sum() / z
    loss.backward()
    return {n: p.grad.float() for n, p in model64.named_parameters() if p.requires_grad}, loss.item()


def fresh_copy(student: PathStudent):
    """An unsharded copy of the student's current weights (the adapted model under LoRA)."""
    return copy.deepcopy(student.reference).train()


def assert_grads_close(ours, ref, rtol=2e-4):
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-12
        gap = (ours[name] - ref[name]).abs().max().item()
        assert gap <= rtol * scale, f"{name}: max gap {gap:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize(
    "normalize,neg_loss,batching",
    [("tokens", "none", "sorted"), ("selected", "clip", "sorted"), ("abs_weight", "unlikelihood", "sorted"), ("per_sign", "clip", "sorted"),
     ("per_sign", "none", "sorted"), ("tokens", "none", "packed"), ("per_sign", "clip", "packed"), ("abs_weight", "unlikelihood", "grouped")],
)
def test_weighted_loss_matches_float64_reference(shards, tokenizer, label_names, normalize, neg_loss, batching, kind):
    student = make_student(tokenizer, kind)
    mbs = micro_batches(shards, label_names, batching=batching)
    assert batching != "packed" or all(mb.rows > mb.input_ids.shape[0] for mb in mbs)  # several rows share a sequence
    weights = [mb.tokens["weight"] for mb in mbs]
    assert all((w < 0).any() for w in weights) and all((w > 0).any() for w in weights)
    # A clip threshold at the median NLL, so that both branches of the clip are exercised.
    with torch.no_grad():
        nll = -torch.cat(reference_terms(fresh_copy(student).double(), mbs))
    # Midway between two neighbouring NLLs, so that float32 and float64 agree on which side every token falls.
    negative_nll = torch.sort(nll[torch.cat(weights) < 0]).values
    middle = len(negative_nll) // 2
    clip_nats = float(negative_nll[middle - 1 : middle + 1].mean())
    ours, our_loss = our_gradient(student, mbs, settings_for("stored", normalize, label_names, neg_loss, clip_nats))
    ref, ref_loss = reference_gradient(student, mbs, weights, normalize, neg_loss, clip_nats)
    assert our_loss == pytest.approx(ref_loss, rel=1e-5)
    assert_grads_close(ours, ref)


def test_uniform_priority_is_ordinary_sft(shards, tokenizer, label_names, kind):
    """Φ ≡ 1 with Z = #targets equals F.cross_entropy's mean over the (shifted, masked) labels of one batch."""
    student = make_student(tokenizer, kind)
    (mb,) = micro_batches(shards, label_names, count=1)
    ours, our_loss = our_gradient(student, [mb], settings_for("uniform", "tokens", label_names))
    clone = fresh_copy(student)
    logits = clone(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    labels = torch.full(mb.input_ids.shape, -100)
    flat_mask = torch.zeros(mb.input_ids.numel(), dtype=torch.bool)
    flat_mask[mb.hidden_index + 1] = mb.tokens["loss_mask"]
    labels.view(-1)[flat_mask] = mb.input_ids.view(-1)[flat_mask]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    assert our_loss == pytest.approx(loss.item(), rel=1e-5)
    assert_grads_close(ours, {n: p.grad for n, p in clone.named_parameters() if p.requires_grad})


def test_scaling_phi_changes_nothing_under_abs_weight(shards, tokenizer, label_names, kind):
    student = make_student(tokenizer, kind)
    mbs = micro_batches(shards, label_names)
    base, base_loss = our_gradient(student, mbs, settings_for("stored", "abs_weight", label_names))
    scaled, scaled_loss = our_gradient(student, mbs, settings_for("3.5 * stored", "abs_weight", label_names))
    assert scaled_loss == pytest.approx(base_loss, rel=1e-6)
    assert_grads_close(scaled, base, rtol=1e-5)


@pytest.mark.parametrize("batching", ["packed", "sorted"])
def test_gradient_accumulation_equals_one_large_batch(shards, tokenizer, label_names, batching, kind):
    """Three micro-batches accumulated = one micro-batch holding all their rows (packed: all their sequences)."""
    student = make_student(tokenizer, kind)
    mbs = micro_batches(shards, label_names, count=3, batching=batching)
    # The same rows as one micro-batch: the plan's row indices of the first window (one group here).
    groups = row_groups(open_shards(shards))
    plan = window_plan(groups, epoch_windows(len(groups), 0, 0, 1)[0], 0, 0, 0, layout_of(batching, 160, groups))
    table = read_groups(groups, sorted({"input_ids", "loss_mask", *COLUMNS}))
    rows = np.concatenate([bucket.rows for bucket in plan[:3]])
    sequence = None
    if batching == "packed":  # renumber the three buckets' sequences one after the other
        offsets = np.cumsum([0] + [int(b.sequence[-1]) + 1 for b in plan[:2]])
        sequence = np.concatenate([b.sequence + o for b, o in zip(plan[:3], offsets)])
    big = make_micro_batch(table.take(rows), 0, COLUMNS, label_names, sequence)
    assert big.rows == sum(mb.rows for mb in mbs) and big.input_ids.shape[0] == sum(mb.input_ids.shape[0] for mb in mbs)
    for normalize in ("tokens", "per_sign"):
        settings = settings_for("stored", normalize, label_names, neg_loss="clip", clip_nats=8.0)
        accumulated, loss_a = our_gradient(student, mbs, settings)
        single, loss_b = our_gradient(student, [big], settings)
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert_grads_close(accumulated, single, rtol=1e-4)


def test_zero_weight_token_contributes_no_gradient(shards, tokenizer, label_names, kind):
    """Changing the id of a row's last token (Φ = 0) cannot change any other prediction (causal), so the
    gradient must be identical; with Φ ≠ 0 it changes."""
    student = make_student(tokenizer, kind)
    (mb,) = micro_batches(shards, label_names, count=1)
    last = int(mb.attention_mask[0].sum()) - 1  # row 0's last token, flat position `last`
    assert mb.tokens["loss_mask"][last]

    def with_last(phi_value, new_id):
        ids = mb.input_ids.clone()
        ids[0, last] = new_id
        targets = mb.targets.clone()
        targets[last] = new_id
        weight = mb.tokens["weight"].clone()
        weight[last] = phi_value
        changed = type(mb)(**{**mb.__dict__, "input_ids": ids, "targets": targets, "tokens": {**mb.tokens, "weight": weight}})
        return our_gradient(student, [changed], settings_for("stored", "tokens", label_names))[0]

    a, b = with_last(0.0, 7), with_last(0.0, 9)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    c, d = with_last(1.0, 7), with_last(1.0, 9)
    assert any(not torch.equal(c[name], d[name]) for name in c)


def test_token_terms_and_slopes_match_autograd():
    """Terms by hand; slopes ∂t/∂log p against float64 autograd of the same formulas."""
    logprob = torch.tensor([0.0, -1e-9, -0.5, -3.0, -50.0, -0.2, -7.0])
    weight = torch.tensor([-1.0, -1.0, -2.0, -1.0, -1.0, 1.5, 0.0])
    terms, slopes, _ = token_terms(logprob, weight, TokenLoss(neg_loss="unlikelihood", clip_nats=5.0))
    expected = [-math.log(1e-6), -math.log(1e-6), 2 * -math.log(1 - math.exp(-0.5)), -math.log(1 - math.exp(-3.0)), 0.0, 0.3, 0.0]
    torch.testing.assert_close(terms.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    lp = logprob.double().requires_grad_(True)
    capped = lp.clamp(max=math.log(1 - 1e-6))
    reference = torch.where(weight < 0, weight.abs() * -torch.log(-torch.expm1(capped)), weight * -lp)
    reference.sum().backward()
    torch.testing.assert_close(slopes.double(), lp.grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(slopes).all() and slopes[0] == 0  # p capped at 1 − 1e-6: no gradient there
    # clip: Φ·ℓ below c, 0 from c on (slope 0 there)
    logprob = torch.tensor([-1.0, -4.9, -5.0, -9.0])
    terms, slopes, clipped = token_terms(logprob, torch.full((4,), -2.0), TokenLoss(neg_loss="clip", clip_nats=5.0))
    torch.testing.assert_close(terms, torch.tensor([-2.0, -9.8, 0.0, 0.0]))
    assert clipped.tolist() == [False, False, True, True]
    assert slopes.tolist() == [2.0, 2.0, 0.0, 0.0]
    terms, slopes, _ = token_terms(logprob, torch.full((4,), -2.0), TokenLoss(neg_loss="none", clip_nats=5.0))
    assert slopes.tolist() == [2.0] * 4 and terms.tolist() == pytest.approx([-2.0, -9.8, -10.0, -18.0])


@pytest.mark.parametrize("neg_loss", ["clip", "unlikelihood", "none"])
def test_fused_head_equals_autograd_through_token_stats(neg_loss):
    """The fused head's loss and gradients (hidden, weight, bias) equal autograd through token_stats' float32 head."""
    from scoring.stats import token_stats

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    head.weight.data.mul_(4.0)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    phi = torch.randn(23)
    clip = 3.0
    model = type("M", (), {"get_output_embeddings": lambda self: head})()
    logprob, _ = token_stats(model, hidden, targets, chunk_rows=5, with_entropy=False)
    nll = -logprob
    capped = logprob.clamp(max=math.log(1 - 1e-6))
    negative = {"clip": phi * nll * (nll < clip).detach(), "unlikelihood": phi.abs() * -torch.log(-torch.expm1(capped)), "none": phi * nll}[neg_loss]
    reference = torch.where(phi < 0, negative, phi * nll).sum()
    ref_grads = torch.autograd.grad(reference, [hidden, head.weight, head.bias])
    ours, our_logprob, _ = fused_weighted_head(head, hidden, targets, LossWeights(phi, None), loss=TokenLoss(neg_loss=neg_loss, clip_nats=clip), chunk_rows=5)
    our_grads = torch.autograd.grad(2.0 * ours, [hidden, head.weight, head.bias])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_logprob, logprob.detach(), rtol=1e-6, atol=1e-6)
    for mine, ref in zip(our_grads, ref_grads):
        torch.testing.assert_close(mine, 2.0 * ref, rtol=1e-4, atol=1e-5)


def test_rho1_selects_exactly_top_k_of_the_global_batch(shards, tokenizer, label_names, kind):
    student = make_student(tokenizer, kind)
    mbs = micro_batches(shards, label_names, count=3)
    settings, _ = settings_for("rho1(k=0.37)", "selected", label_names)
    phis = global_priority(student.core, mbs, settings, 0, ONE)  # FSDP: `statistics` runs inside the root's all-gather
    # Reference: excess = NLL_student − NLL_ref over all candidates of all micro-batches together.
    with torch.no_grad():
        logprob = torch.cat(reference_terms(fresh_copy(student).double(), mbs))
    mask = torch.cat([mb.tokens["loss_mask"] for mb in mbs])
    ref_lp = torch.cat([mb.tokens["ref_logprob"] for mb in mbs]).double()
    excess = (-logprob + ref_lp)[mask]
    n_select = math.ceil(0.37 * int(mask.sum()))
    expected = torch.zeros(len(mask))
    expected[mask.nonzero().squeeze(1)[torch.argsort(-excess, stable=True)[:n_select]]] = 1.0
    phi = torch.cat(phis)
    assert int(phi.sum()) == n_select
    assert torch.equal(phi, expected)
    # Selection is global: the micro-batches' shares differ (a per-micro-batch top-k would give each ≈ k).
    shares = [float(p.sum() / mb.tokens["loss_mask"].sum()) for p, mb in zip(phis, mbs)]
    assert max(shares) - min(shares) > 0.05, shares


def test_negative_phi_raises_negative_nll_and_lowers_positive_nll(tmp_path, tokenizer, kind):
    """Rows of one text are labelled toxic (Φ = −1 via labels(toxic=-1)); a few steps of training must raise
    their NLL and lower the others', with every neg_loss, and never produce NaN."""
    rows = write_shards(tmp_path / "s", tokenizer, n_rows=12, n_shards=1, negative_share=0.0)
    from train_shards import make_rows

    cols = make_rows(tokenizer, 12, seed=0, negative_share=0.0)
    cols["label"] = [["toxic" if (i % 6 == 1 and m) else None for m in mask] for i, mask in enumerate(cols["loss_mask"])]
    rows = write_shards(tmp_path / "s2", tokenizer, n_rows=12, n_shards=1, rows_override={"label": cols["label"]})
    groups = row_groups(open_shards(rows))
    mbs = list(iter_epoch(groups, seed=0, epoch=0, window_groups=1, layout=Layout("sorted", 4096), columns=COLUMNS, label_names=["toxic"], rank=0, world_size=1))
    assert len(mbs) == 1
    for neg_loss in ("clip", "unlikelihood", "none"):
        settings, loss = settings_for("labels(toxic=-1)", "per_sign", ["toxic"], neg_loss=neg_loss, clip_nats=8.0)
        # Near-uniform start (NLL ≈ ln V, below the clip at 8 nats); under LoRA the frozen head is shrunk less, so that
        # the adapters' changes to the hidden states move the logits.
        divide = 4.0 if "lora" in kind else 20.0
        student = make_student(tokenizer, kind, prepare=lambda m, divide=divide: m.lm_head.weight.data.div_(divide), chunk_rows=64,
                               neg_loss=neg_loss, clip_nats=8.0)
        core = student.core
        optimizer = torch.optim.AdamW(student.trainable, lr=3e-3 if "lora" not in kind else 3e-2)  # the adapters start small
        history = []
        for step in range(6):
            result = accumulate_step(core, core, mbs, settings, step, ONE)
            history.append((result.nll_positive_sum / result.counts.positive, result.nll_negative_sum / result.counts.negative))
            optimizer.step()
            optimizer.zero_grad()
        assert all(np.isfinite(history).ravel()), (neg_loss, history)
        (pos0, neg0), (pos1, neg1) = history[0], history[-1]
        if "lora" in kind and neg_loss == "unlikelihood":
            # Frozen head, near-uniform start: unlikelihood's slope p/(1 − p) ≈ p ≈ 1/V is tiny, so the features the adapters learn
            # for the positive tokens lower every NLL; what must hold is that the negatives are pushed apart from the positives.
            assert pos1 < pos0 - 0.1 and (neg1 - pos1) > (neg0 - pos0) + 0.1, (neg_loss, history)
        else:
            assert pos1 < pos0 - 0.1 and neg1 > neg0 + 0.1, (neg_loss, history)


def shrink_head(model) -> None:
    with torch.no_grad():
        model.lm_head.weight.div_(20.0)


def test_dft_weights_come_from_the_student_in_the_same_pass(shards, tokenizer, label_names, kind):
    """dft (Φ = sg(p_student)) through the online path equals the float64 gradient of Σ sg(p)·ℓ / #targets."""
    student = make_student(tokenizer, kind, prepare=shrink_head)  # p far from 0, so the weights matter
    mbs = micro_batches(shards, label_names)
    settings = settings_for("dft", "tokens", label_names)
    assert not settings[0].prepass
    ours, our_loss = our_gradient(student, mbs, settings)
    with torch.no_grad():
        p = torch.cat(reference_terms(fresh_copy(student).double(), mbs)).exp()
    mask = torch.cat([mb.tokens["loss_mask"] for mb in mbs])
    weights = (p * mask).float()
    sizes = [mb.targets.numel() for mb in mbs]
    ref, ref_loss = reference_gradient(student, mbs, list(weights.split(sizes)), "tokens", "none", 1e9)
    assert our_loss == pytest.approx(ref_loss, rel=1e-5)
    assert_grads_close(ours, ref)


def test_rho1_micro_scope_selects_per_micro_batch(shards, tokenizer, label_names, kind):
    student = make_student(tokenizer, kind)
    mbs = micro_batches(shards, label_names, count=3)
    settings, _ = settings_for("rho1(k=0.37, scope=micro)", "selected", label_names)
    assert not settings.prepass
    counts = accumulate_step(student.core, student.core, mbs, settings, 0, ONE).counts
    assert int(counts.selected) == sum(math.ceil(0.37 * int(mb.tokens["loss_mask"].sum())) for mb in mbs)
