"""The weighted token loss L = Σ_t Φ_t·ℓ_t / Z and its normalisers (docs/design.md "Loss, normalisation and the output head").

Each micro-batch contributes the unnormalised Σ_t w_t·f(ℓ_t) with w = Φ detached; the trainer divides the
summed gradients by the global Z once per optimizer step. f is the identity for Φ > 0; for Φ < 0 (gradient
ascent, unlearning) it is chosen by `neg_loss`, with lp = log p_student and lp_ref the stored log-prob of
the `--neg-ref` model (typically the student's own starting checkpoint scored as a second model):

    clip          Φ·ℓ while ℓ < c nats, else 0 (c defaults to ln V, the NLL of a uniform guess)
    unlikelihood  |Φ|·(−log(1 − p)), p = exp(−ℓ) capped at 1 − 1e-6 (Welleck et al. 2019, arXiv 1908.04319)
    none          Φ·ℓ, unbounded ascent
    npo           |Φ|·(2/β)·softplus(β·(lp − lp_ref)): token-level NPO (Zhang et al. 2024, arXiv 2404.05868,
                  per token as in targeted forgetting, arXiv 2506.03142); slope 2|Φ|σ(β(lp − lp_ref)) ∈ (0, 2|Φ|)
                  fades once the token is less likely than under the reference
    refclip       Φ·ℓ while ℓ < ℓ_ref + δ, else 0: ascent only until the token is δ nats less likely than under the reference

An optional anchor (ASFT, Zhu et al. 2025, arXiv 2509.23753) adds a_t·k3_t on Φ > 0 tokens, with
k3 = e^u − u − 1, u = lp_ref − lp (≥ 0, 0 iff lp = lp_ref), a_t = α (α/N₊ under per_sign).

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

NEG_LOSSES = ("clip", "unlikelihood", "none", "npo", "refclip")
REF_NEG_LOSSES = ("npo", "refclip")  # compare with the stored log-prob of the --neg-ref model
NORMALIZERS = ("tokens", "selected", "abs_weight", "per_sign")
UNLIKELIHOOD_MAX_P = 1.0 - 1e-6
ANCHOR_MAX_NATS = 20.0  # k3 continues linearly beyond u = lp_ref − lp > 20 nats, so terms and slopes stay finite in float32


@dataclass(frozen=True)
class TokenLoss:
    """The shape f of each token's term: the trainer's loss options (docs/priority.md "Loss options")."""

    neg_loss: str = "clip"  # clip | unlikelihood | none | npo | refclip
    clip_nats: float = math.inf  # clip: c, nats
    npo_beta: float = 1.0  # npo: β (per token; NPO's 0.1 was for log-ratios summed over a sequence)
    refclip_nats: float = 3.0  # refclip: δ, nats over the reference's NLL
    anchor_kl: float = 0.0  # ASFT: α of the k3 anchor on Φ > 0 tokens; 0 = off

    @property
    def needs_ref(self) -> bool:
        """Whether the terms read the stored reference log-prob at the chosen positions."""
        return self.neg_loss in REF_NEG_LOSSES or self.anchor_kl > 0

    @property
    def ref_options(self) -> str:
        """The options that read the reference log-prob, as the command line spells them (for messages)."""
        return " and ".join(([f"--neg-loss {self.neg_loss}"] if self.neg_loss in REF_NEG_LOSSES else [])
                            + ([f"--anchor-kl {self.anchor_kl}"] if self.anchor_kl > 0 else []))

    def problems(self, neg_ref: str) -> list[str]:
        """What is wrong with these options (empty when they can run), each with its fix."""
        problems = []
        if self.neg_loss not in NEG_LOSSES:
            problems.append(f"neg_loss={self.neg_loss!r}: use one of {', '.join(NEG_LOSSES)}.")
        if not (0 < self.npo_beta < math.inf) or not (0 <= self.refclip_nats < math.inf):
            problems.append(f"npo_beta={self.npo_beta}, refclip_nats={self.refclip_nats}: need npo_beta > 0 and refclip_nats ≥ 0 nats (finite).")
        if not 0 <= self.anchor_kl < math.inf:
            problems.append(f"anchor_kl={self.anchor_kl}: must be ≥ 0 (0 = off; ASFT uses 0.05–0.1).")
        if not neg_ref.replace("_", "").isalnum():
            problems.append(f"neg_ref={neg_ref!r}: a statistics prefix such as ref or base (letters, digits, underscores).")
        return problems


@dataclass(frozen=True)
class LossWeights:
    """What the head multiplies each chosen token's term by."""

    weight: torch.Tensor  # (n,) float32 w: Φ after the negative ramp and per-sign division
    anchor: torch.Tensor | None  # (n,) float32 a ≥ 0, the anchor's coefficient (0 unless Φ > 0); None when it is off

    def to(self, device) -> LossWeights:
        return LossWeights(self.weight.to(device), None if self.anchor is None else self.anchor.to(device))


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


