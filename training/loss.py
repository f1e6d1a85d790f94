"""The weighted token loss L = Σ_t Φ_t·ℓ_t / Z and its normalisers (docs/design.md "Loss, normalisation and the output head").

Each micro-batch contributes the unnormalised Σ_t w_t·f(ℓ_t) with w = Φ detached; the trainer divides the
summed gradients by the global Z once per optimizer step. f is the identity for Φ > 0; for Φ < 0 (gradient
ascent, unlearning) it is chosen by `neg_loss`:

    clip          Φ·ℓ while ℓ < c nats, else 0 (c defaults to ln V, the NLL of a uniform guess)
    unlikelihood  |Φ|·(−log(1 − p)), p = exp(−ℓ) capped at 1 − 1e-6 (Welleck et al. 2019, arXiv 1908.04319)
    none          Φ·ℓ, unbounded ascent

Normalisers Z over the trainable tokens of the global batch (all micro-batches, all ranks), from Φ before
any negative ramp:

    tokens      number of loss_mask tokens (TRL's num_items_in_batch)
    selected    number of tokens with Φ ≠ 0 (Rho-1, Token Cleaning)
    abs_weight  Σ|Φ|
    per_sign    positive part / N₊ + negative part / N₋ (Forgetting, arXiv 2508.04329), Z = 1
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch

NEG_LOSSES = ("clip", "unlikelihood", "none")
NORMALIZERS = ("tokens", "selected", "abs_weight", "per_sign")
UNLIKELIHOOD_MAX_P = 1.0 - 1e-6


@dataclass(frozen=True)
class TokenCounts:
    """Counts over the trainable tokens of a batch, from Φ before any ramp; they add over micro-batches and ranks."""

    tokens: float  # loss_mask tokens: Z of `tokens`
    selected: float  # tokens with Φ ≠ 0: Z of `selected`
    abs_weight: float  # Σ|Φ|: Z of `abs_weight`
    positive: float  # tokens with Φ > 0
    negative: float  # tokens with Φ < 0

    @classmethod
    def of(cls, phi_targets: torch.Tensor) -> TokenCounts:
        """Counts of Φ over every loss_mask token of a batch (Φ is 0 elsewhere)."""
        phi = phi_targets.double()
        return cls(float(phi.numel()), float((phi != 0).sum()), float(phi.abs().sum()), float((phi > 0).sum()), float((phi < 0).sum()))

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def to_tensor(self) -> torch.Tensor:
        """(5,) float64, for summing over ranks (float64 counts stay exact)."""
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> TokenCounts:
        return cls(*values.tolist())


ZERO_COUNTS = TokenCounts(0.0, 0.0, 0.0, 0.0, 0.0)


def normalizer(counts: TokenCounts, normalize: str) -> float:
    """Z from the global counts; 1 for per_sign (its counts are folded into the weights, see sign_weights)."""
    if normalize == "per_sign":
        return 1.0 if counts.positive + counts.negative > 0 else 0.0
    return getattr(counts, normalize)


def ramp_negative(phi: torch.Tensor, step: int, ramp_steps: int) -> torch.Tensor:
    """Scale negative Φ by min(1, step / ramp_steps) (positive Φ untouched); the identity when ramp_steps = 0."""
    if ramp_steps <= 0:
        return phi
    scale = min(1.0, step / ramp_steps)
    return torch.where(phi < 0, phi * scale, phi)


def sign_weights(phi: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
    """per_sign: Φ/N₊ on positive tokens and Φ/N₋ on negative ones (global counts)."""
    positive, negative = max(counts.positive, 1.0), max(counts.negative, 1.0)
    return torch.where(phi > 0, phi / positive, phi / negative)


def token_terms(logprob: torch.Tensor, weight: torch.Tensor, *, neg_loss: str, clip_nats: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss terms t = w·f(ℓ), their slopes ∂t/∂log p, and which negative tokens were clipped.

    logprob: (n,) float32 log p_student(x_t); weight: (n,) float32 (Φ after ramp and per-sign division).
    Returns (terms, slopes, clipped): (n,) float32, (n,) float32, (n,) bool; all finite for every input.
    Positive w: t = w·ℓ, slope −w. Negative w:
      clip          t = w·ℓ and slope −w while ℓ < c; t = 0 and slope 0 from c on
      unlikelihood  t = |w|·(−log(1 − p)), slope |w|·p/(1 − p) for p < 1 − 1e-6 (p capped there, slope 0)
      none          t = w·ℓ, slope −w
    """
    nll = -logprob
    negative = weight < 0
    plain_terms, plain_slopes = weight * nll, -weight
    if neg_loss == "clip":
        clipped = negative & (nll >= clip_nats)
        neg_terms, neg_slopes = plain_terms * ~clipped, plain_slopes * ~clipped
    elif neg_loss == "unlikelihood":
        clipped = torch.zeros_like(negative)
        capped = logprob.clamp(max=math.log(UNLIKELIHOOD_MAX_P))
        p = capped.exp()
        neg_terms = weight.abs() * -torch.log(-torch.expm1(capped))  # −log(1 − p), stable near p = 1
        neg_slopes = weight.abs() * p / -torch.expm1(capped) * (logprob < math.log(UNLIKELIHOOD_MAX_P))
    else:
        clipped = torch.zeros_like(negative)
        neg_terms, neg_slopes = plain_terms, plain_slopes
    terms = torch.where(negative, neg_terms, plain_terms)
    slopes = torch.where(negative, neg_slopes, plain_slopes)
    return terms, slopes, clipped
