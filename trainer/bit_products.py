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

# numba's OpenMP layer leaves its threads spinning beside torch's own OpenMP pool: measured, torch's
# elementwise ops ran 4.5x slower after one popcount call; its plain thread pool does not interfere
numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]


BLOCK = 4  # rows of the left operand per pass over the right one (each right word loaded once)
TILE = 64  # columns of the right operand a thread keeps in cache while all rows pass


@njit(parallel=True, cache=True)
def _signed_counts(p: np.ndarray, plus: np.ndarray, minus: np.ndarray) -> np.ndarray:  # pragma: no cover
    """out[r, c] = Σ_w popcount(p[r, w] & plus[c, w]) − popcount(p[r, w] & minus[c, w]);
    p has a multiple of BLOCK rows. Threads take tiles of TILE columns, whose words stay in cache
    while every row of p passes them (streaming all of plus/minus per row block was bandwidth-bound)."""
    cols, words = plus.shape[0], plus.shape[1]
    out = np.zeros((p.shape[0], cols), np.int32)
    for tile in prange((cols + TILE - 1) // TILE):
        for block in range(p.shape[0] // BLOCK):
            r = BLOCK * block
            for c in range(TILE * tile, min(cols, TILE * (tile + 1))):
                a0, a1, a2, a3 = 0, 0, 0, 0
                for w in range(words):
                    up, down = plus[c, w], minus[c, w]
                    a0 += _popcount(p[r, w] & up) - _popcount(p[r, w] & down)
                    a1 += _popcount(p[r + 1, w] & up) - _popcount(p[r + 1, w] & down)
                    a2 += _popcount(p[r + 2, w] & up) - _popcount(p[r + 2, w] & down)
                    a3 += _popcount(p[r + 3, w] & up) - _popcount(p[r + 3, w] & down)
                out[r, c], out[r + 1, c], out[r + 2, c], out[r + 3, c] = a0, a1, a2, a3
    return out


@njit(parallel=True, cache=True)
def _covariance_signs(
    p: np.ndarray, ones: np.ndarray, n: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Per bit j < m (p: packed columns, a multiple of BLOCK rows): Σ_k |N_jk| and Σ_k sign(N_jk)·n_k
    and the packed rows of [N > 0] and [N < 0], N_jk = n·G_jk − n_j·n_k (the diagonal included).
    Threads take TILE rows at a time and pass each tile of TILE columns k over all of them."""
    words, rows = (m + 63) // 64, p.shape[0]
    abs_sum, ones_sign = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
    positive, negative = np.zeros((rows, words), np.uint64), np.zeros((rows, words), np.uint64)
    for group in prange((rows + TILE - 1) // TILE):
        counts = np.zeros(BLOCK, np.int64)  # one block's co-occurrence counts with bit k
        for start in range(0, m, TILE):
            for r in range(TILE * group, min(rows, TILE * (group + 1)), BLOCK):
                for k in range(start, min(m, start + TILE)):
                    a0, a1, a2, a3 = 0, 0, 0, 0
                    for u in range(p.shape[1]):
                        word = p[k, u]
                        a0 += _popcount(p[r, u] & word)
                        a1 += _popcount(p[r + 1, u] & word)
                        a2 += _popcount(p[r + 2, u] & word)
                        a3 += _popcount(p[r + 3, u] & word)
                    counts[0], counts[1], counts[2], counts[3] = a0, a1, a2, a3
                    shift = np.uint64(k % 64)
                    for i in range(BLOCK):
                        numerator = n * counts[i] - ones[r + i] * ones[k]
                        abs_sum[r + i] += abs(numerator)
                        ones_sign[r + i] += np.sign(numerator) * ones[k]
                        positive[r + i, k // 64] |= np.uint64(numerator > 0) << shift
                        negative[r + i, k // 64] |= np.uint64(numerator < 0) << shift
    return abs_sum, ones_sign, positive, negative


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


def float_counts(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``bit_counts`` as a float64 product (exact: the sums are integers below 2**53), on a's device."""
    return (a.T.double() @ (a if b is None else b).double()).round().int()


def bit_counts(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """aᵀb of 0/1 matrices a [t, m], b [t, k] as int32 [m, k] (b omitted: aᵀa), on a's device: popcounts
    on the CPU, ``float_counts`` elsewhere."""
    other = a if b is None else b
    if a.device.type != "cpu":
        return float_counts(a, b)
    _use_torch_threads()
    q = pack_columns(other)
    return torch.from_numpy(_signed_counts(pack_columns(a, BLOCK), q, np.zeros_like(q))[: a.shape[1]])


@dataclass(frozen=True)
class PackedSigns:
    """The exact covariance of 0/1 bits [n, m], as the pairwise penalties need it:
    ``abs_sum`` = Σ_{j≠k} |C_jk|; ``p_sign`` = pᵀ·sign(C) (p the firing rates, sign 0 on the
    diagonal and on exact zeros); ``positive``/``negative`` = rows of [C > 0] and [C < 0], packed
    as ``pack_columns`` packs (C is symmetric: row k is column k)."""

    abs_sum: float
    p_sign: torch.Tensor
    positive: np.ndarray
    negative: np.ndarray

    def times(self, b: torch.Tensor) -> torch.Tensor:
        """B·sign(C) for the 0/1 bits B [n, m] these signs came from: popcounts of each row of B
        against [C > 0] minus against [C < 0], in one pass."""
        _use_torch_threads()
        counts = _signed_counts(pack_columns(b.T, BLOCK), self.positive, self.negative)
        return torch.from_numpy(counts[: b.shape[0]]).to(b.dtype)


def packed_signs(bits: torch.Tensor) -> PackedSigns:
    """C's signs from integer co-occurrence counts: n·G_jk − n_j·n_k is exact, so is its sign."""
    (n, m), ones = bits.shape, bits.sum(dim=0, dtype=torch.int64).cpu().numpy()
    _use_torch_threads()
    packed = pack_columns(bits, BLOCK)
    padded = np.pad(ones, (0, len(packed) - m))
    abs_sum, ones_sign, positive, negative = (a[:m] for a in _covariance_signs(packed, padded, n, m))
    # the diagonal (a bit's own variance, numerator n_j·(n − n_j) ≥ 0) is no pair: taken out
    diagonal, own = np.arange(m), ones * (n - ones)
    positive[diagonal, diagonal // 64] &= ~np.left_shift(np.uint64(1), (diagonal % 64).astype(np.uint64))
    return PackedSigns(
        abs_sum=float((abs_sum - own).sum()) / (n * (n - 1)),
        p_sign=torch.from_numpy((ones_sign - np.sign(own) * ones) / n),
        positive=positive,
        negative=negative,
    )
