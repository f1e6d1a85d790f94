"""Per-token statistics from final hidden states, in chunks: the one function the scorer and the trainer share.

    logprob_t = log softmax(W h_{t-1} + b)[x_t]          (nats)
    entropy_t = -Σ_v p_v log p_v,  p = softmax(W h_{t-1} + b)   (nats)

The output layer runs in float32 whatever the model dtype, over at most `chunk_rows` rows at a time, so
memory never holds a float32 (rows, vocab) logits tensor larger than the caller's budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_LOGITS_BUDGET_BYTES = 256 * 2**20  # float32 logits held at once per chunk


def chunk_rows_for_budget(vocab_size: int, budget_bytes: int) -> int:
    """Rows per chunk so that one float32 (rows, vocab) logits tensor fits in `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab_size))


def _head_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, with_entropy: bool):
    logits = F.linear(hidden.float(), weight, bias)  # (n, V) float32
    logp = torch.log_softmax(logits, dim=-1)
    target_logprob = logp.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    if not with_entropy:
        return target_logprob, torch.zeros_like(target_logprob)
    entropy = -(logp.exp() * logp).sum(-1)  # (n,)
    return target_logprob, entropy


def token_stats(
    model,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and entropy of each predictive distribution, from final hidden states.

    hidden:  (N, D) final hidden states (after the final norm); row i predicts targets[i].
    targets: (N,) int64 token ids.
    Returns (logprob, entropy), each (N,) float32 nats. Equals, up to float32 rounding,
    `log_softmax(model.lm_head(hidden).float())[i, targets[i]]` and the entropy of that row.

    With grad enabled, each chunk is recomputed in backward (activation checkpointing), so the
    logits of all chunks are never kept at once; entropy is always returned detached.
    """
    head = model.get_output_embeddings()
    weight = head.weight.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    track_grad = torch.is_grad_enabled() and hidden.requires_grad
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if track_grad:
            lp, ent = checkpoint(_head_stats, h, weight, bias, t, with_entropy, use_reentrant=False)
        else:
            lp, ent = _head_stats(h, weight, bias, t, with_entropy)
        logprobs.append(lp)
        entropies.append(ent.detach())
    if not logprobs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) final hidden states (after the final norm) without computing the (B, T, V) logits.

    Packed sequences pass attention_mask=None and position ids that restart at 0 for each row: transformers
    then builds a block-diagonal causal mask from the position ids (masking_utils.find_packed_sequence_indices),
    which it skips whenever a cache or a 2-D attention mask is given, hence use_cache=False.
    """
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def check_head_matches_logits(model, device: torch.device, tolerance: float = 1e-4) -> None:
    """Refuse a model whose logits are not `lm_head(final hidden)` (soft-capping, scaled logits, ...).

    Runs 16 random tokens through `model(...).logits` and through `token_stats` and compares the
    log-probs; raises ValueError when they differ by more than `tolerance` nats.
    """
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab_size, (1, 16), generator=generator).to(device)
    mask = torch.ones_like(ids)
    reference = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[0, :-1]
    reference = reference.gather(-1, ids[0, 1:, None]).squeeze(-1)
    hidden = final_hidden(model, ids, mask)[0, :-1]
    ours, _ = token_stats(model, hidden, ids[0, 1:], chunk_rows=16, with_entropy=False)
    gap = (ours - reference).abs().max().item()
    if gap > tolerance:
        raise ValueError(
            f"{type(model).__name__}: log-probs from lm_head(final hidden) differ from model(...).logits by "
            f"{gap:.2e} nats (> {tolerance}); the model transforms its logits (soft-capping or scaling), "
            "which tokenprio's chunked output layer does not reproduce. Use another model."
        )
