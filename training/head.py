"""The output layer and the weighted loss fused, in float32 chunks: gradients computed in the forward pass.

For token i with hidden state h_i (after the final norm), logits z_i = W h_i + b (float32), target y_i and
per-token term t_i = f(log p_i[y_i]) (training.loss.token_terms), the gradient of Σ_i t_i is

    ∂Σt/∂z_i = s_i · (e_{y_i} − p_i)        s_i = ∂t_i/∂log p_i[y_i],  p_i = softmax(z_i)
    ∂Σt/∂h_i = Wᵀ ∂Σt/∂z_i        ∂Σt/∂W = Σ_i ∂Σt/∂z_i h_iᵀ        ∂Σt/∂b = Σ_i ∂Σt/∂z_i

Φ is detached, so s_i is known as soon as a chunk's log-probs are: each chunk's (rows, V) logits are made,
turned into these gradients and freed. Backward then only scales the stored gradients (rows × D for h, the
head's own size for W), so the head costs three matmuls (logits, ∂h, ∂W) instead of four with activation
checkpointing (scoring.stats.token_stats recomputes the logits in backward) and never holds more than one
chunk of logits. A head whose weight does not require grad (frozen under LoRA) skips ∂W: two matmuls. The same log-softmax in float32 as token_stats; tests compare both with float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.loss import LossWeights, TokenLoss, token_terms


class _FusedWeightedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, phi, ref_logprob, anchor, loss, chunk_rows):
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)  # (n, D)
        # A frozen head (LoRA) needs no weight gradient: skip its (V, D) buffer and one matmul of three.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None  # (V, D)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        head_weight = weight.float()
        head_bias = bias.float() if bias is not None else None
        logprobs, terms, clipped = [], [], []
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].float()  # (c, D)
            y = targets[start : start + chunk_rows]
            logits = F.linear(h, head_weight, head_bias)  # (c, V) float32
            # log-softmax in place: logsumexp would allocate a second (c, V) buffer for exp(z − max), as large as
            # the logits chunk itself; here the logits buffer becomes exp(z − max) and then the gradient.
            max_logit = logits.amax(-1)  # (c,)
            target_logit = logits.gather(-1, y[:, None]).squeeze(-1)  # (c,)
            sum_exp = logits.sub_(max_logit[:, None]).exp_().sum(-1)  # (c,) Σ exp(z − max)
            logprob = target_logit - max_logit - sum_exp.log()  # (c,) nats
            rows = slice(start, start + chunk_rows)
            term, slope, chunk_clipped = token_terms(logprob, phi[rows], loss, None if ref_logprob is None else ref_logprob[rows],
                                                     None if anchor is None else anchor[rows])
            # ∂t/∂z = slope · (e_y − p) with p = exp(z − max) / Σ exp(z − max), built in place in the logits buffer.
            grad_logits = logits.mul_((-slope / sum_exp)[:, None])
            grad_logits.scatter_add_(-1, y[:, None], slope[:, None])
            grad_hidden[start : start + chunk_rows] = grad_logits @ head_weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            logprobs.append(logprob)
            terms.append(term)
            clipped.append(chunk_clipped)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        logprob, term, clipped = torch.cat(logprobs), torch.cat(terms), torch.cat(clipped)
        ctx.mark_non_differentiable(logprob, clipped)
        return term.sum(), logprob, clipped

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprob, _grad_clipped):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            (grad_hidden * grad_loss).to(ctx.hidden_dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None,
            (grad_bias * grad_loss) if grad_bias is not None else None,
            None, None, None, None, None, None, None,
        )


def fused_weighted_head(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: LossWeights, *, loss: TokenLoss, chunk_rows: int,
    ref_logprob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_i t_i (scalar, differentiable in hidden and the head) with per-token terms from training.loss.token_terms.

    hidden: (n, D) final hidden states; targets: (n,) int64; weights: detached (n,) float32 w (Φ after ramp and
    per-sign division) and anchor coefficients; ref_logprob: (n,) float32 stored reference log-probs when
    loss.needs_ref. Returns (loss_sum, logprob (n,) float32 detached, clipped (n,) bool).
    """
    bias = head.bias  # None for a bias-free head
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + head.weight.sum() * 0.0  # keeps the head in the graph (DDP)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return zero, empty, empty.bool()
    ref = None if ref_logprob is None else ref_logprob.float()
    anchor = None if weights.anchor is None else weights.anchor.float()
    return _FusedWeightedHead.apply(hidden, head.weight, bias, targets, weights.weight.float(), ref, anchor, loss, chunk_rows)