def loss_weights(phi: torch.Tensor, *, step: int, ramp_steps: int, counts: TokenCounts, normalize: str, anchor_kl: float) -> LossWeights:
    """w = Φ with negative Φ ramped, divided per sign under per_sign; the anchor's a = α on Φ > 0 (α/N₊ under per_sign)."""
    weight = ramp_negative(phi, step, ramp_steps)
    per_sign = normalize == "per_sign"
    weight = sign_weights(weight, counts) if per_sign else weight
    anchor = None
    if anchor_kl > 0:
        anchor = torch.where(phi > 0, anchor_kl / (max(counts.positive, 1.0) if per_sign else 1.0), 0.0).float()
    return LossWeights(weight, anchor)


def anchor_k3(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ASFT's anchor at the target token: k3 = e^u − u − 1 with u = lp_ref − lp, and ∂k3/∂lp = 1 − e^u.

    k3 ≥ 0 with equality iff lp = lp_ref; its slope pulls lp towards lp_ref from either side. For u > 20 nats
    k3 continues along its tangent at u = 20 (value and slope continuous), so nothing overflows float32.
    """
    u = ref_logprob - logprob
    capped = u.clamp(max=ANCHOR_MAX_NATS)
    e = capped.exp()
    k3 = e * (1 + (u - capped)) - u - 1  # = e^u − u − 1 for u ≤ 20
    return k3, 1 - e


def token_terms(logprob: torch.Tensor, weight: torch.Tensor, loss: TokenLoss, ref_logprob: torch.Tensor | None = None,
                anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss terms t = w·f(ℓ) (+ a·k3), their slopes ∂t/∂log p, and which negative tokens stopped (clipped).

    logprob: (n,) float32 log p_student(x_t); weight: (n,) float32 (Φ after ramp and per-sign division);
    ref_logprob: (n,) float32 stored log p_ref(x_t), needed when loss.needs_ref (NaN is read as lp_ref = lp,
    which only the weight-0 placeholder position can hold); anchor: (n,) float32 a ≥ 0 or None.
    Returns (terms, slopes, clipped): (n,) float32, (n,) float32, (n,) bool; all finite for every finite input.
    Positive w: t = w·ℓ, slope −w. Negative w:
      clip          t = w·ℓ and slope −w while ℓ < c; t = 0 and slope 0 from c on
      unlikelihood  t = |w|·(−log(1 − p)), slope |w|·p/(1 − p) for p < 1 − 1e-6 (p capped there, slope 0)
      none          t = w·ℓ, slope −w
      npo           t = |w|·(2/β)·softplus(β(lp − lp_ref)), slope 2|w|·σ(β(lp − lp_ref))
      refclip       t = w·ℓ and slope −w while ℓ < ℓ_ref + δ; t = 0 and slope 0 from there on
    Minimising t lowers lp wherever w < 0: every negative slope is ≥ 0 (gradient descent moves lp by −slope).
    """
    nll = -logprob
    negative = weight < 0
    plain_terms, plain_slopes = weight * nll, -weight
    if loss.needs_ref:
        if ref_logprob is None:
            raise ValueError(f"neg_loss={loss.neg_loss}, anchor_kl={loss.anchor_kl}: the terms need the reference log-prob at each position.")
        ref_logprob = torch.where(torch.isnan(ref_logprob), logprob, ref_logprob)
    clipped = torch.zeros_like(negative)
    if loss.neg_loss == "clip":
        clipped = negative & (nll >= loss.clip_nats)
        neg_terms, neg_slopes = plain_terms * ~clipped, plain_slopes * ~clipped
    elif loss.neg_loss == "unlikelihood":
        capped = logprob.clamp(max=math.log(UNLIKELIHOOD_MAX_P))
        p = capped.exp()
        neg_terms = weight.abs() * -torch.log(-torch.expm1(capped))  # −log(1 − p), stable near p = 1
        neg_slopes = weight.abs() * p / -torch.expm1(capped) * (logprob < math.log(UNLIKELIHOOD_MAX_P))
    elif loss.neg_loss == "npo":
        margin = loss.npo_beta * (logprob - ref_logprob)  # β(lp − lp_ref)
        neg_terms = weight.abs() * (2 / loss.npo_beta) * torch.nn.functional.softplus(margin)
        neg_slopes = weight.abs() * 2 * torch.sigmoid(margin)
    elif loss.neg_loss == "refclip":
        clipped = negative & (nll >= -ref_logprob + loss.refclip_nats)
        neg_terms, neg_slopes = plain_terms * ~clipped, plain_slopes * ~clipped
    else:
        neg_terms, neg_slopes = plain_terms, plain_slopes
    terms = torch.where(negative, neg_terms, plain_terms)
    slopes = torch.where(negative, neg_slopes, plain_slopes)
    if anchor is not None:
        k3, k3_slope = anchor_k3(logprob, ref_logprob)
        active = anchor > 0
        terms = terms + torch.where(active, anchor * k3, 0.0)
        slopes = slopes + torch.where(active, anchor * k3_slope, 0.0)
    return terms, slopes, clipped
