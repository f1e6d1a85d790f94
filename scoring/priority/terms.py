"""The per-term math of Φ: one plain function per term, each with its formula, defaults and source.

Every function takes the flat token columns (`tokens`: 1-D tensors over N positions, see
`evaluate_priority`) and the term's keyword arguments (`args`, every default filled in by the grammar)
and returns a (N,) float32 tensor. Only positions in `cand` (selection terms that rank: topk, rho1) or on the loss
mask count; `scoring.priority.evaluate` zeroes the rest. NLL = −logprob in nats.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def _nll(tokens: dict, prefix: str) -> torch.Tensor:
    return -tokens[f"{prefix}_logprob"]  # (N,) float32 nats


def excess(tokens: dict, args: dict) -> torch.Tensor:
    """Token Cleaning / Forgetting score s_t = NLL_base − NLL_ref = ref_logprob − base_logprob (nats)."""
    if args.get("score", "excess") == "nll":
        return _nll(tokens, args["ref"])
    return tokens[f"{args['ref']}_logprob"] - tokens[f"{args['base']}_logprob"]


def ceil_fraction(fraction: float, counts: torch.Tensor) -> torch.Tensor:
    """⌈fraction · counts⌉ exactly (int64): the float product 0.55 · 100 is 55.00000000000001.

    In Python integers, once per distinct count: k = 1.0000000000000003e-09 is 10000000000000003 / 10^25,
    whose product with a count overflows int64.
    """
    ratio = Fraction(repr(fraction))
    distinct, inverse = torch.unique(counts, return_inverse=True)
    ceils = [-(-int(count) * ratio.numerator // ratio.denominator) for count in distinct.tolist()]
    return torch.tensor(ceils, dtype=torch.int64, device=counts.device)[inverse]


def _select_top(score: torch.Tensor, cand: torch.Tensor, fraction: float, group: torch.Tensor | None = None) -> torch.Tensor:
    """1 for exactly ⌈fraction · n_g⌉ candidates with the highest score in each group g (one group if None).

    Ties go to the earlier position (stable sort). Returns a (N,) bool tensor, False off the candidates.
    """
    positions = cand.nonzero().squeeze(1)  # (n,) ascending
    positions = positions[torch.sort(score[positions], descending=True, stable=True).indices]
    if group is None:
        groups = torch.zeros_like(positions)
    else:
        groups = group[positions]
        order = torch.sort(groups, stable=True).indices
        positions, groups = positions[order], groups[order]
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(positions), device=score.device) - torch.repeat_interleave(starts, counts)
    keep = rank < torch.repeat_interleave(ceil_fraction(fraction, counts), counts)
    selected = torch.zeros_like(cand)
    selected[positions[keep]] = True
    return selected


def term_highpass(tokens: dict, args: dict) -> torch.Tensor:
    """Loss high-pass filter, Φ = 1[NLL_source > min_nll] (Token Priority, arXiv 2602.01227, first experiment).

    Defaults min_nll=0.3 nats, source=ref.
    """
    return (_nll(tokens, args["source"]) > args["min_nll"]).float()


def term_topk(tokens: dict, args: dict, cand: torch.Tensor) -> torch.Tensor:
    """Token Cleaning (Pang et al., arXiv 2502.01968): keep the top k of s = NLL_base − NLL_ref, Φ ∈ {0, 1}.

    scope=global: Φ = 1[s ≥ threshold], the threshold resolved over the corpus by `resolve_global` so that
    ⌈k·n⌉ candidates are kept (the paper's default: k=0.6, global). scope=sequence: exactly ⌈k·n_i⌉ of
    the n_i candidates of each row (the paper's "sample" mode). score=nll ranks NLL_ref instead of s.
    """
    score = excess(tokens, args)
    if args["scope"] == "sequence":
        return _select_top(score, cand, args["k"], tokens["seq_index"]).float()
    return (score >= args["threshold"]).float()


def _entropy_weight(entropy: torch.Tensor, args: dict) -> torch.Tensor:
    """u = min(H / max_nats, 1); up: u^α (EAFT, arXiv 2601.02151: (H/3)^α); down: (1 − u)^α.

    max_nats replaces ln V, which the columns do not know; the default 3.0 is EAFT's constant (≈ ln 20
    for its top-20 entropy). Full-vocabulary entropy above max_nats counts as maximal (u = 1).
    """
    u = (entropy / args["max_nats"]).clamp(0.0, 1.0)
    return u ** args["alpha"] if args["direction"] == "up" else (1.0 - u) ** args["alpha"]


def term_entropy(tokens: dict, args: dict) -> torch.Tensor:
    """Entropy weighting from stored entropy: `_entropy_weight` of H_source (defaults alpha=1, up, 3.0 nats, ref)."""
    return _entropy_weight(tokens[f"{args['source']}_entropy"], args)


def term_importance(tokens: dict, args: dict) -> torch.Tensor:
    """Importance ratio Φ = clip(p_ref / p_base, min, max) = clip(exp(ref_logprob − base_logprob)).

    The token-level form of iw-SFT (Qin & Springenberg, arXiv 2507.12856), defaults min=0, max=2.
    """
    ratio = torch.exp(tokens[f"{args['ref']}_logprob"] - tokens[f"{args['base']}_logprob"])
    return ratio.clamp(args["min"], args["max"])


def term_labels(tokens: dict, args: dict, label_names: list[str]) -> torch.Tensor:
    """External span labels: Φ = value of the token's label; unlabelled tokens and unnamed labels get 1."""
    codes = tokens["label"]  # (N,) int64, -1 = no label
    table = torch.ones(len(label_names) + 1, dtype=torch.float32, device=codes.device)  # last slot: code -1
    for index, name in enumerate(label_names):
        if name in args:
            table[index] = args[name]
    return table[codes]


def term_forgetting(tokens: dict, args: dict) -> torch.Tensor:
    """Forgetting split (Taheri Ghahrizjani et al., arXiv 2508.04329): Φ = +1 if s ≥ threshold else −1.

    s = NLL_base − NLL_ref; the threshold, resolved over the corpus, puts the top ρ (default 0.7) of the
    candidates at +1. The paper's λ(step) ramp on the negative part is `ramp(...)`.
    """
    return torch.where(excess(tokens, args) >= args["threshold"], 1.0, -1.0)


def term_prift(tokens: dict, args: dict) -> torch.Tensor:
    """PriFT's frozen-reference probability weight (arXiv 2606.09396): Φ = p_source(x_t)^α = exp(α · source_logprob).

    Φ ∈ (0, 1]: tokens the frozen reference finds likely weigh most, unlikely ones (often noise) fade
    smoothly. Defaults alpha=1, source=ref; α → 0 approaches uniform, large α approaches a hard selection.
    """
    return torch.exp(args["alpha"] * tokens[f"{args['source']}_logprob"])


def term_cleaning(tokens: dict, args: dict) -> torch.Tensor:
    """Token Cleaning with a margin instead of a share (after Pang et al., arXiv 2502.01968): Φ = 1[s ≥ −δ].

    s = NLL_base − NLL_ref (nats). A token is dropped only when the base model predicts it more than δ
    nats better than the reference (default δ = 0.1), however many tokens that is; `topk` always drops
    the fraction 1 − k. The same as topk(threshold=−δ), but with no k to pick and nothing to resolve.
    """
    return (excess(tokens, args) >= -args["delta"]).float()


def term_rho1(tokens: dict, args: dict, cand: torch.Tensor) -> torch.Tensor:
    """Rho-1 selective LM (Lin et al., arXiv 2404.07965): excess = NLL_student − NLL_ref; Φ = 1 for exactly
    ⌈k·N⌉ of the N candidates passed in with the largest excess (ties: earlier position). Default k=0.6.
    """
    excess = -tokens["student_logprob"] + tokens[f"{args['ref']}_logprob"]
    return _select_top(excess, cand, args["k"]).float()


def term_dft(tokens: dict, args: dict) -> torch.Tensor:
    """DFT (Wu et al., arXiv 2508.05629): Φ = sg(p_student) = exp(student_logprob)."""
    return torch.exp(tokens["student_logprob"])


def term_student_entropy(tokens: dict, args: dict) -> torch.Tensor:
    """Entropy weighting from the student's own entropy: `_entropy_weight` of H_student (EAFT's online form)."""
    return _entropy_weight(tokens["student_entropy"], args)
