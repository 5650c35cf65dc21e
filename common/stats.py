"""Numbers every stage reports the same way: binary entropy in bits and the fraction of variance
unexplained (FVU), computed from streaming sums."""

from __future__ import annotations

import numpy as np


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H_b(p) in bits, elementwise, with 0·log 0 = 0."""
    p = np.asarray(p, np.float64)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return np.maximum(h, 0.0)


FVU_DEFINITION = "raw space, typical valid rows: Σ‖x − x̂‖² / Σ‖x − mean(x)‖²"


def fvu_from_sums(sse: float, x_sum: np.ndarray, x_sq: np.ndarray, rows: int) -> float:
    """FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖², from the squared error and float64 per-dimension sums.

    The one FVU of the project (``FVU_DEFINITION``): raw hidden states, the rows a stage evaluates
    less the checkpoint's atypical ones; the denominator is the total variance of those rows around
    their own mean, summed over dimensions (not a per-dimension average).
    """
    variance = float((np.asarray(x_sq) - np.asarray(x_sum) ** 2 / max(rows, 1)).sum())
    return sse / max(variance, 1e-30)
