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
from training.head import fused_weighted_head
from training.loss import normalizer_counts, ramp_negative, sign_weights


class StudentLoss(nn.Module):
    """The student as DDP sees it: padded ids → the weighted loss Σ w·f(ℓ) at chosen positions only.

    The transformer runs under autocast when `autocast_dtype` is set; the output layer always runs in
    float32 chunks, so no (B, T, V) logits exist: `statistics` uses scoring.stats.token_stats (no grad), the
    gradient pass training.head.fused_weighted_head (gradients made in the forward pass).
    """

    def __init__(self, model: nn.Module, chunk_rows: int, autocast_dtype: torch.dtype | None, neg_loss: str, clip_nats: float):
        super().__init__()
        self.model, self.chunk_rows, self.autocast_dtype = model, chunk_rows, autocast_dtype
        self.neg_loss, self.clip_nats = neg_loss, clip_nats

    def picked_hidden(self, input_ids, attention_mask, hidden_index) -> torch.Tensor:
        """(n, D) final hidden states that predict the chosen positions."""
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            hidden = final_hidden(self.model, input_ids, attention_mask)  # (B, T, D)
        return hidden.flatten(0, 1)[hidden_index]

    @torch.no_grad()
    def statistics(self, input_ids, attention_mask, hidden_index, targets, with_entropy: bool):
        """(logprob, entropy), each (n,) float32 nats, detached."""
        picked = self.picked_hidden(input_ids, attention_mask, hidden_index)
        return token_stats(self.model, picked, targets, chunk_rows=self.chunk_rows, with_entropy=with_entropy)

    def forward(self, input_ids, attention_mask, hidden_index, targets, weight=None, weight_fn=None, with_entropy: bool = False):
        """(loss_sum, logprob, clipped, weight). Pass the (n,) weights, or weight_fn(logprob, entropy) → weights
        when they depend on the student (one extra no-grad pass of the output layer)."""
        picked = self.picked_hidden(input_ids, attention_mask, hidden_index)
        if weight is None:
            with torch.no_grad():
                logprob, entropy = token_stats(self.model, picked.detach(), targets, chunk_rows=self.chunk_rows, with_entropy=with_entropy)
            weight = weight_fn(logprob, entropy)
        loss, logprob, clipped = fused_weighted_head(
            self.model.get_output_embeddings(), picked, targets, weight, neg_loss=self.neg_loss, clip_nats=self.clip_nats, chunk_rows=self.chunk_rows
        )
        return loss, logprob, clipped, weight


@dataclass(frozen=True)
class StepSettings:
    priority: Priority
    normalize: str  # tokens | selected | abs_weight | per_sign
    neg_ramp_steps: int
    prepass: bool  # Φ needs the student before the gradient pass (global rho1, or per_sign with online Φ)
    with_entropy: bool  # the spec reads student_entropy
    label_names: list[str]
    device: torch.device


def on_device(mb: MicroBatch, positions: torch.Tensor, device: torch.device) -> tuple:
    """(input_ids, attention_mask, hidden_index, targets) of the chosen flat positions, on `device`."""
    return mb.input_ids.to(device), mb.attention_mask.to(device), mb.hidden_index[positions].to(device), mb.targets[positions].to(device)


def with_student(mb: MicroBatch, positions: torch.Tensor, logprob: torch.Tensor, entropy: torch.Tensor) -> dict:
    """mb.tokens plus detached "student_logprob"/"student_entropy" (N,) float32, filled at `positions`."""
    tokens = dict(mb.tokens)
    n = mb.targets.numel()
    tokens["student_logprob"] = torch.zeros(n).index_put_((positions,), logprob.detach().float().cpu())
    tokens["student_entropy"] = torch.zeros(n).index_put_((positions,), entropy.detach().float().cpu())
    return tokens


def targets_or_first(mask: torch.Tensor) -> torch.Tensor:
    """Positions of `mask`, or position 0 (weight 0) when there is none, so every parameter gets a gradient (DDP)."""
    positions = mask.nonzero().squeeze(1)
    return positions if positions.numel() else torch.zeros(1, dtype=torch.int64)


def global_priority(core: StudentLoss, mbs: list[MicroBatch], settings: StepSettings, step: int, ctx: Dist) -> list[torch.Tensor]:
    """Φ of this rank's micro-batches, evaluated on the whole global batch (all micro-batches of all ranks).

    A no-grad forward gives the student's statistics; the tokens of every rank are gathered and concatenated
    in global micro-batch order j (then position), which is the top-k tie-break order, so exactly ⌈k·N⌉
    candidates of the global batch are selected whatever the split into ranks and accumulation steps.
    """
    local = []
    for mb in mbs:
        positions = mb.tokens["loss_mask"].nonzero().squeeze(1)
        logprob, entropy = core.statistics(*on_device(mb, positions, settings.device), settings.with_entropy)
        local.append(with_student(mb, positions, logprob, entropy))
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


def accumulate_step(student, core: StudentLoss, mbs: list[MicroBatch], settings: StepSettings, step: int, ctx: Dist) -> dict:
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

    def weights(raw: torch.Tensor) -> torch.Tensor:
        weight = ramp_negative(raw, step, settings.neg_ramp_steps)
        return (sign_weights(weight, counts) if settings.normalize == "per_sign" else weight).to(settings.device)

    # ---- gradient pass: one backward per micro-batch, gradients synchronised on the last one only
    sums = torch.zeros(7, dtype=torch.float64)
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        sync = student.no_sync() if (student is not core and not last) else contextlib.nullcontext()
        with sync:
            if phis is not None:
                positions = targets_or_first(phis[i] != 0)
                raw = phis[i][positions]
                loss, logprob, clipped, _ = student(*on_device(mb, positions, settings.device), weight=weights(raw))
            else:
                positions = targets_or_first(mb.tokens["loss_mask"])
                found = {}

                def online_weights(logprob, entropy, mb=mb, positions=positions, found=found):
                    phi = evaluate_priority(settings.priority, with_student(mb, positions, logprob, entropy), step=step, label_names=settings.label_names)
                    found["counts"], found["raw"] = normalizer_counts(phi, mb.tokens["loss_mask"]), phi[positions]
                    return weights(found["raw"])

                loss, logprob, clipped, _ = student(*on_device(mb, positions, settings.device), weight_fn=online_weights, with_entropy=settings.with_entropy)
                counts += found["counts"]
                raw = found["raw"]
            loss.backward()
        nll = -logprob.detach().double().cpu()
        positive, negative = raw > 0, raw < 0
        sums += torch.tensor([
            loss.item(), nll[positive].sum().item(), positive.sum().item(),
            nll[negative].sum().item(), negative.sum().item(), clipped.sum().item(), mb.targets.numel(),
        ], dtype=torch.float64)
    if phis is None:
        counts = all_reduce_sum(counts.to(settings.device), ctx).cpu()
    sums = all_reduce_sum(sums.to(settings.device), ctx).cpu()
    return {"counts": counts, "sums": sums}
