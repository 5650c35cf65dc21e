"""The objectives' pairwise penalties, exact, without the d'×d' float GEMMs autograd would do.

``abs_covariance`` (the paper's D = Σ_{j≠k} |C_jk|): the covariance of 0/1 bits is an integer
co-occurrence count, so C's numerator ``n·G_jk − n_j·n_k`` is computed exactly from popcounts
(``bit_products``) and its sign is exact; the backward is the one product 2/(n−1)·Z·sign(C)
(autograd does two d'-wide GEMMs for it), also popcounts: the bits against [C > 0] and [C < 0].
Constant bits contribute nothing to either and are left out.

``gram_norm`` (‖zᵀz‖²_F, the normalized objective's Σ ρ²): equal to ‖zzᵀ‖²_F, so it goes through
whichever Gram matrix is smaller — n×n for a batch narrower than the code — and its gradient is
4·(zzᵀ)z, one more product of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bae.trainer.bit_products import PackedSigns, bit_counts, packed_signs


@dataclass(frozen=True)
class DenseSigns:
    """The covariance signs as a d'×d' matrix (off the CPU)."""

    abs_sum: float
    p_sign: torch.Tensor
    sign: torch.Tensor

    def times(self, b: torch.Tensor) -> torch.Tensor:
        return b @ self.sign.to(b.dtype)


def dense_signs(b: torch.Tensor) -> DenseSigns:
    """C's numerator n·G − n_j·n_k (exact integers), its signs and Σ|C|."""
    n = b.shape[0]
    ones = b.sum(dim=0, dtype=torch.float64)
    numerator = n * bit_counts(b).double() - ones[:, None] * ones[None, :]
    numerator.fill_diagonal_(0)
    sign = numerator.sign()
    return DenseSigns(float(numerator.abs().sum()) / (n * (n - 1)), (ones / n) @ sign, sign)


class _AbsCovariance(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bits: torch.Tensor) -> torch.Tensor:
        n = bits.shape[0]
        ones = bits.sum(dim=0, dtype=torch.float64)
        varying = ((ones > 0) & (ones < n)).nonzero().squeeze(1)
        b = bits[:, varying].to(torch.promote_types(bits.dtype, torch.float32))
        signs: PackedSigns | DenseSigns = packed_signs(b) if b.device.type == "cpu" else dense_signs(b)
        ctx.signs = signs
        ctx.save_for_backward(b, varying)
        ctx.shape, ctx.dtype = bits.shape, bits.dtype
        return torch.tensor(signs.abs_sum, dtype=bits.dtype, device=bits.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        b, varying = ctx.saved_tensors
        signs = ctx.signs
        z_sign = signs.times(b) - signs.p_sign.to(b)  # Z·S = B·S − 1·pᵀS
        out = torch.zeros(ctx.shape, dtype=ctx.dtype, device=b.device)
        out[:, varying] = (z_sign * (grad * 2 / (ctx.shape[0] - 1))).to(ctx.dtype)
        return out


class _GramNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        gram = z @ z.T if z.shape[0] < z.shape[1] else z.T @ z
        ctx.save_for_backward(z, gram)
        return gram.pow(2).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        z, gram = ctx.saved_tensors
        product = gram @ z if z.shape[0] < z.shape[1] else z @ gram
        return product * (4 * grad)


def abs_covariance(bits: torch.Tensor) -> torch.Tensor:
    """Σ_{j≠k} |C_jk|, C the unbiased covariance over the batch of 0/1 ``bits`` [n, m]."""
    if not bool(((bits == 0) | (bits == 1)).all()):
        raise ValueError("abs_covariance needs 0/1 bits")
    return _AbsCovariance.apply(bits)


def gram_norm(z: torch.Tensor) -> torch.Tensor:
    """‖zᵀz‖²_F of z [n, m], through the smaller of zzᵀ and zᵀz."""
    return _GramNorm.apply(z)
