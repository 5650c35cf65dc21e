"""The decoder of a sparse 0/1 code on the CPU: sums of the active bits' columns, not a GEMM.

A trained BAE fires a few bits a row (SmolLM2 layer 15, the default job: 13 of 2304, 0.6%), so the
decoder's forward ``b·Wᵀ + c`` and its weight gradient ``gᵀ·b`` touch ~1% of what their float
GEMMs multiply. ``decode`` adds each row's active columns (forward) and each column's active rows
(backward) instead, when the code is at most ``SPARSE_DENSITY`` ones; the gradient to the bits
(``g·W``, every bit needs it) stays a GEMM. The sums are those of the GEMM in another order (float
tolerance, not bitwise), and deterministic: the same weights and rows give the same bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from bae.trainer.bit_products import as_array, use_torch_threads

SPARSE_DENSITY = 0.01  # below the crossover with the two GEMMs on 1 and 2 threads (docs/benchmarks.md)
TILE = 32  # rows and columns of the weight a thread transposes at a time (both tiles in L1)
COLUMNS = 16  # code columns whose gradient rows a thread accumulates before writing them across


@njit(parallel=True, cache=True)
def _row_starts(bits: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """starts[i + 1] − starts[i] = the ones of row i, starts[0] = 0 (a running sum)."""
    n, m = bits.shape
    starts = np.zeros(n + 1, np.int64)
    for i in prange(n):
        count = 0
        for j in range(m):
            count += bits[i, j] != 0
        starts[i + 1] = count
    return np.cumsum(starts)


@njit(parallel=True, cache=True)
def _active_columns(bits: np.ndarray, starts: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Row i's active columns, in order, at ``[starts[i], starts[i + 1])``."""
    n, m = bits.shape
    columns = np.empty(starts[n], np.int64)
    for i in prange(n):
        e = starts[i]
        for j in range(m):
            if bits[i, j] != 0:
                columns[e] = j
                e += 1
    return columns


@njit(parallel=True, cache=True)
def _transpose(w: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """w [d, m] as a C-contiguous [m, d], ``TILE`` × ``TILE`` blocks at a time."""
    d, m = w.shape
    out = np.empty((m, d), w.dtype)
    for jt in prange((m + TILE - 1) // TILE):
        for c0 in range(0, d, TILE):
            for j in range(TILE * jt, min(m, TILE * (jt + 1))):
                for c in range(c0, min(d, c0 + TILE)):
                    out[j, c] = w[c, j]
    return out


@njit(parallel=True, cache=True)
def _decode_rows(
    starts: np.ndarray, columns: np.ndarray, weight_t: np.ndarray, bias: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """out[i] = bias + Σ over row i's active columns j of weight_t[j] (weight_t = Wᵀ, [m, d])."""
    n, d = len(starts) - 1, weight_t.shape[1]
    out = np.empty((n, d), weight_t.dtype)
    for i in prange(n):
        row = bias.copy()
        for e in range(starts[i], starts[i + 1]):
            column = weight_t[columns[e]]
            for c in range(d):
                row[c] += column[c]
        out[i] = row
    return out


@njit(cache=True)
def _by_column(
    starts: np.ndarray, columns: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The same ones listed by column: column j's rows, in order, at ``[first[j], first[j + 1])``."""
    first = np.zeros(m + 1, np.int64)
    for e in range(len(columns)):
        first[columns[e] + 1] += 1
    first = np.cumsum(first)
    fill, rows = first[:-1].copy(), np.empty(len(columns), np.int64)
    for i in range(len(starts) - 1):
        for e in range(starts[i], starts[i + 1]):
            rows[fill[columns[e]]] = i
            fill[columns[e]] += 1
    return first, rows


@njit(parallel=True, cache=True)
def _weight_grad(first: np.ndarray, rows: np.ndarray, g: np.ndarray) -> np.ndarray:  # pragma: no cover
    """out[c, j] = Σ over column j's active rows i of g[i, c] (gᵀ·b, [d, m]): ``COLUMNS`` columns
    accumulated as contiguous rows, then written across."""
    m, d = len(first) - 1, g.shape[1]
    out = np.empty((d, m), g.dtype)
    for block in prange((m + COLUMNS - 1) // COLUMNS):
        j0 = COLUMNS * block
        width = min(COLUMNS, m - j0)
        sums = np.zeros((COLUMNS, d), g.dtype)
        for b in range(width):
            for e in range(first[j0 + b], first[j0 + b + 1]):
                row = g[rows[e]]
                for c in range(d):
                    sums[b, c] += row[c]
        for c in range(d):
            for b in range(width):
                out[c, j0 + b] = sums[b, c]
    return out


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        bits: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        starts: np.ndarray,
        columns: np.ndarray,
    ) -> torch.Tensor:
        b = np.zeros(weight.shape[0], np.float32) if bias is None else as_array(bias)
        ctx.starts, ctx.columns, ctx.has_bias = starts, columns, bias is not None
        ctx.save_for_backward(weight)
        return torch.from_numpy(_decode_rows(starts, columns, _transpose(as_array(weight)), b))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (weight,) = ctx.saved_tensors
        use_torch_threads()
        grad_bits = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            first, rows = _by_column(ctx.starts, ctx.columns, weight.shape[1])
            grad_weight = torch.from_numpy(_weight_grad(first, rows, as_array(grad)))
        grad_bias = grad.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_bits, grad_weight, grad_bias, None, None


def decode(bits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(bits, weight, bias)`` for a 0/1 code ``bits`` [n, m]: by the active bits when it is
    a float32 code on the CPU with at most ``SPARSE_DENSITY`` ones, else the plain GEMM."""
    plain = bits.device.type != "cpu" or torch.is_autocast_enabled("cpu")
    if plain or bits.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.linear(bits, weight, bias)
    use_torch_threads()
    values = as_array(bits)
    starts = _row_starts(values)
    if starts[-1] > SPARSE_DENSITY * bits.numel():
        return F.linear(bits, weight, bias)
    return _SparseDecode.apply(bits, weight, bias, starts, _active_columns(values, starts))
