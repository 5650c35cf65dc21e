"""The training objective, with exactly the normalization of docs/method.md (objective).

L = L_r + λ_H(t)·H + λ_D·D  (BAE);  L_r + λ_L1·mean_i Σ_j |f_ij|  (ReLU SAE);  L_r  (TopK SAE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bae.trainer.models import Codes

EPS = 1e-10


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
    """D = Σ_{j≠k} |C_jk|, C the unbiased covariance of the bits over the batch (one GEMM)."""
    centred = bits - bits.mean(dim=0)
    cov = centred.T @ centred / (bits.shape[0] - 1)
    return cov.abs().sum() - cov.diagonal().abs().sum()


@dataclass(frozen=True)
class Objective:
    """Coefficients of the loss; ``entropy_on`` tells whether λ_H is active at this step."""

    architecture: str
    lambda_entropy: float = 1e-7
    lambda_covariance: float = 1e-7
    l1_coefficient: float = 0.0

    def __call__(self, x: torch.Tensor, out: Codes, entropy_on: bool) -> tuple[torch.Tensor, dict]:
        """Total loss and its detached terms (``None`` for a term that was skipped)."""
        loss = reconstruction_loss(x, out.recon)
        terms: dict[str, torch.Tensor | None] = {
            "mse": loss.detach(),
            "entropy": None,
            "covariance": None,
            "l1": None,
        }
        if self.architecture == "bae":
            if entropy_on and self.lambda_entropy:
                h = entropy_term(out.bits)
                loss = loss + self.lambda_entropy * h
                terms["entropy"] = h.detach()
            if self.lambda_covariance:
                c = covariance_term(out.bits)
                loss = loss + self.lambda_covariance * c
                terms["covariance"] = c.detach()
        elif self.architecture == "relu_sae" and self.l1_coefficient:
            l1 = out.code.abs().sum(dim=-1).mean()
            loss = loss + self.l1_coefficient * l1
            terms["l1"] = l1.detach()
        return loss, terms
