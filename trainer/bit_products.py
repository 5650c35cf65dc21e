"""Exact integer products of 0/1 matrices by popcount over 64-bit words.

``bit_counts(a, b)[r, c] = Σ_t a[t, r]·b[t, c]`` for 0/1 matrices: each column packed into words
along ``t``, each product a popcount of an AND. Same integers a float GEMM gives on 0/1 inputs, at
~1/64 of the memory and about a fifth of the time on a CPU (docs/benchmarks.md). Compiled with numba
on first use (cached on disk) and run on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic


def _ctpop(typingctx: Any, word: Any) -> Any:
    """Typing and code of ``_popcount``: LLVM's ``ctpop`` of a uint64, as an int64."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


_popcount: Any = intrinsic(_ctpop)  # the CPU's population count, inside compiled code


BLOCK = 4  # rows of the left operand per pass over the right one (each right word loaded once)


@njit(parallel=True, cache=True)
def _counts(p: np.ndarray, q: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """out[r, c] = Σ_w popcount(p[r, w] & q[c, w]); p has a multiple of BLOCK rows."""
    cols, words = q.shape[0], q.shape[1]
    out = np.zeros((p.shape[0], cols), np.int32)
    for block in prange(p.shape[0] // BLOCK):
        r = BLOCK * block
        for c in range(cols):
            a0, a1, a2, a3 = 0, 0, 0, 0
            for w in range(words):
                word = q[c, w]
                a0 += _popcount(p[r, w] & word)
                a1 += _popcount(p[r + 1, w] & word)
                a2 += _popcount(p[r + 2, w] & word)
                a3 += _popcount(p[r + 3, w] & word)
            out[r, c], out[r + 1, c], out[r + 2, c], out[r + 3, c] = a0, a1, a2, a3
    return out


@njit(parallel=True, cache=True)
def _covariance_signs(
    p: np.ndarray, ones: np.ndarray, n: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Per bit j < m (p: packed columns, a multiple of BLOCK rows): Σ_k |N_jk| and Σ_k sign(N_jk)·n_k
    and the packed rows of [N > 0] and [N = 0], N_jk = n·G_jk − n_j·n_k (the diagonal included)."""
    words = (m + 63) // 64
    abs_sum = np.zeros(p.shape[0], np.int64)
    ones_sign = np.zeros(p.shape[0], np.int64)
    positive = np.zeros((p.shape[0], words), np.uint64)
    zero = np.zeros((p.shape[0], words), np.uint64)
    for block in prange(p.shape[0] // BLOCK):
        first = BLOCK * block
        for w in range(words):
            for t in range(min(64, m - 64 * w)):
                k = 64 * w + t
                counts = np.zeros(BLOCK, np.int64)
                for u in range(p.shape[1]):
                    word = p[k, u]
                    for r in range(BLOCK):
                        counts[r] += _popcount(p[first + r, u] & word)
                shift = np.uint64(t)
                for r in range(BLOCK):
                    numerator = n * counts[r] - ones[first + r] * ones[k]
                    abs_sum[first + r] += abs(numerator)
                    ones_sign[first + r] += np.sign(numerator) * ones[k]
                    positive[first + r, w] |= np.uint64(numerator > 0) << shift
                    zero[first + r, w] |= np.uint64(numerator == 0) << shift
    return abs_sum, ones_sign, positive, zero


@njit(cache=True)
def _set_bits(packed: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    rows, cols = np.empty(count, np.int64), np.empty(count, np.int64)
    found = 0
    for r in range(packed.shape[0]):
        for w in range(packed.shape[1]):
            word = packed[r, w]
            while word:
                low = word & (~word + np.uint64(1))
                rows[found], cols[found] = r, 64 * w + _popcount(low - np.uint64(1))
                found += 1
                word ^= low
    return rows, cols


def pack_columns(bits: torch.Tensor, row_multiple: int = 1) -> np.ndarray:
    """Each column of a 0/1 matrix [t, m] as a row of little-endian uint64 words [m, ⌈t/64⌉]
    (zero rows appended up to a multiple of ``row_multiple``)."""
    columns = bits.detach().to(torch.bool).T.contiguous().cpu().numpy()
    rows, pad = (-columns.shape[0]) % row_multiple, (-columns.shape[1]) % 64
    if rows or pad:
        columns = np.pad(columns, ((0, rows), (0, pad)))
    return np.ascontiguousarray(np.packbits(columns, axis=1, bitorder="little")).view(np.uint64)


def _use_torch_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def bit_counts(a: torch.Tensor, b: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """aᵀb of 0/1 matrices a [t, m], b [t, k] as int32 [m, k] (b omitted: aᵀa; b may come packed,
    as ``pack_columns`` gives it)."""
    _use_torch_threads()
    p = pack_columns(a, BLOCK)
    q = pack_columns(a) if b is None else b if isinstance(b, np.ndarray) else pack_columns(b)
    return torch.from_numpy(_counts(p, q)[: a.shape[1]]).to(a.device)


def set_bits(packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the set bits of a packed matrix, row-major."""
    rows, cols = _set_bits(packed, int(np.bitwise_count(packed).sum()))
    return torch.from_numpy(rows), torch.from_numpy(cols)


@dataclass(frozen=True)
class PackedSigns:
    """The exact covariance of 0/1 bits [n, m], as the pairwise penalties need it:
    ``abs_sum`` = Σ_{j≠k} |C_jk|; ``p_sign`` = pᵀ·sign(C) (p the firing rates, sign 0 on the
    diagonal and on exact zeros); ``positive``/``zero`` = rows of [C > 0] and [C = 0 or j = k],
    packed as ``pack_columns`` packs (C is symmetric: row k is column k)."""

    abs_sum: float
    p_sign: torch.Tensor
    positive: np.ndarray
    zero: np.ndarray
    n_zero: int

    def times(self, b: torch.Tensor) -> torch.Tensor:
        """B·S for the 0/1 bits B [n, m] these signs came from: S = 2·[C > 0] − 1 + [C = 0 or j = k],
        so one popcount pass, the row sums, and the columns of the last term (the diagonal and
        exact ties, few: ``pair_penalties`` goes dense when they are many)."""
        product = 2 * bit_counts(b.T, self.positive).to(b.dtype) - b.sum(dim=1, keepdim=True)
        if self.n_zero == b.shape[1]:  # the diagonal only
            return product + b
        rows, cols = set_bits(self.zero)
        return product.index_add_(1, cols, b[:, rows])


def packed_signs(bits: torch.Tensor) -> PackedSigns:
    """C's signs from integer co-occurrence counts: n·G_jk − n_j·n_k is exact, so is its sign."""
    (n, m), ones = bits.shape, bits.sum(dim=0, dtype=torch.int64).cpu().numpy()
    _use_torch_threads()
    packed = pack_columns(bits, BLOCK)
    padded = np.pad(ones, (0, len(packed) - m))
    abs_sum, ones_sign, positive, zero = (a[:m] for a in _covariance_signs(packed, padded, n, m))
    # the diagonal (a bit's own variance, numerator n_j·(n − n_j) > 0) is no pair: taken out
    diagonal, own = np.arange(m), ones * (n - ones)
    bit = np.left_shift(np.uint64(1), (diagonal % 64).astype(np.uint64))
    positive[diagonal, diagonal // 64] &= ~bit
    zero[diagonal, diagonal // 64] |= bit
    return PackedSigns(
        abs_sum=float((abs_sum - own).sum()) / (n * (n - 1)),
        p_sign=torch.from_numpy((ones_sign - ones) / n),
        positive=positive,
        zero=zero,
        n_zero=int(np.bitwise_count(zero).sum()),
    )
