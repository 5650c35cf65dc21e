"""The training objectives, with exactly the normalization of docs/method.md §3.

``paper``:      L = L_r + λ_H(t)·H + λ_D·D  (BAE);  L_r + λ_L1·mean_i Σ_j |f_ij|  (ReLU SAE);  L_r  (TopK)
``normalized``: L = FVU_b + β(t)·(S + γ·R)  (BAE);  FVU_b + λ_L1·mean_i Σ_j |f_ij|  (ReLU SAE);  FVU_b  (TopK)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bae.trainer.models import Codes
from bae.trainer.pair_penalties import abs_covariance, correlation_squares

EPS = 1e-10
CORR_EPS = 1e-4


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """L_r: mean over all n_b·d elements of (x − x̂)²."""
    return (x - recon).pow(2).mean()


def binary_entropy(p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """H_b(p) in bits, elementwise, with ε inside the logs."""
    return -(p * torch.log2(p + eps) + (1 - p) * torch.log2(1 - p + eps))


def entropy_term(bits: torch.Tensor) -> torch.Tensor:
    """H = Σ_j H_b(p_j), p_j the batch firing rate of bit j (bits, summed over features)."""
    return binary_entropy(bits.mean(dim=0)).sum()


def covariance_term(bits: torch.Tensor) -> torch.Tensor:
    """D = Σ_{j≠k} |C_jk|, C the unbiased covariance of the bits over the batch (exact integer
    co-occurrence counts, ``pair_penalties.abs_covariance``)."""
    return abs_covariance(bits)


def fvu_term(x: torch.Tensor, recon: torch.Tensor, variance: float) -> torch.Tensor:
    """FVU_b = Σ_i ‖x_i − x̂_i‖² / (n_b · V), V the data's total variance (one scalar, fixed)."""
    return (x - recon).pow(2).sum() / (x.shape[0] * variance)


def bit_cost(p: torch.Tensor) -> torch.Tensor:
    """A bit's term of S at firing rate ``p``, elementwise: ½(H_b(p) + 2·min(p, 1 − p))."""
    return 0.5 * (binary_entropy(p) + 2 * torch.minimum(p, 1 - p))


def code_bits_term(bits: torch.Tensor) -> torch.Tensor:
    """S = Σ_j ½(H_b(p_j) + 2·min(p_j, 1 − p_j)): H_b's values at p ∈ {0, ½, 1}, but a slope at
    p = ½ (where ∂H_b/∂p = 0 would let a useless fair bit survive)."""
    return bit_cost(bits.mean(dim=0)).sum()


def redundancy_term(bits: torch.Tensor) -> torch.Tensor:
    """R = Σ_{j<k} ρ_jk² / (2 ln 2), ρ the bits' batch correlation, each variance raised by
    ``CORR_EPS`` (I(j;k) ≈ ρ²/2ln2 bits), through the smaller Gram matrix
    (``pair_penalties.correlation_squares``)."""
    return correlation_squares(bits, CORR_EPS) / (4 * math.log(2))


@dataclass(frozen=True)
class Objective:
    """The paper objective. Both objectives are called as ``objective(x, out, entropy_weight)``,
    the weight of the entropy term at this step (λ_H(t) here, β(t) for the normalized one), set by
    the trainer (0 before the entropy start)."""

    architecture: str
    lambda_covariance: float = 1e-7
    l1_coefficient: float = 0.0

    def __call__(self, x: torch.Tensor, out: Codes, entropy_weight: float) -> tuple[torch.Tensor, dict]:
        """Total loss and its detached terms (a skipped term is absent)."""
        loss = reconstruction_loss(x, out.recon)
        terms: dict[str, torch.Tensor] = {"mse": loss.detach()}
        if self.architecture == "bae":
            if entropy_weight:
                h = entropy_term(out.bits)
                loss = loss + entropy_weight * h
                terms["entropy"] = h.detach()
            if self.lambda_covariance:
                c = covariance_term(out.bits)
                loss = loss + self.lambda_covariance * c
                terms["covariance"] = c.detach()
        return self.with_l1(loss, out, terms)

    def with_l1(self, loss: torch.Tensor, out: Codes, terms: dict) -> tuple[torch.Tensor, dict]:
        """The ReLU SAE's L1 penalty on its activations (the same term under both objectives)."""
        if self.architecture == "relu_sae" and self.l1_coefficient:
            l1 = out.code.abs().sum(dim=-1).mean()
            loss = loss + self.l1_coefficient * l1
            terms["l1"] = l1.detach()
        return loss, terms


@dataclass(frozen=True)
class NormalizedObjective(Objective):
    """L = FVU_b + β·(S + γ·R): β (the entropy weight) is the FVU a bit of code entropy must buy;
    ``variance`` is V of the training space."""

    variance: float = 1.0
    gamma: float = 1.0

    def __call__(self, x: torch.Tensor, out: Codes, entropy_weight: float) -> tuple[torch.Tensor, dict]:
        """Total loss and its detached terms (``beta`` included)."""
        loss = fvu_term(x, out.recon, self.variance)
        terms: dict[str, torch.Tensor] = {"fvu_term": loss.detach(), "beta": torch.tensor(entropy_weight)}
        if self.architecture == "bae" and entropy_weight > 0:
            cost = code_bits_term(out.bits)
            terms["code_bits"] = cost.detach()
            if self.gamma:
                red = redundancy_term(out.bits)
                terms["redundancy_bits"] = red.detach()
                cost = cost + self.gamma * red
            loss = loss + entropy_weight * cost
        return self.with_l1(loss, out, terms)
