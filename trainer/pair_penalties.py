"""The objectives' pairwise penalties, exact, without the d'×d' float GEMMs autograd would do.

``abs_covariance`` (the paper's D = Σ_{j≠k} |C_jk|): the covariance of 0/1 bits is an integer
co-occurrence count, so C's numerator ``n·G_jk − n_j·n_k`` is computed exactly and its sign is
exact; the backward is the one product 2/(n−1)·Z·sign(C) (autograd does two d'-wide GEMMs for it).
On the CPU both are popcounts (``bit_products``), constant bits left out. Elsewhere (a GPU) both are
float16 GEMMs on the tensor cores, exact by construction (``exact_product``): every entry of either
operand is −1, 0 or 1, and the contraction is cut into slices of at most 2048 terms, so every
partial sum is an integer of magnitude ≤ 2048 — representable in float16 — whatever order or
precision (float16 or float32) the backend accumulates in; the slices are summed in int32. Nothing
there reads a value back to the host (no sync per step).

``correlation_squares`` (the normalized objective's Σ_{j≠k} ρ²): ‖zᵀz‖²_F = ‖zzᵀ‖²_F, so it goes
through whichever Gram matrix is smaller — n×n for a batch narrower than the code — and its
gradient is 4·(zzᵀ)z, one more product of the same size, carried through the standardization in
closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bae.trainer.bit_products import PackedSigns, bit_counts, packed_signs

EXACT_SLICE = 2048  # float16 holds every integer of magnitude ≤ 2048 exactly (11-bit significand)
SIGN_BLOCK = 2048  # rows of the d'×d' numerator formed at a time (int64 [block, d'] at once)


def exact_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as int32 for a [r, t], b [t, c] whose entries are −1, 0 or 1 (magnitudes < 2**31): float16
    GEMMs over slices of at most ``EXACT_SLICE`` terms of t, each exact under any accumulation."""
    a, b = a.to(torch.float16), b.to(torch.float16)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for start in range(0, a.shape[1], EXACT_SLICE):
        out += (a[:, start : start + EXACT_SLICE] @ b[start : start + EXACT_SLICE]).to(torch.int32)
    return out


