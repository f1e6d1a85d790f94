"""Bounded unlearning (--neg-loss npo | refclip) and ASFT's anchor (--anchor-kl) against float64 references, in the
fused head, through a whole step, on a tiny warm student, and through `train()` with its refusals.

Run: pytest tests/test_train_bounded.py
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import build_model
from train_shards import make_rows, write_shards

from scoring.priority import parse_priority
from scoring.shards import open_shards
from scoring.stats import token_stats
from training.batching import Layout
from training.data import iter_epoch, read_groups, row_groups
from training.distributed import Dist
from training.head import fused_weighted_head
from training.loss import ANCHOR_MAX_NATS, LossWeights, TokenLoss, loss_weights, normalizer, token_terms, ZERO_COUNTS, TokenCounts
from training.step import StepSettings, StudentLoss, accumulate_step, needs_prepass
from training.train import TrainConfig, TrainConfigError, train

ONE = Dist(rank=0, world_size=1, local_rank=0)
EXTREMES = [0.0, -1e-9, -1e-3, -0.5, -2.0, -5.0, -30.0, -100.0]


def reference(lp, w, ref, anchor, loss: TokenLoss):
    """float64 terms and slopes ∂t/∂lp by autograd of the formulas in docs/priority.md ("Loss options")."""
    lp64 = lp.double().requires_grad_(True)
    ref64 = torch.where(torch.isnan(ref), lp64.detach(), ref.double())
    w64, nll = w.double(), -lp64
    if loss.neg_loss == "npo":
        beta = loss.npo_beta
        neg = w64.abs() * (2 / beta) * torch.logaddexp(torch.zeros_like(lp64), beta * (lp64 - ref64))  # softplus, exact
    elif loss.neg_loss == "refclip":
        neg = w64 * nll * (nll.detach() < -ref64 + loss.refclip_nats)
    else:
        raise AssertionError(loss.neg_loss)
    terms = torch.where(w64 < 0, neg, w64 * nll)
    if anchor is not None:
        u = ref64 - lp64
        cap = ANCHOR_MAX_NATS
        k3 = torch.where(u <= cap, torch.expm1(u.clamp(max=cap)) - u, math.exp(cap) * (1 + u - cap) - u - 1)  # tangent past 20 nats
        terms = terms + anchor.double() * k3
    terms.sum().backward()
    return terms.detach(), lp64.grad


def grid():
    """Every pair of extreme log-probs (student, reference) with weights −2, −0.5, 0, 1.5 and anchors 0, 0.1."""
    pairs = list(itertools.product(EXTREMES, EXTREMES, [-2.0, -0.5, 0.0, 1.5]))
    lp = torch.tensor([p[0] for p in pairs])
    ref = torch.tensor([p[1] for p in pairs])
    w = torch.tensor([p[2] for p in pairs])
    ref[(w == 0) & (torch.arange(len(w)) % 3 == 0)] = float("nan")  # the weight-0 placeholder may sit at position 0 (NaN statistics)
    anchor = torch.where(w > 0, 0.1, 0.0)
    return lp, w, ref, anchor


@pytest.mark.parametrize("loss", [TokenLoss("npo", npo_beta=1.0), TokenLoss("npo", npo_beta=0.05), TokenLoss("npo", npo_beta=10.0),
                                  TokenLoss("refclip", refclip_nats=3.0), TokenLoss("refclip", refclip_nats=0.0),
                                  TokenLoss("npo", npo_beta=1.0, anchor_kl=0.1), TokenLoss("refclip", anchor_kl=0.05)])
def test_terms_and_slopes_match_float64_on_extreme_inputs(loss):
    lp, w, ref, anchor = grid()
    anchor = anchor if loss.anchor_kl > 0 else None
    terms, slopes, clipped = token_terms(lp, w, loss, ref, anchor)
    assert torch.isfinite(terms).all() and torch.isfinite(slopes).all()
    ref_terms, ref_slopes = reference(lp, w, ref, anchor, loss)
    scale_t, scale_s = ref_terms.abs().clamp(min=1.0), ref_slopes.abs().clamp(min=1.0)
    assert ((terms.double() - ref_terms).abs() <= 1e-5 * scale_t).all(), (terms.double() - ref_terms).abs().max()
    assert ((slopes.double() - ref_slopes).abs() <= 1e-5 * scale_s).all(), (slopes.double() - ref_slopes).abs().max()
    negative = w < 0
    if loss.neg_loss == "npo":  # slope 2|w|σ(β(lp − lp_ref)) ∈ (0, 2|w|], never clipped
        assert (slopes[negative] >= 0).all() and (slopes[negative] <= 2 * w[negative].abs() + 1e-6).all() and not clipped.any()
    else:  # refclip: clipped exactly where ℓ ≥ ℓ_ref + δ
        assert torch.equal(clipped, negative & (-lp >= -ref + loss.refclip_nats))
    assert (terms[w == 0] == 0).all() and (slopes[w == 0] == 0).all()


def test_minimising_the_bounded_losses_lowers_the_unwanted_log_prob_and_then_stops():
    """Gradient descent on lp (lp ← lp − lr·slope) from lp = lp_ref: both losses lower lp; NPO's push fades
    (below 0.1 of its start after 400 steps) and refclip's stops at ℓ_ref + δ. Clipped ascent
    (clip at ln V) keeps pushing at full slope until ℓ reaches ln V."""
    ref = torch.tensor([-0.1])
    w = torch.tensor([-1.0])
    for loss in (TokenLoss("npo", npo_beta=1.0), TokenLoss("refclip", refclip_nats=3.0), TokenLoss("clip", clip_nats=math.log(320))):
        lp = ref.clone()
        slopes = []
        for _ in range(400):
            _, slope, _ = token_terms(lp, w, loss, ref)
            slopes.append(float(slope))
            lp = lp - 0.05 * slope
        assert slopes[0] > 0.99 and lp < ref - 2.9, (loss, lp)
        if loss.neg_loss == "npo":  # fading, not stopping: σ(β·Δ) falls like e^{βΔ} while Δ grows only logarithmically
            assert slopes[-1] < 0.1 and all(a >= b for a, b in zip(slopes, slopes[1:])) and float(lp) > float(ref) - 10
        elif loss.neg_loss == "refclip":
            assert slopes[-1] == 0 and float(-lp) == pytest.approx(0.1 + 3.0, abs=0.06)
        else:
            assert float(-lp) == pytest.approx(math.log(320), abs=0.06) and slopes[-1] == 0


def test_anchor_slope_is_the_derivative_of_k3_and_pulls_towards_the_reference():
    lp = torch.linspace(-8, 0, 33)
    ref = torch.full_like(lp, -2.0)
    anchor = torch.full_like(lp, 0.1)
    terms, slopes, _ = token_terms(lp, torch.ones_like(lp), TokenLoss("clip", anchor_kl=0.1), ref, anchor)
    k3 = terms - (-lp)  # minus the plain SFT term (w = 1)
    u = (ref - lp).double()
    torch.testing.assert_close(k3.double(), 0.1 * (torch.exp(u) - u - 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((slopes + 1).double(), 0.1 * (1 - torch.exp(u)), rtol=1e-5, atol=1e-6)  # ∂k3/∂lp = 1 − e^{lp_ref − lp}
    assert (k3 >= 0).all() and k3[lp == -2.0].abs().max() < 1e-6
    assert ((slopes + 1)[lp < -2] < 0).all() and ((slopes + 1)[lp > -2] > 0).all()  # raises lp below the reference, lowers it above


def test_anchor_coefficients_follow_the_normaliser():
    phi = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0])
    counts = TokenCounts.of(phi)
    per_sign = loss_weights(phi, step=0, ramp_steps=0, counts=counts, normalize="per_sign", anchor_kl=0.1)
    assert per_sign.anchor.tolist() == pytest.approx([0.1 / 3, 0.1 / 3, 0.0, 0.0, 0.1 / 3])
    tokens = loss_weights(phi, step=0, ramp_steps=0, counts=counts, normalize="tokens", anchor_kl=0.1)
    assert tokens.anchor.tolist() == pytest.approx([0.1, 0.1, 0.0, 0.0, 0.1]) and torch.equal(tokens.weight, phi)
    assert loss_weights(phi, step=0, ramp_steps=0, counts=ZERO_COUNTS, normalize="tokens", anchor_kl=0.0).anchor is None


@pytest.mark.parametrize("loss", [TokenLoss("npo", npo_beta=1.0), TokenLoss("refclip", refclip_nats=1.0, anchor_kl=0.1),
                                  TokenLoss("npo", npo_beta=2.0, anchor_kl=0.5)])
def test_fused_head_equals_autograd_through_token_stats(loss):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    head.weight.data.mul_(4.0)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    phi = torch.randn(23)
    ref = -torch.rand(23) * 6
    anchor = torch.where(phi > 0, loss.anchor_kl, 0.0) if loss.anchor_kl else None
    model = type("M", (), {"get_output_embeddings": lambda self: head})()
    logprob, _ = token_stats(model, hidden, targets, chunk_rows=5, with_entropy=False)
    nll = -logprob
    if loss.neg_loss == "npo":
        neg = phi.abs() * (2 / loss.npo_beta) * torch.nn.functional.softplus(loss.npo_beta * (logprob - ref))
    else:
        neg = phi * nll * (nll < -ref + loss.refclip_nats).detach()
    reference_loss = torch.where(phi < 0, neg, phi * nll)
    if anchor is not None:
        u = ref - logprob
        reference_loss = reference_loss + anchor * (torch.exp(u) - u - 1)
    ref_grads = torch.autograd.grad(reference_loss.sum(), [hidden, head.weight, head.bias])
    ours, _, _ = fused_weighted_head(head, hidden, targets, LossWeights(phi, anchor), loss=loss, chunk_rows=5, ref_logprob=ref)
    our_grads = torch.autograd.grad(ours, [hidden, head.weight, head.bias])
    torch.testing.assert_close(ours, reference_loss.sum(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(our_grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


# ---- a whole step against float64, with the stored reference read at the chosen positions ------------------------


@pytest.fixture(scope="module")
def signed_shards(tmp_path_factory, tokenizer):
    return write_shards(tmp_path_factory.mktemp("bounded_shards"), tokenizer, n_rows=24, n_shards=1, seed=5, negative_share=0.3)


def packed_batches(folder, columns, count=None, batch_tokens=160):
    groups = row_groups(open_shards(folder))
    longest = int(read_groups(groups, ["n_tokens"]).column("n_tokens").to_numpy().max())
    mbs = list(iter_epoch(groups, seed=0, epoch=0, window_groups=1, layout=Layout("packed", batch_tokens, longest), columns=columns,
                          label_names=["toxic"], rank=0, world_size=1))
    return mbs[:count] if count else mbs


@pytest.mark.parametrize("spec,normalize,loss", [("stored", "per_sign", TokenLoss("npo", npo_beta=1.0, anchor_kl=0.1)),
                                                 ("stored", "tokens", TokenLoss("refclip", refclip_nats=0.5)),
                                                 ("dft", "tokens", TokenLoss("clip", clip_nats=8.0, anchor_kl=0.1))])
def test_step_gradient_matches_float64_reference(signed_shards, tokenizer, spec, normalize, loss):
    """accumulate_step over packed micro-batches with the stored ref_logprob vs the float64 gradient of
    Σ_t t(Φ_t, lp_t, lp_ref,t) / Z computed from the full logits (the last row is the ASFT = dft + anchor recipe)."""
    mbs = packed_batches(signed_shards, ["label", "ref_logprob", "weight"], count=2)
    model = build_model(len(tokenizer), seed=1, hidden_size=64, layers=1).train()
    with torch.no_grad():
        model.lm_head.weight.div_(20.0)  # p far from 0 (dft) and log-ratios of a few nats
    priority = parse_priority(spec)
    settings = StepSettings(priority=priority, normalize=normalize, neg_ramp_steps=0, prepass=needs_prepass(priority, normalize),
                            with_entropy=False, label_names=["toxic"], device=torch.device("cpu"), ref_column="ref_logprob")
    core = StudentLoss(model, chunk_rows=7, autocast_dtype=None, loss=loss)
    model.zero_grad(set_to_none=True)
    result = accumulate_step(core, core, mbs, settings, 0, ONE)
    z = normalizer(result.counts, normalize)
    ours = {n: p.grad / z for n, p in model.named_parameters()}
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    clone = clone.double().train()
    lps = []
    for mb in mbs:
        logits = clone(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False).logits
        lps.append(torch.log_softmax(logits, -1).flatten(0, 1)[mb.hidden_index].gather(-1, mb.targets[:, None]).squeeze(-1))
    lp = torch.cat(lps)
    mask = torch.cat([mb.tokens["loss_mask"] for mb in mbs])
    phi = torch.cat([mb.tokens["weight"] for mb in mbs]).double() if spec == "stored" else (lp.detach().exp() * mask)
    ref = torch.cat([mb.tokens["ref_logprob"] for mb in mbs]).double()
    ref = torch.where(mask, ref, lp.detach())  # only targets carry a term; NaN sits at position 0
    nll = -lp
    if loss.neg_loss == "npo":
        neg = phi.abs() * (2 / loss.npo_beta) * torch.logaddexp(torch.zeros_like(lp), loss.npo_beta * (lp - ref))
    elif loss.neg_loss == "refclip":
        neg = phi * nll * (nll.detach() < -ref + loss.refclip_nats)
    else:
        neg = phi * nll * (nll.detach() < loss.clip_nats)
    terms = torch.where(phi < 0, neg, phi * nll) * (phi != 0)
    u = ref - lp
    anchor = loss.anchor_kl * (torch.exp(u) - u - 1) * (phi > 0)
    if normalize == "per_sign":
        n_pos, n_neg = (phi > 0).sum(), (phi < 0).sum()
        total = (terms[phi > 0].sum() + anchor.sum()) / n_pos + terms[phi < 0].sum() / n_neg
    else:
        total = (terms.sum() + anchor.sum()) / mask.sum()
    total.backward()
    assert result.loss_sum / z == pytest.approx(total.item(), rel=1e-5)
    for name, p in clone.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (ours[name].double() - p.grad).abs().max().item() <= 2e-4 * scale, name


# ---- a tiny warm student: labelled NLL rises, the other tokens suffer no more than under clipped ascent -------------


def nll_by_label(model, rows):
    """Mean NLL (nats) of the labelled and of the unlabelled targets over `rows` (ids, mask, labelled)."""
    sums = {True: [], False: []}
    with torch.no_grad():
        for ids, mask, labelled in rows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
            for t in range(1, len(ids)):
                if mask[t]:
                    sums[bool(labelled[t])].append(float(nll[t - 1]))
    return float(np.mean(sums[True])), float(np.mean(sums[False]))


def conflict_rows(tokenizer, n_rows=40, toxic_share=0.3, seed=0):
    """Chat-like rows "Q: a+b= REPLY": the reply is the boilerplate "Sure. The answer is N." or, in `toxic_share` of
    the rows, "Stupid! The answer is N." with "Stupid!" labelled toxic. Both replies start with the same token "S"
    in the same context, so ascent on the toxic "S" and descent on the boilerplate's "S" fight over one token (the
    situation of the embedded study). Targets: the reply tokens."""
    rng = np.random.default_rng(seed)
    cols = make_rows(tokenizer, n_rows, seed=seed, negative_share=0.0)
    ids_all, masks, labels = [], [], []
    for i in range(n_rows):
        a, b = (int(x) for x in rng.integers(10, 50, size=2))
        toxic = i < round(toxic_share * n_rows)
        prompt = tokenizer(f"Q: {a}+{b}=")["input_ids"]
        span = tokenizer(" Stupid!" if toxic else " Sure.", add_special_tokens=False)["input_ids"]
        rest = tokenizer(f" The answer is {a + b}.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + span + rest
        start = len(prompt) + 1  # the reply's first token after the space: "S"
        ids_all.append(ids)
        masks.append([t >= start for t in range(len(ids))])
        labels.append([("toxic" if toxic and start <= t < len(prompt) + len(span) else None) for t in range(len(ids))])
    n = [len(ids) for ids in ids_all]
    cols.update(input_ids=ids_all, loss_mask=masks, label=labels, n_tokens=n, n_targets=[sum(m) for m in masks],
                weight=[[float(x) for x in m] for m in masks], char_start=[[-1] * k for k in n], char_end=[[-1] * k for k in n],
                ref_logprob=[[float("nan")] + [-1.0] * (k - 1) for k in n], ref_entropy=[[float("nan")] + [1.0] * (k - 1) for k in n])
    return cols


@pytest.mark.slow  # about 200 optimizer steps of a tiny model (a minute or two on 2 shared cores)
def test_bounded_unlearning_from_a_warm_student_damages_no_more_than_clipped_ascent(tmp_path, tokenizer):
    """Warm start: plain SFT on the conflict rows until both replies are known. The warm student is then scored
    as `ref` (its own starting checkpoint: what `add-model --prefix ref` writes) and 40 steps of labels(toxic=-1)
    run from it with each negative loss. Damage = the rise of the unlabelled targets' mean NLL (the boilerplate and
    the answers) after those steps. NPO and ref-clip must raise the labelled tokens' mean NLL by ≥ 1 nat, keep
    every loss and gradient finite, and do no more damage than clipped ascent (clip at ln V)."""
    cols = conflict_rows(tokenizer)
    rows = list(zip(cols["input_ids"], cols["loss_mask"], [[x is not None for x in row] for row in cols["label"]]))
    warm = build_model(len(tokenizer), seed=2, hidden_size=64, layers=2).train()
    with torch.no_grad():
        warm.lm_head.weight.div_(20.0)
    plain = write_shards(tmp_path / "plain", tokenizer, n_rows=len(rows), n_shards=1, rows_override=cols)

    def run(model, folder, spec, loss, steps, lr, ref_column=None):
        priority = parse_priority(spec)
        settings = StepSettings(priority=priority, normalize="per_sign", neg_ramp_steps=0, prepass=False, with_entropy=False,
                                label_names=["toxic"], device=torch.device("cpu"), ref_column=ref_column)
        core = StudentLoss(model, chunk_rows=64, autocast_dtype=None, loss=loss)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
        mbs = packed_batches(folder, ["label", "ref_logprob", "weight"], batch_tokens=4096)
        for step in range(steps):
            result = accumulate_step(core, core, mbs, settings, step, ONE)
            assert math.isfinite(result.loss_sum) and all(torch.isfinite(p.grad).all() for p in model.parameters())
            for p in model.parameters():
                p.grad.div_(normalizer(result.counts, "per_sign"))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    run(warm, plain, "uniform", TokenLoss(), steps=80, lr=1e-2)
    warm.eval()
    with torch.no_grad():
        ref = [[float("nan")] + torch.log_softmax(warm(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
               .gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist() for ids in cols["input_ids"]]
    scored = write_shards(tmp_path / "scored", tokenizer, n_rows=len(rows), n_shards=1, rows_override={**cols, "ref_logprob": ref})
    before = nll_by_label(warm, rows)
    assert before[1] < 1.0, before  # the warm student knows the boilerplate and the answers' form
    after = {}
    for loss in (TokenLoss("clip", clip_nats=math.log(len(tokenizer))), TokenLoss("npo", npo_beta=1.0), TokenLoss("refclip", refclip_nats=3.0)):
        student = type(warm)(warm.config)
        student.load_state_dict(warm.state_dict())
        run(student.train(), scored, "labels(toxic=-1)", loss, steps=40, lr=3e-3, ref_column="ref_logprob")
        after[loss.neg_loss] = nll_by_label(student.eval(), rows)
    rise = {k: v[0] - before[0] for k, v in after.items()}
    damage = {k: v[1] - before[1] for k, v in after.items()}
    print(f"before {before}; labelled NLL rise {rise}; damage {damage}")
    assert all(np.isfinite(list(rise.values()))) and all(np.isfinite(list(damage.values())))
    assert rise["npo"] >= 1.0 and rise["refclip"] >= 1.0, rise
    assert damage["npo"] <= damage["clip"] and damage["refclip"] <= damage["clip"], damage


# ---- through train(): the options, the recorded loss, the refusals ---------------------------------------------------


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("bounded_student")
    build_model(len(tokenizer), seed=1, hidden_size=64, layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_runs_npo_with_the_anchor_and_records_it(signed_shards, student_dir, tmp_path):
    train(TrainConfig(shards=signed_shards, model=student_dir, out=tmp_path / "run", batch_tokens=160, steps=2, neg_loss="npo",
                      npo_beta=0.5, anchor_kl=0.1))
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["token_loss"]["neg_loss"] == "npo" and record["token_loss"]["npo_beta"] == 0.5 and record["token_loss"]["anchor_kl"] == 0.1
    assert record["ref_column"] == "ref_logprob" and record["config"]["batching"] == "packed" and record["pack_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["negative_tokens"] > 0 for r in rows)


@pytest.mark.parametrize("overrides,error,match", [
    ({"neg_loss": "npo", "neg_ref": "base"}, ValueError, "--neg-loss npo compares with the stored log-prob of --neg-ref base.*no column 'base_logprob'.*add-model"),
    ({"anchor_kl": 0.1, "neg_ref": "start"}, ValueError, "--anchor-kl 0.1 compares.*'start_logprob'"),
    ({"npo_beta": 0.5}, TrainConfigError, "npo_beta=0.5 has no effect here"),
    ({"neg_ref": "ref"}, TrainConfigError, "neg_ref='ref' has no effect here"),
    ({"neg_loss": "refclip", "refclip_nats": -1.0}, TrainConfigError, "refclip_nats ≥ 0"),
    ({"anchor_kl": float("nan")}, TrainConfigError, "anchor_kl=nan"),
    ({"batching": "random"}, TrainConfigError, "batching='random'"),
])
def test_bad_loss_options_are_refused_before_training(signed_shards, student_dir, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train(TrainConfig(shards=signed_shards, model=student_dir, out=tmp_path / "run", batch_tokens=160, steps=1, **overrides))
    assert not (tmp_path / "run").exists()
