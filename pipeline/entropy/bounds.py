"""An upper bound on the entropy of a binary code tighter than Σ_j H_b(p̂_j): the Chow–Liu tree.

For any tree T over the bits, H(b) ≤ Σ_j H(b_j) − Σ_{(j,k)∈T} I(b_j; b_k), with equality when the
code's dependence is a tree; the maximum-weight spanning tree on pairwise mutual information gives
the tightest such bound. Pairwise statistics come from one integer GEMM of the bits (BᵀB) per group.
A forest over a subset of the bits is a bound too: bits outside the subset enter by their marginal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bae.common.stats import binary_entropy
from bae.pipeline.entropy.joint import LN2


def _clogc(c: Any) -> np.ndarray:
    """c ln c elementwise with 0 ln 0 = 0."""
    c = np.asarray(c, dtype=float)
    return c * np.log(np.maximum(c, 1.0))


_TABLE_MAX_N = 2**22


def _cell_table(n: int) -> np.ndarray:
    """tab[c] = c ln c - [c > 0]/2 for c = 0..n (per-cell plug-in + MM terms)."""
    c = np.arange(n + 1, dtype=float)
    tab = _clogc(c) - 0.5
    tab[0] = 0.0
    return tab


def pair_mi_block(n: int, ones: np.ndarray, pairs_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Miller-Madow-corrected, clipped MI (bits) between bits ``rows`` and all bits.

    From the 2x2 tables n11 = pairs[j,k], n10 = ones[j]-n11, n01 = ones[k]-n11,
    n00 = n - ones[j] - ones[k] + n11.  MM correction: -(occupied cells - occupied
    rows - occupied cols + 1) / (2 n ln 2).  Returns float [len(rows), m], 0 on the
    diagonal.
    """
    ones_i = np.asarray(ones, dtype=np.int64)
    o, oj = ones_i[None, :], ones_i[rows][:, None]
    c11 = np.asarray(pairs_rows, dtype=np.int64)
    # per cell: c ln c - [c > 0] / 2 (MM), via a lookup table when n is moderate
    tab = _cell_table(n) if n <= _TABLE_MAX_N else None
    t = np.full(c11.shape, float(_clogc(n)) - 0.5)  # n ln n and the MM '+1'/2
    for c in (c11, oj - c11, o - c11, (n - oj) - o + c11):
        if tab is not None:
            t += np.take(tab, c)
        else:
            cf = c.astype(float)
            t += cf * np.log(np.maximum(cf, 1.0)) - 0.5 * (cf > 0)
    row_part = _clogc(oj) + _clogc(n - oj) - 0.5 * ((oj > 0).astype(float) + (oj < n))
    col_part = _clogc(o) + _clogc(n - o) - 0.5 * ((o > 0).astype(float) + (o < n))
    t -= row_part + col_part  # now t = n * MI_MM (nats)
    mi = np.maximum(t / (n * LN2), 0.0)
    mi[np.arange(len(rows)), rows] = 0.0
    return mi


def mi_matrix(n: int, ones: np.ndarray, pairs: np.ndarray, block: int = 64) -> np.ndarray:
    """Full [m, m] float32 matrix of corrected pairwise MI (bits), row blocks."""
    m = int(np.size(ones))
    w = np.empty((m, m), dtype=np.float32)
    for s in range(0, m, block):
        rows = np.arange(s, min(s + block, m))
        w[rows] = pair_mi_block(n, ones, pairs[s : s + rows.size], rows)
    return w


def max_spanning_tree(n_nodes: int, weight_row: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Prim's algorithm, O(m^2) time, O(m) extra memory, no per-step allocation.

    ``weight_row(v)`` returns the weights from node v to all nodes.  Returns
    (edges int [m-1, 2] as (parent, child), weights [m-1]).  Zero-weight edges are
    kept (harmless: they subtract nothing from the bound).
    """
    m = int(n_nodes)
    out_tree = np.ones(m, dtype=bool)
    best = np.full(m, -np.inf)
    parent = np.zeros(m, dtype=np.int64)
    upd = np.empty(m, dtype=bool)
    edges, weights = np.empty((max(m - 1, 0), 2), np.int64), np.empty(max(m - 1, 0))
    v = 0
    for i in range(m):
        out_tree[v] = False
        if i > 0:
            edges[i - 1] = (parent[v], v)
            weights[i - 1] = best[v]
        best[v] = -np.inf
        if i == m - 1:
            break
        w = weight_row(v)
        np.greater(w, best, out=upd)
        upd &= out_tree
        np.copyto(best, w, where=upd)
        np.copyto(parent, v, where=upd)
        v = int(np.argmax(best))
        if not out_tree[v]:  # all remaining best are -inf (cannot happen for w>=0)
            v = int(np.flatnonzero(out_tree)[0])
    return edges, weights


def chow_liu_bound(
    n: int, ones: np.ndarray, pairs: np.ndarray, marginal_bits: float | None = None
) -> tuple[float, dict[str, Any]]:
    """Upper bound on the joint entropy: sum_j H_b(p_j) - sum_{tree} I(b_j; b_k).

    ``ones`` int [m] and ``pairs`` int [m, m] (= B^T B) may cover a SUBSET of the
    bits: pass ``marginal_bits`` = sum of H_b over ALL bits (otherwise the sum over
    the m given bits is used); bits outside the subset are isolated nodes of the
    forest.  Edge weights are Miller-Madow-corrected MI clipped at 0.  Marginals are
    plug-in.  Memory: pairs (int32 suffices if n < 2**31) + a float32 [m, m] MI
    matrix, i.e. 8 m^2 bytes (512 MiB at m = 8192).
    """
    ones = np.asarray(ones)
    m = int(ones.size)
    if pairs.shape != (m, m):
        raise ValueError("pairs must be [m, m] with m = len(ones)")
    if n <= 0:
        raise ValueError("n must be positive")
    marg_subset = float(binary_entropy(ones / n).sum())
    marg = marg_subset if marginal_bits is None else float(marginal_bits)
    W = mi_matrix(n, ones, pairs)
    edges, w = max_spanning_tree(m, lambda v: W[v])
    tree_mi = float(w.sum())
    bound = max(marg - tree_mi, 0.0)
    return bound, {
        "marginal_bits": marg,
        "marginal_bits_subset": marg_subset,
        "tree_mi_bits": tree_mi,
        "edges": edges,
        "edge_mi_bits": w,
    }


def pair_bits_for(n_bits: int, m: int, sample: Callable[[], tuple[np.ndarray, int]]) -> tuple[int, ...]:
    """The bits whose pairwise statistics the bound uses: all ``n_bits`` when at most ``m``, else the
    ``m`` of highest marginal entropy in ``sample()`` = (rows with each bit set, rows), ascending (a
    deterministic choice; any subset gives a valid bound)."""
    if m == 0:
        return ()
    if n_bits <= m:
        return tuple(range(n_bits))
    ones, n = sample()
    entropy = binary_entropy(ones / max(n, 1))
    return tuple(sorted(int(i) for i in np.argsort(-entropy, kind="stable")[:m]))
