"""Entropy estimates from per-group bit counts (BAE_METHOD.md §3).

Ĥ(S) = Σ_j H_b(p̂_j) with p̂_j the fraction of rows of the set S with bit j set; reported beside the
log2 |S| ceiling, the number of bits that vary in S, an optional bootstrap interval, and, for short
codes, the plug-in entropy of whole codes (a lower bound-side cross-check: Σ_j H_b ≥ joint entropy).
"""

from __future__ import annotations

import numpy as np

from bae.pipeline.entropy.counts import GroupCounts


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H_b(p) in bits, elementwise, with 0·log 0 = 0."""
    p = np.asarray(p, np.float64)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return np.maximum(h, 0.0)


def set_entropy(ones: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Σ_j H_b(ones_j / rows): [..., G, bits] and [..., G] -> [..., G] (NaN where rows = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = ones / rows[..., None]
    h = binary_entropy(np.nan_to_num(p)).sum(-1)
    return np.where(rows > 0, h, np.nan)


def joint_entropy(counts: GroupCounts) -> np.ndarray:
    """Plug-in entropy of whole codes per group, in bits: −Σ_c (n_c/n) log2 (n_c/n)."""
    group = np.searchsorted(counts.keys, counts.codes[:, 0])
    p = counts.codes[:, 2] / counts.rows[group]
    return np.bincount(group, weights=-p * np.log2(p), minlength=len(counts.keys))


def bootstrap_interval(counts: GroupCounts, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of Ĥ over the Poisson-bootstrap replicates, per group."""
    replicates = set_entropy(counts.boot_ones, counts.boot_rows)  # [B, G]
    tail = 50.0 * (1.0 - confidence)
    low, high = np.nanpercentile(replicates, [tail, 100.0 - tail], axis=0)
    return low, high


def estimate_columns(counts: GroupCounts, confidence: float) -> dict[str, np.ndarray]:
    """Per group: n, Ĥ, the log2 n ceiling, bits that vary, and the optional CI and joint columns."""
    columns = {
        "n": counts.rows,
        "entropy_bits": set_entropy(counts.ones, counts.rows),
        "ceiling_bits": np.log2(counts.rows),
        "varying_bits": ((counts.ones > 0) & (counts.ones < counts.rows[:, None])).sum(1),
        "code_bits": np.full(len(counts.keys), counts.ones.shape[1]),
    }
    if counts.boot_rows is not None:
        columns["ci_low"], columns["ci_high"] = bootstrap_interval(counts, confidence)
    if counts.codes is not None:
        columns["joint_entropy_bits"] = joint_entropy(counts)
    return columns
