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


@njit(inline="always")
def _dot(p: np.ndarray, r: int, q: np.ndarray, c: int) -> int:  # pragma: no cover - compiled
    total = 0
    for w in range(p.shape[1]):
        total += _popcount(p[r, w] & q[c, w])
    return total


@njit(parallel=True, cache=True)
def _counts(p: np.ndarray, q: np.ndarray, symmetric: bool) -> np.ndarray:  # pragma: no cover - compiled
    rows, cols = p.shape[0], q.shape[0]
    out = np.zeros((rows, cols), np.int32)
    for r in prange(rows):
        for c in range(r if symmetric else 0, cols):
            total = _dot(p, r, q, c)
            out[r, c] = total
            if symmetric:
                out[c, r] = total
    return out


@njit(parallel=True, cache=True)
def _covariance_signs(
    counts: np.ndarray, ones: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    m = counts.shape[0]
    words = (m + 63) // 64
    abs_sum = np.zeros(m, np.int64)
    ones_sign = np.zeros(m, np.int64)
    positive = np.zeros((m, words), np.uint64)
    zero = np.zeros((m, words), np.uint64)
    for j in prange(m):
        row_abs, row_sign, own = 0, 0, ones[j]
        for w in range(words):
            pos_word, zero_word = np.uint64(0), np.uint64(0)
            for t in range(min(64, m - 64 * w)):
                numerator = n * np.int64(counts[j, 64 * w + t]) - own * ones[64 * w + t]
                row_abs += abs(numerator)
                row_sign += np.sign(numerator) * ones[64 * w + t]
                pos_word |= np.uint64(numerator > 0) << np.uint64(t)
                zero_word |= np.uint64(numerator == 0) << np.uint64(t)
            positive[j, w], zero[j, w] = pos_word, zero_word
        # the diagonal (a bit's variance) is no pair: its numerator own·(n − own) > 0 comes out
        diagonal = n * np.int64(counts[j, j]) - own * own
        abs_sum[j], ones_sign[j] = row_abs - diagonal, row_sign - np.sign(diagonal) * own
        bit = np.uint64(1) << np.uint64(j % 64)
        positive[j, j // 64] &= ~bit
        zero[j, j // 64] |= bit
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


def pack_columns(bits: torch.Tensor) -> np.ndarray:
    """Each column of a 0/1 matrix [t, m] as a row of little-endian uint64 words [m, ⌈t/64⌉]."""
    columns = bits.detach().to(torch.bool).T.contiguous().cpu().numpy()
    pad = (-columns.shape[1]) % 64
    if pad:
        columns = np.concatenate([columns, np.zeros((columns.shape[0], pad), bool)], axis=1)
    return np.ascontiguousarray(np.packbits(columns, axis=1, bitorder="little")).view(np.uint64)


def _use_torch_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def bit_counts(a: torch.Tensor, b: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """aᵀb of 0/1 matrices a [t, m], b [t, k] as int32 [m, k] (b omitted: aᵀa, computed once per
    pair; b may come packed, as ``pack_columns`` gives it)."""
    _use_torch_threads()
    p = pack_columns(a)
    q = p if b is None else b if isinstance(b, np.ndarray) else pack_columns(b)
    return torch.from_numpy(_counts(p, q, b is None)).to(a.device)


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
    n = bits.shape[0]
    ones = bits.sum(dim=0, dtype=torch.int64).cpu().numpy()
    abs_sum, ones_sign, positive, zero = _covariance_signs(bit_counts(bits).numpy(), ones, n)
    return PackedSigns(
        abs_sum=float(abs_sum.sum()) / (n * (n - 1)),
        p_sign=torch.from_numpy(ones_sign / n),
        positive=positive,
        zero=zero,
        n_zero=int(np.bitwise_count(zero).sum()),
    )
