"""Exact integer products of 0/1 matrices by popcount over 64-bit words.

``bit_counts(a, b)[r, c] = Σ_t a[t, r]·b[t, c]`` for 0/1 matrices: each column packed into words
along ``t``, each product a popcount of an AND. Same integers a float GEMM gives on 0/1 inputs, at
~1/64 of the memory and about a fifth of the time on a CPU (docs/benchmarks.md). The paper
objective's covariance penalty (``packed_signs``, ``PackedSigns.product``) is built on the same
popcounts: C's exact signs from the pairs k ≥ j, then B·sign(C) in one pass (docs/method.md §3).
Compiled with numba on first use (cached on disk) and run on ``torch.get_num_threads()`` threads.
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
TILE = 64  # columns of the right operand a thread keeps in cache while all rows pass; bits per word
# the covariance's float64 sums hold integers below 2**53 (exact in any order): reassociation only
# lets LLVM vectorize them
_EXACT_REORDER = {"reassoc", "nsz"}


@njit(parallel=True, cache=True)
def _counts(p: np.ndarray, q: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """out[r, c] = Σ_w popcount(p[r, w] & q[c, w]); p has a multiple of BLOCK rows. Threads take
    tiles of TILE columns, whose words stay in cache while every row of p passes them (streaming
    all of q per row block was bandwidth-bound)."""
    cols, words = q.shape[0], q.shape[1]
    out = np.zeros((p.shape[0], cols), np.int32)
    for tile in prange((cols + TILE - 1) // TILE):
        for r in range(0, p.shape[0], BLOCK):
            for c in range(TILE * tile, min(cols, TILE * (tile + 1))):
                a0, a1, a2, a3 = 0, 0, 0, 0
                for w in range(words):
                    word = q[c, w]
                    a0 += _popcount(p[r, w] & word)
                    a1 += _popcount(p[r + 1, w] & word)
                    a2 += _popcount(p[r + 2, w] & word)
                    a3 += _popcount(p[r + 3, w] & word)
                out[r, c], out[r + 1, c], out[r + 2, c], out[r + 3, c] = a0, a1, a2, a3
    return out


@njit(inline="always")
def _count_tile(p: np.ndarray, j0: Any, k0: Any, counts: np.ndarray) -> None:  # pragma: no cover
    """counts[a, b] = co-occurrences of bits j0 + a and k0 + b (a, b < TILE)."""
    for a in range(0, TILE, BLOCK):
        j = j0 + a
        for b in range(TILE):
            k = k0 + b
            a0, a1, a2, a3 = 0, 0, 0, 0
            for u in range(p.shape[1]):
                word = p[k, u]
                a0 += _popcount(p[j, u] & word)
                a1 += _popcount(p[j + 1, u] & word)
                a2 += _popcount(p[j + 2, u] & word)
                a3 += _popcount(p[j + 3, u] & word)
            counts[a, b], counts[a + 1, b], counts[a + 2, b], counts[a + 3, b] = a0, a1, a2, a3


@njit(parallel=True, cache=True, fastmath=_EXACT_REORDER)
def _covariance_signs(
    p: np.ndarray, ones: np.ndarray, n: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Σ_jk |N_jk|, Σ_k sign(N_jk)·n_k per bit j, and the packed rows of [N > 0] and [N < 0], for
    N_jk = n·G_jk − n_j·n_k (the diagonal included); p: packed columns, a multiple of TILE rows;
    ``ones`` (float64) the n_j. C is symmetric: only tiles k ≥ j are counted, each tile's signs
    written for both (j, k) and (k, j). A thread takes row tile t and its mirror (tiles − 1 − t),
    the same number of tile pairs for every thread."""
    tiles = p.shape[0] // TILE
    abs_sum, signed = np.zeros(tiles, np.int64), np.zeros((tiles, p.shape[0]))
    positive, negative = np.zeros((p.shape[0], tiles), np.uint64), np.zeros((p.shape[0], tiles), np.uint64)
    for unit in prange((tiles + 1) // 2):
        counts, mirrored = np.zeros((TILE, TILE)), np.zeros(TILE)
        positive_t, negative_t = np.zeros(TILE, np.uint64), np.zeros(TILE, np.uint64)
        first = np.int64(unit)
        for half in range(2 if 2 * first + 1 < tiles else 1):
            jt = first if half == 0 else tiles - 1 - first
            j0 = TILE * jt
            for kt in range(jt, tiles):
                k0, ones_k = TILE * kt, ones[TILE * kt : TILE * (kt + 1)]
                _count_tile(p, j0, k0, counts)
                mirrored[:], positive_t[:], negative_t[:] = 0.0, 0, 0
                tile_abs = 0.0
                for a in range(TILE):
                    up, down, row_signed, nj = np.uint64(0), np.uint64(0), 0.0, ones[j0 + a]
                    bit = np.uint64(a)
                    for b in range(TILE):
                        numerator = n * counts[a, b] - nj * ones_k[b]
                        tile_abs += abs(numerator)
                        above, below = numerator > 0, numerator < 0
                        sign = np.float64(above) - np.float64(below)
                        row_signed += sign * ones_k[b]
                        mirrored[b] += sign * nj
                        up |= np.uint64(above) << np.uint64(b)
                        down |= np.uint64(below) << np.uint64(b)
                        positive_t[b] |= np.uint64(above) << bit
                        negative_t[b] |= np.uint64(below) << bit
                    positive[j0 + a, kt], negative[j0 + a, kt] = up, down
                    signed[jt, j0 + a] += row_signed
                if kt == jt:
                    abs_sum[jt] += np.int64(tile_abs)
                    continue
                abs_sum[jt] += 2 * np.int64(tile_abs)
                for b in range(TILE):
                    positive[k0 + b, jt], negative[k0 + b, jt] = positive_t[b], negative_t[b]
                    signed[jt, k0 + b] += mirrored[b]
    return abs_sum.sum(), signed.sum(axis=0), positive, negative


@njit(inline="always")
def _tie_word(positive: np.ndarray, negative: np.ndarray, c: int, w: int, m: int) -> Any:  # pragma: no cover
    """Word w of bit c's ties: the bits k < m, k ≠ c, with N_ck = 0."""
    word = ~(positive[c, w] | negative[c, w])
    if 64 * (w + 1) > m:
        word &= (np.uint64(1) << np.uint64(m - 64 * w)) - np.uint64(1)
    if w == c // 64:
        word &= ~(np.uint64(1) << np.uint64(c % 64))
    return word


@njit(cache=True)
def _tie_lists(
    positive: np.ndarray, negative: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The pairs (c, k) with C exactly 0 (ties), as two index arrays, for each bit c with at most one
    tie per word of a mask row (listing costs about a row's worth of popcounts per tie); the bits
    with more are returned as ``dense`` and listed with no tie."""
    words = positive.shape[1]
    count = np.zeros(m, np.int64)
    for c in range(m):
        for w in range(words):
            count[c] += _popcount(_tie_word(positive, negative, c, w, m))
    dense = count > words
    total = np.where(dense, 0, count).sum()
    bit, tie = np.empty(total, np.int64), np.empty(total, np.int64)
    e = 0
    for c in range(m):
        for w in range(words if not dense[c] else 0):
            word = _tie_word(positive, negative, c, w, m)
            while word:
                low = word & (~word + np.uint64(1))
                bit[e], tie[e] = c, 64 * w + _popcount(low - np.uint64(1))
                e += 1
                word ^= low
    return bit, tie, np.nonzero(dense)[0]


@njit(inline="always")
def _word_bit(word: Any, k: Any) -> Any:  # pragma: no cover - compiled
    """Bit k % 64 of a word, as an int64."""
    return np.int64((word >> np.uint64(k & 63)) & np.uint64(1))


@njit(inline="always")
def _store(out: np.ndarray, i: Any, j: Any, value: Any, offset: Any, scale: Any) -> None:  # pragma: no cover
    """out[i, j] = (value − offset)·scale in out's dtype (the integer stored first: exact below 2**24)."""
    if i < out.shape[0]:
        out[i, j] = value
        out[i, j] = (out[i, j] - offset) * scale


@njit(parallel=True, cache=True)
def _signed_products(
    rows: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    slot: np.ndarray,
    tie_start: np.ndarray,
    tie: np.ndarray,
    offset: np.ndarray,
    scale: np.ndarray,
    cols: np.ndarray,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """out[i, cols[c]] = (B_i·sign(C)_c − offset[c])·scale[0] for the packed rows of B (``rows``, a
    multiple of BLOCK) and the packed rows of [C > 0] (``positive``), one popcount pass: [C > 0],
    [C < 0], bit c itself and its ties partition the bits, so B_i·[C_c < 0] = Σ_k B_ik − B_i·[C_c > 0]
    − B_ic − Σ_{ties k} B_ik (ties of c: tie[tie_start[c]:tie_start[c + 1]]); a bit with many ties
    (``slot[c]`` ≥ 0) counts against its row ``negative[slot[c]]`` of [C < 0] instead. The integer
    is stored in out's dtype (exact below 2**24), then offset and scale applied in that dtype."""
    m, words = positive.shape[0], rows.shape[1]
    totals = np.zeros(rows.shape[0], np.int64)
    for i in range(rows.shape[0]):
        for w in range(words):
            totals[i] += _popcount(rows[i, w])
    for t in prange((m + TILE - 1) // TILE):
        for r in range(0, rows.shape[0], BLOCK):
            for c in range(TILE * t, min(m, TILE * (t + 1))):
                a0, a1, a2, a3 = 0, 0, 0, 0
                for w in range(words):
                    word = positive[c, w]
                    a0 += _popcount(rows[r, w] & word)
                    a1 += _popcount(rows[r + 1, w] & word)
                    a2 += _popcount(rows[r + 2, w] & word)
                    a3 += _popcount(rows[r + 3, w] & word)
                if slot[c] >= 0:  # B·[C > 0] − B·[C < 0]
                    b0, b1, b2, b3 = 0, 0, 0, 0
                    for w in range(words):
                        word = negative[slot[c], w]
                        b0 += _popcount(rows[r, w] & word)
                        b1 += _popcount(rows[r + 1, w] & word)
                        b2 += _popcount(rows[r + 2, w] & word)
                        b3 += _popcount(rows[r + 3, w] & word)
                    a0, a1, a2, a3 = a0 - b0, a1 - b1, a2 - b2, a3 - b3
                else:  # 2·B·[C > 0] − Σ_k B_ik + B_ic + Σ_{ties k} B_ik
                    wc = c >> 6
                    b0, b1 = _word_bit(rows[r, wc], c), _word_bit(rows[r + 1, wc], c)
                    b2, b3 = _word_bit(rows[r + 2, wc], c), _word_bit(rows[r + 3, wc], c)
                    for e in range(tie_start[c], tie_start[c + 1]):
                        k = tie[e]
                        wk = k >> 6
                        b0 += _word_bit(rows[r, wk], k)
                        b1 += _word_bit(rows[r + 1, wk], k)
                        b2 += _word_bit(rows[r + 2, wk], k)
                        b3 += _word_bit(rows[r + 3, wk], k)
                    a0, a1 = 2 * a0 - totals[r] + b0, 2 * a1 - totals[r + 1] + b1
                    a2, a3 = 2 * a2 - totals[r + 2] + b2, 2 * a3 - totals[r + 3] + b3
                j, o = cols[c], offset[c]
                _store(out, r, j, a0, o, scale[0])
                _store(out, r + 1, j, a1, o, scale[0])
                _store(out, r + 2, j, a2, o, scale[0])
                _store(out, r + 3, j, a3, o, scale[0])


@njit(cache=True)
def _pack_columns(
    values: np.ndarray, rows: int
) -> tuple[np.ndarray, np.ndarray, bool]:  # pragma: no cover - compiled
    """``pack_columns`` of a C-contiguous 2-D array (bit = value ≠ 0), each column's count of set
    bits, and whether every value is 0 or 1: 64 rows at a time, each OR-ed into every column's word
    in one contiguous pass."""
    t, m = values.shape
    out = np.zeros((rows, (t + 63) // 64), np.uint64)
    word, ones, binary = np.zeros(m, np.uint64), np.zeros(m, np.int64), True
    for w in range(out.shape[1]):
        word[:] = 0
        for r in range(64 * w, min(t, 64 * w + 64)):
            shift, row, other = np.uint64(r - 64 * w), values[r], False
            for j in range(m):
                on = row[j] != 0
                word[j] |= np.uint64(on) << shift
                ones[j] += on
                other |= on & (row[j] != 1)
            binary &= not other
        out[:m, w] = word
    return out, ones, binary


@njit(parallel=True, cache=True)
def _pack_rows(values: np.ndarray, cols: np.ndarray, rows: int) -> np.ndarray:  # pragma: no cover - compiled
    """Row i of ``values`` restricted to ``cols`` as little-endian uint64 words (bit c = value of
    column cols[c] ≠ 0), zero rows appended up to ``rows``."""
    out = np.zeros((rows, (len(cols) + 63) // 64), np.uint64)
    for i in prange(values.shape[0]):
        for w in range(out.shape[1]):
            word = np.uint64(0)
            for c in range(64 * w, min(len(cols), 64 * w + 64)):
                word |= np.uint64(values[i, cols[c]] != 0) << np.uint64(c - 64 * w)
            out[i, w] = word
    return out


def as_array(bits: torch.Tensor) -> np.ndarray:
    """A 2-D CPU tensor as a C-contiguous numpy array (no copy when it already is one)."""
    return bits.detach().cpu().contiguous().numpy()


def pack_columns(bits: torch.Tensor, row_multiple: int = 1) -> np.ndarray:
    """Each column of a 0/1 matrix [t, m] as a row of little-endian uint64 words [m, ⌈t/64⌉]
    (zero rows appended up to a multiple of ``row_multiple``)."""
    m = bits.shape[1]
    return _pack_columns(as_array(bits), m + (-m) % row_multiple)[0]


def use_torch_threads() -> None:
    """numba's kernels on as many threads as torch's."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def bit_counts(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """aᵀb of 0/1 CPU matrices a [t, m], b [t, k] as int32 [m, k] (b omitted: aᵀa), by popcounts
    (``pair_penalties.exact_counts`` picks the product off the CPU)."""
    use_torch_threads()
    q = pack_columns(a if b is None else b)
    return torch.from_numpy(_counts(pack_columns(a, BLOCK), q)[: a.shape[1]])


@dataclass(frozen=True)
class PackedSigns:
    """The exact covariance of 0/1 bits [n, M], as the pairwise penalties need it:
    ``abs_sum`` = Σ_{j≠k} |C_jk|; ``p_sign`` = pᵀ·sign(C) (float64 [M]; p the firing rates, sign 0
    on the diagonal, on exact zeros and for constant bits). Over the bits that vary (``cols``; a
    constant bit's covariances are 0): ``positive`` = the rows of [C > 0] packed as ``pack_columns``
    packs (C is symmetric: row k is column k); ``negative`` = the rows of [C < 0] of the bits with
    more ties (C_jk exactly 0) than words in a row (``slot[c]`` their row, −1 for the others); the
    other bits' ties listed, bit c's at ``tie[tie_start[c]:tie_start[c + 1]]``."""

    abs_sum: float
    p_sign: torch.Tensor
    cols: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    slot: np.ndarray
    tie_start: np.ndarray
    tie: np.ndarray

    def product(self, bits: torch.Tensor, scale: float = 1.0, centre: bool = False) -> torch.Tensor:
        """B·sign(C) (``centre``: minus 1·pᵀsign(C), i.e. (B − 1pᵀ)·sign(C)) times ``scale`` for the
        bits B [n, M] (float32 or float64) these signs came from, in their dtype: the integer product
        by one popcount pass of each row of B against [C > 0], rounded once to the dtype."""
        values = as_array(bits)
        n = values.shape[0]
        out = np.zeros(values.shape, values.dtype)
        offset = self.p_sign.numpy()[self.cols] if centre else np.zeros(len(self.cols))
        use_torch_threads()
        rows = _pack_rows(values, self.cols, n + (-n) % BLOCK)
        _signed_products(
            rows,
            self.positive,
            self.negative,
            self.slot,
            self.tie_start,
            self.tie,
            offset.astype(values.dtype),
            np.array([scale], values.dtype),
            self.cols,
            out,
        )
        return torch.from_numpy(out)


def packed_signs(bits: torch.Tensor) -> PackedSigns:
    """C's signs from integer co-occurrence counts: n·G_jk − n_j·n_k is exact, so is its sign.
    ValueError when ``bits`` holds a value other than 0 and 1."""
    values = as_array(bits)
    n = values.shape[0]
    use_torch_threads()
    every, ones, binary = _pack_columns(values, values.shape[1])
    if not binary:
        raise ValueError("abs_covariance needs 0/1 bits")
    cols = np.nonzero((ones > 0) & (ones < n))[0]
    ones, m = ones[cols], len(cols)
    packed = np.zeros((m + (-m) % TILE, every.shape[1]), np.uint64)
    packed[:m] = every[cols]
    padded = np.pad(ones, (0, len(packed) - m)).astype(np.float64)
    abs_total, signed, positive, negative = _covariance_signs(packed, padded, n)
    # the diagonal (a bit's own variance, numerator n_j·(n − n_j) > 0) is no pair: taken out
    diagonal, own = np.arange(m), ones * (n - ones)
    positive[diagonal, diagonal // 64] &= ~np.left_shift(np.uint64(1), (diagonal % 64).astype(np.uint64))
    tie_bit, tie, dense = _tie_lists(positive, negative, m)
    slot = np.full(m, -1, np.int64)
    slot[dense] = np.arange(len(dense))
    p_sign = np.zeros(values.shape[1])
    p_sign[cols] = (signed[:m] - ones) / n
    return PackedSigns(
        abs_sum=float(abs_total - own.sum()) / max(1, n * (n - 1)),  # one row: no pair varies, 0
        p_sign=torch.from_numpy(p_sign),
        cols=cols,
        positive=positive[:m],
        negative=negative[dense],
        slot=slot,
        tie_start=np.concatenate([[0], np.cumsum(np.bincount(tie_bit, minlength=m))]),
        tie=tie,
    )
