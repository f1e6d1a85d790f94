"""One optimizer step's gradient: Φ for every micro-batch, then Σ w·f(ℓ) backpropagated per micro-batch.

After `accumulate_step` returns, the parameters' .grad hold Σ over the global batch of w·∇f(ℓ) (averaged over
ranks by DDP) and the caller scales them by W / Z (loss.normalizer) before clipping.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from scoring.priority import Priority, evaluate_priority
from scoring.stats import final_hidden, token_stats
from training.data import MicroBatch
from training.distributed import Dist, all_gather_flat, all_reduce_sum
from training.loss import normalizer_counts, ramp_negative, sign_weights, token_terms


class HeadStats(nn.Module):
    """The student as DDP sees it: padded ids → log-prob (and entropy) of the targets at chosen positions only.

    The transformer runs under autocast when `autocast_dtype` is set; the output layer always runs in
    float32 chunks (scoring.stats.token_stats), recomputed in backward, so no (B, T, V) logits exist.
    """

    def __init__(self, model: nn.Module, chunk_rows: int, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.model, self.chunk_rows, self.autocast_dtype = model, chunk_rows, autocast_dtype

    def forward(self, input_ids, attention_mask, hidden_index, targets, with_entropy: bool = False):
        device_type = input_ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            hidden = final_hidden(self.model, input_ids, attention_mask)  # (B, T, D)
        picked = hidden.flatten(0, 1)[hidden_index]  # (n, D)
        return token_stats(self.model, picked, targets, chunk_rows=self.chunk_rows, with_entropy=with_entropy)


@dataclass(frozen=True)
class StepSettings:
    priority: Priority
    normalize: str  # tokens | selected | abs_weight | per_sign
    neg_loss: str  # clip | unlikelihood | none
    clip_nats: float  # c of neg_loss=clip
    neg_ramp_steps: int
    prepass: bool  # Φ needs the student before the gradient pass (global rho1, or per_sign with online Φ)
    with_entropy: bool  # the spec reads student_entropy
    label_names: list[str]
    device: torch.device


def student_columns(core: HeadStats, mb: MicroBatch, settings: StepSettings, positions: torch.Tensor, logprob=None, entropy=None) -> dict:
    """mb.tokens plus detached "student_logprob"/"student_entropy" (N,) float32, filled at `positions`."""
    if logprob is None:
        with torch.no_grad():
            logprob, entropy = run_student(core, mb, positions, settings, settings.with_entropy)
    tokens = dict(mb.tokens)
    n = mb.targets.numel()
    tokens["student_logprob"] = torch.zeros(n).index_put_((positions,), logprob.detach().float().cpu())
    tokens["student_entropy"] = torch.zeros(n).index_put_((positions,), entropy.detach().float().cpu())
    return tokens


def run_student(student, mb: MicroBatch, positions: torch.Tensor, settings: StepSettings, with_entropy: bool):
    device = settings.device
    return student(
        mb.input_ids.to(device),
        mb.attention_mask.to(device),
        mb.hidden_index[positions].to(device),
        mb.targets[positions].to(device),
        with_entropy,
    )


def global_priority(core: HeadStats, mbs: list[MicroBatch], settings: StepSettings, step: int, ctx: Dist) -> list[torch.Tensor]:
    """Φ of this rank's micro-batches, evaluated on the whole global batch (all micro-batches of all ranks).

    A no-grad forward gives the student's statistics; the tokens of every rank are gathered and concatenated
    in global micro-batch order j (then position), which is the top-k tie-break order, so exactly ⌈k·N⌉
    candidates of the global batch are selected whatever the split into ranks and accumulation steps.
    """
    local = [student_columns(core, mb, settings, mb.tokens["loss_mask"].nonzero().squeeze(1)) for mb in mbs]
    keys = sorted(local[0])
    # Per segment (micro-batch): global index, positions, rows.
    shape = torch.tensor([[mb.index, mb.targets.numel(), mb.input_ids.shape[0]] for mb in mbs], dtype=torch.int64)
    shapes = [s.view(-1, 3) for s in all_gather_flat(shape.view(-1).to(settings.device), ctx)]
    columns = {}
    for key in keys:
        flat = torch.cat([t[key] for t in local])
        wire = flat.to(torch.uint8) if flat.dtype == torch.bool else flat
        gathered = [g.cpu() for g in all_gather_flat(wire.to(settings.device), ctx)]
        columns[key] = [g.to(flat.dtype) for g in gathered]
    # Cut every rank's concatenation back into segments, then order all segments by global index j.
    segments = []  # (j, rank, slice start, length, rows)
    for rank, rank_shapes in enumerate(shapes):
        start = 0
        for j, n, rows in rank_shapes.cpu().tolist():
            segments.append((j, rank, start, n, rows))
            start += n
    segments.sort()
    tokens, row_offset = {key: [] for key in keys}, 0
    for j, rank, start, n, rows in segments:
        for key in keys:
            part = columns[key][rank][start : start + n]
            tokens[key].append(part + row_offset if key == "seq_index" else part)
        row_offset += rows
    phi = evaluate_priority(settings.priority, {k: torch.cat(v) for k, v in tokens.items()}, step=step, label_names=settings.label_names)
    # This rank's segments, back in local order.
    mine, offset = {}, 0
    for j, rank, start, n, rows in segments:
        if rank == ctx.rank:
            mine[j] = phi[offset : offset + n]
        offset += n
    return [mine[mb.index] for mb in mbs]


def accumulate_step(student, core: HeadStats, mbs: list[MicroBatch], settings: StepSettings, step: int, ctx: Dist) -> dict:
    """Backpropagate Σ w·f(ℓ) for each of this rank's micro-batches of one optimizer step.

    `student` is `core` or its DDP wrapper. Returns the global (all-reduced) normaliser counts (5,) and the
    log sums: Σ w·f(ℓ), Σℓ and count over Φ > 0, Σℓ and count over Φ < 0, clipped count, input tokens.
    """
    # ---- Φ before the gradient pass, when it does not need the student or a prepass provides it
    phis = None
    if not settings.priority.online:
        phis = [evaluate_priority(settings.priority, mb.tokens, step=step, label_names=settings.label_names) for mb in mbs]
    elif settings.prepass:
        phis = global_priority(core, mbs, settings, step, ctx)
    counts = torch.zeros(5, dtype=torch.float64)
    if phis is not None:
        counts = sum(normalizer_counts(phi, mb.tokens["loss_mask"]) for phi, mb in zip(phis, mbs))
        counts = all_reduce_sum(counts.to(settings.device), ctx).cpu()

    # ---- gradient pass: one backward per micro-batch, gradients synchronised on the last one only
    sums = torch.zeros(7, dtype=torch.float64)
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        sync = student.no_sync() if (student is not core and not last) else contextlib.nullcontext()
        with sync:
            if phis is not None:
                phi = phis[i]
                positions = phi.nonzero().squeeze(1)
                positions = positions if positions.numel() else torch.zeros(1, dtype=torch.int64)  # weight 0: DDP sees the head
                logprob, _ = run_student(student, mb, positions, settings, False)
            else:
                positions = mb.tokens["loss_mask"].nonzero().squeeze(1)
                positions = positions if positions.numel() else torch.zeros(1, dtype=torch.int64)
                logprob, entropy = run_student(student, mb, positions, settings, settings.with_entropy)
                tokens = student_columns(core, mb, settings, positions, logprob, entropy)
                phi = evaluate_priority(settings.priority, tokens, step=step, label_names=settings.label_names)
                counts += normalizer_counts(phi, mb.tokens["loss_mask"])
            raw = phi[positions]
            weight = ramp_negative(raw, step, settings.neg_ramp_steps)
            if settings.normalize == "per_sign":
                weight = sign_weights(weight, counts)
            weight = weight.to(settings.device)
            terms, clipped = token_terms(logprob, weight, neg_loss=settings.neg_loss, clip_nats=settings.clip_nats)
            terms.sum().backward()
        nll = -logprob.detach().double().cpu()
        positive, negative = raw > 0, raw < 0
        sums += torch.tensor([
            terms.detach().double().sum().item(), nll[positive].sum().item(), positive.sum().item(),
            nll[negative].sum().item(), negative.sum().item(), clipped.sum().item(), mb.targets.numel(),
        ], dtype=torch.float64)
    if phis is None:
        counts = all_reduce_sum(counts.to(settings.device), ctx).cpu()
    sums = all_reduce_sum(sums.to(settings.device), ctx).cpu()
    return {"counts": counts, "sums": sums}
