"""One optimizer step's gradient: Φ for every micro-batch, then Σ w·f(ℓ) backpropagated per micro-batch.

After `accumulate_step` returns, the parameters' .grad hold Σ over the global batch of w·∇f(ℓ) (averaged over
ranks by DDP) and the caller scales them by W / Z (loss.normalizer) before clipping; the returned
`StepResult` names the step's sums and counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from scoring.priority import Priority, evaluate_priority
from scoring.stats import final_hidden, token_stats
from training.data import MicroBatch
from training.distributed import Dist, all_gather_flat, all_reduce_sum
from training.head import fused_weighted_head
from training.loss import ZERO_COUNTS, TokenCounts, TokenLoss, loss_weights


@dataclass(frozen=True)
class HeadOutput:
    """What the student's forward pass returns for the chosen positions."""

    loss_sum: torch.Tensor  # scalar Σ w·f(ℓ), differentiable
    logprob: torch.Tensor  # (n,) float32 log p_student, detached
    clipped: torch.Tensor  # (n,) bool: negative tokens past the clip
    phi: torch.Tensor  # (n,) float32 Φ before ramp and per-sign division (given, or computed from the student)


class StudentLoss(nn.Module):
    """The student as DDP sees it: padded ids → the weighted loss Σ w·f(ℓ) at chosen positions only.

    The transformer runs under autocast when `autocast_dtype` is set; the output layer always runs in
    float32 chunks, so no (B, T, V) logits exist: `statistics` uses scoring.stats.token_stats (no grad), the
    gradient pass training.head.fused_weighted_head (gradients made in the forward pass).
    """

    def __init__(self, model: nn.Module, chunk_rows: int, autocast_dtype: torch.dtype | None, loss: TokenLoss):
        super().__init__()
        self.model, self.chunk_rows, self.autocast_dtype = model, chunk_rows, autocast_dtype
        self.loss = loss

    def picked_hidden(self, input_ids, attention_mask, position_ids, hidden_index) -> torch.Tensor:
        """(n, D) final hidden states that predict the chosen positions (packed rows: mask None, position ids per row)."""
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            hidden = final_hidden(self.model, input_ids, attention_mask, position_ids)  # (B, T, D)
        return hidden.flatten(0, 1)[hidden_index]

    @torch.no_grad()
    def statistics(self, input_ids, attention_mask, position_ids, hidden_index, targets, with_entropy: bool):
        """(logprob, entropy), each (n,) float32 nats, detached."""
        picked = self.picked_hidden(input_ids, attention_mask, position_ids, hidden_index)
        return token_stats(self.model, picked, targets, chunk_rows=self.chunk_rows, with_entropy=with_entropy)

    def forward(self, input_ids, attention_mask, position_ids, hidden_index, targets, *, loss_weights: Callable, phi=None, phi_fn=None,
                with_entropy: bool = False, ref_logprob=None) -> HeadOutput:
        """The weighted loss at the chosen positions. Φ is given (`phi`, (n,)), or `phi_fn(logprob, entropy)` computes it
        from the student (one extra no-grad pass of the output layer, inside this forward so DDP sees one pass);
        `loss_weights(phi)` turns Φ into the loss weights (negative ramp, per-sign division, anchor coefficients);
        `ref_logprob` (n,) is the stored reference log-prob the bounded losses and the anchor compare with."""
        picked = self.picked_hidden(input_ids, attention_mask, position_ids, hidden_index)
        if phi is None:
            with torch.no_grad():
                logprob, entropy = token_stats(self.model, picked.detach(), targets, chunk_rows=self.chunk_rows, with_entropy=with_entropy)
            phi = phi_fn(logprob, entropy)
        loss, logprob, clipped = fused_weighted_head(
            self.model.get_output_embeddings(), picked, targets, loss_weights(phi), loss=self.loss, chunk_rows=self.chunk_rows,
            ref_logprob=ref_logprob,
        )
        return HeadOutput(loss_sum=loss, logprob=logprob, clipped=clipped, phi=phi)


@dataclass(frozen=True)
class StepSettings:
    priority: Priority
    normalize: str  # tokens | selected | abs_weight | per_sign
    neg_ramp_steps: int
    prepass: bool  # online Φ needs the whole step before the gradient pass (global rho1, or per_sign)
    with_entropy: bool  # the spec reads the student's entropy
    label_names: list[str]
    device: torch.device
    ref_column: str | None = None  # "<neg_ref>_logprob" when the loss compares with a stored reference (TokenLoss.needs_ref)


def needs_prepass(priority: Priority, normalize: str) -> bool:
    """Online Φ of a micro-batch depends on the whole step when rho1 selects over the global batch, or when
    per_sign needs the step's counts of each sign before the first backward: then a no-grad pre-pass runs."""
    return priority.online and (priority.global_online_selection or normalize == "per_sign")