def exact_counts(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """aᵀb of 0/1 matrices a [t, m], b [t, k] as int32 [m, k] (b omitted: aᵀa) on a's device:
    popcounts on the CPU (``bit_counts``), ``exact_product`` elsewhere."""
    if a.device.type == "cpu":
        return bit_counts(a, b)
    return exact_product(a.T, a if b is None else b)


@dataclass(frozen=True)
class DenseSigns:
    """The covariance of 0/1 bits [n, m] as ``PackedSigns`` gives it, held on their device:
    ``abs_total`` = Σ_{j≠k} |C_jk| (a 0-dim float64 tensor: NaN when the bits were not all 0/1),
    ``p_sign`` = pᵀ·sign(C) (float64 [m]), ``sign`` = sign(C) (float16 [m, m], 0 on the diagonal)."""

    abs_total: torch.Tensor
    p_sign: torch.Tensor
    sign: torch.Tensor

    @property
    def abs_sum(self) -> float:
        """``abs_total`` as a float (reads it back to the host)."""
        return float(self.abs_total)

    def product(
        self, b: torch.Tensor, scale: float | torch.Tensor = 1.0, centre: bool = False
    ) -> torch.Tensor:
        """B·sign(C) (``centre``: (B − 1pᵀ)·sign(C)) times ``scale`` for the 0/1 bits B these signs
        came from, in b's dtype (the integer product exact)."""
        product = exact_product(b, self.sign).to(b.dtype)
        return (product - self.p_sign.to(b) if centre else product) * scale


def dense_signs(b: torch.Tensor) -> DenseSigns:
    """C's numerator n·G − n_j·n_k (exact: G from ``exact_product``, the rest in int64), its signs,
    Σ|C| and pᵀ·sign(C), ``SIGN_BLOCK`` rows at a time, all on b's device (no host sync). Constant
    bits need no special case: their numerators are exactly 0."""
    n, m = b.shape
    ones = b.sum(dim=0, dtype=torch.int64)
    binary = ((b == 0) | (b == 1)).all()
    sign = torch.empty(m, m, dtype=torch.float16, device=b.device)
    abs_total = torch.zeros((), dtype=torch.int64, device=b.device)
    ones_sign = torch.zeros(m, dtype=torch.float64, device=b.device)
    for start in range(0, m, SIGN_BLOCK):
        rows = torch.arange(start, min(m, start + SIGN_BLOCK), device=b.device)
        numerator = n * exact_product(b[:, rows].T, b).long() - ones[rows, None] * ones[None, :]
        numerator[rows - start, rows] = 0  # a bit's own variance is no pair
        abs_total += numerator.abs().sum()
        block = numerator.sign()
        sign[rows] = block.to(torch.float16)
        ones_sign += ones[rows].double() @ block.double()  # integers: exact in float64
    abs_sum = abs_total.double() / (n * (n - 1))
    return DenseSigns(torch.where(binary, abs_sum, torch.nan), ones_sign / n, sign)


class _AbsCovariance(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bits: torch.Tensor, dense: bool) -> torch.Tensor:
        b = bits.detach().to(torch.promote_types(bits.dtype, torch.float32))
        if dense:  # every column: a constant bit's numerators are 0 (no data-dependent selection)
            signs: PackedSigns | DenseSigns = dense_signs(b)
            value = signs.abs_total.to(bits.dtype)
        else:  # the bits that vary only (a constant bit's covariances are 0)
            signs = packed_signs(b)
            value = torch.tensor(signs.abs_sum, dtype=bits.dtype, device=bits.device)
        ctx.signs, ctx.dtype = signs, bits.dtype
        ctx.save_for_backward(b)
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (b,) = ctx.saved_tensors
        scale = grad * 2 / (b.shape[0] - 1)
        if isinstance(ctx.signs, PackedSigns):  # the scale read on the host: a CPU scalar
            scale = float(scale)
        return ctx.signs.product(b, scale, centre=True).to(ctx.dtype), None  # 2/(n−1)·Z·sign(C)


class _CorrelationSquares(torch.autograd.Function):
    """Σ_{j≠k} ρ_jk² with ρ = zᵀz/n, z_ij = (b_ij − p_j)·s_j, s_j = (v_j + ε)^−½ (p, v = p(1 − p)
    the 0/1 columns' mean and variance); its gradient in closed form, a handful of passes over
    [n, m] where autograd of the plain formula makes ~25 (docs/method.md §3)."""

    @staticmethod
    def forward(ctx: Any, bits: torch.Tensor, eps: float) -> torch.Tensor:
        n = bits.shape[0]
        p = bits.mean(dim=0)
        v = p * (1 - p)  # a 0/1 column's variance (torch.var_mean is ~20x slower over dim 0 on a CPU)
        s = (v + eps).rsqrt()
        z = torch.sub(bits, p).mul_(s)
        gram = z @ z.T if n < bits.shape[1] else z.T @ z  # ‖zᵀz‖ = ‖zzᵀ‖: the smaller one
        q = v * s * s  # ρ_jj = mean_i z_ij²
        ctx.save_for_backward(z, gram, s, q)
        return torch.linalg.vector_norm(gram).square() / n**2 - q.square().sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, gram, s, q = ctx.saved_tensors
        n = z.shape[0]
        # ∂/∂z = 4/n²·(zzᵀz − n·q⊙z) =: Y; through z = (b − p)·s with s = (v + ε)^−½:
        # ∂/∂b = s⊙(Y − mean_i Y − z⊙Σ_i(Y⊙z)/n) (the column mean of z is 0)
        y = (gram @ z if n < z.shape[1] else z @ gram).addcmul_(z, q, value=-n)  # in place: no temporaries
        scale = s * (grad * 4 / n**2)
        along = torch.linalg.vecdot(y, z, dim=0) * scale / n
        return y.sub_(y.mean(dim=0)).mul_(scale).addcmul_(z, along, value=-1), None


def abs_covariance(bits: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
    """Σ_{j≠k} |C_jk|, C the unbiased covariance over the batch of 0/1 ``bits`` [n, m]. ``dense``:
    the float16 products (default off the CPU) rather than popcounts (default on it; the tests
    compare both on one machine). Bits that are not all 0/1 raise on the popcount path and give
    NaN on the dense one (checked on the device: the NaN stops training as any non-finite loss)."""
    dense = bits.device.type != "cpu" if dense is None else dense
    return _AbsCovariance.apply(bits, dense)


def correlation_squares(bits: torch.Tensor, eps: float) -> torch.Tensor:
    """Σ_{j≠k} ρ_jk² of the 0/1 columns of ``bits`` [n, m], each column's variance raised by ``eps``
    (a constant column has ρ = 0), through the smaller Gram matrix (n×n for a batch narrower than
    the code), its gradient in closed form."""
    return _CorrelationSquares.apply(bits, eps)