def on_device(mb: MicroBatch, positions: torch.Tensor, device: torch.device) -> tuple:
    """(input_ids, attention_mask, position_ids, hidden_index, targets) of the chosen flat positions, on `device`
    (attention_mask is None for packed micro-batches, position_ids None for padded ones)."""
    mask, position_ids = (None if t is None else t.to(device) for t in (mb.attention_mask, mb.position_ids))
    return mb.input_ids.to(device), mask, position_ids, mb.hidden_index[positions].to(device), mb.targets[positions].to(device)


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
    shape = torch.tensor([[mb.index, mb.targets.numel(), mb.rows] for mb in mbs], dtype=torch.int64)
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


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's sums over the global batch (all micro-batches, all ranks), float64."""

    counts: TokenCounts  # normaliser counts from Φ before any ramp
    loss_sum: float  # Σ w·f(ℓ) backpropagated; the loss is loss_sum / Z
    nll_positive_sum: float  # Σ ℓ over tokens with Φ > 0 (counts.positive of them)
    nll_negative_sum: float  # Σ ℓ over tokens with Φ < 0 (counts.negative of them)
    clipped_tokens: float  # negative tokens past the clip (neg_loss=clip)
    input_tokens: float  # real (unpadded) tokens


def accumulate_step(student, core: StudentLoss, mbs: list[MicroBatch], settings: StepSettings, step: int, ctx: Dist) -> StepResult:
    """Backpropagate Σ w·f(ℓ) for each of this rank's micro-batches of one optimizer step.

    `student` is `core` or its DDP wrapper. After it returns, the parameters' .grad hold Σ w·∇f(ℓ) over the
    global batch (averaged over ranks by DDP) and the caller scales them by W / Z.
    """
    # ---- Φ before the gradient pass, when it does not need the student or a pre-pass provides it
    phis = None
    if not settings.priority.online:
        phis = [evaluate_priority(settings.priority, mb.tokens, step=step, label_names=settings.label_names) for mb in mbs]
    elif settings.prepass:
        phis = global_priority(core, mbs, settings, step, ctx)
    counts = ZERO_COUNTS
    if phis is not None:
        local = sum((TokenCounts.of(phi[mb.tokens["loss_mask"]]) for phi, mb in zip(phis, mbs)), ZERO_COUNTS)
        counts = TokenCounts.from_tensor(all_reduce_sum(local.to_tensor().to(settings.device), ctx).cpu())

    def weights_of(phi: torch.Tensor):
        return loss_weights(phi, step=step, ramp_steps=settings.neg_ramp_steps, counts=counts, normalize=settings.normalize,
                            anchor_kl=core.loss.anchor_kl).to(settings.device)

    def ref_at(mb: MicroBatch, positions: torch.Tensor):
        return None if settings.ref_column is None else mb.tokens[settings.ref_column][positions].to(settings.device)

    # ---- gradient pass: one backward per micro-batch, gradients synchronised on the last one only
    local_counts, sums = ZERO_COUNTS, torch.zeros(5, dtype=torch.float64)  # sums: loss, nll+, nll-, clipped, input tokens
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        sync = student.no_sync() if (student is not core and not last) else contextlib.nullcontext()
        with sync:
            if phis is not None:
                positions = targets_or_first(phis[i] != 0)
                out = student(*on_device(mb, positions, settings.device), loss_weights=weights_of, phi=phis[i][positions],
                              ref_logprob=ref_at(mb, positions))
            else:  # Φ from the student inside the forward; only loss_mask positions can be nonzero
                positions = targets_or_first(mb.tokens["loss_mask"])

                def phi_fn(logprob, entropy, mb=mb, positions=positions):
                    tokens = with_student(mb, positions, logprob, entropy)
                    return evaluate_priority(settings.priority, tokens, step=step, label_names=settings.label_names)[positions]

                out = student(*on_device(mb, positions, settings.device), loss_weights=weights_of, phi_fn=phi_fn, with_entropy=settings.with_entropy,
                              ref_logprob=ref_at(mb, positions))
                local_counts = local_counts + TokenCounts.of(out.phi[mb.tokens["loss_mask"][positions]])
            out.loss_sum.backward()
        nll, phi = -out.logprob.detach().double().cpu(), out.phi.cpu()
        sums += torch.tensor([out.loss_sum.item(), nll[phi > 0].sum().item(), nll[phi < 0].sum().item(), out.clipped.sum().item(),
                              mb.targets.numel()], dtype=torch.float64)
    if phis is None:
        counts = TokenCounts.from_tensor(all_reduce_sum(local_counts.to_tensor().to(settings.device), ctx).cpu())
    loss_sum, nll_positive, nll_negative, clipped, input_tokens = all_reduce_sum(sums.to(settings.device), ctx).cpu().tolist()
    return StepResult(counts=counts, loss_sum=loss_sum, nll_positive_sum=nll_positive, nll_negative_sum=nll_negative,
                      clipped_tokens=clipped, input_tokens=input_tokens)
