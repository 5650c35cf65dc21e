"""The data's scale for the normalized objective: a robust centre, one global (or per-dimension)
scale, the training-space variance V, and the radius beyond which a row is atypical.

Rows with massive activations (attention-sink tokens: on SmolLM2 layer 15 the first token of each
document lies ~60 000× the median squared distance from the centre and carries 99% of the variance)
would otherwise set the scale and dominate every squared error. The mean and scale are
estimated on the rows with ‖x − c‖² ≤ ratio × q₉₀(‖x_i − c‖²) (c the coordinate-wise median, q₉₀ the
90th percentile over rows); then a row is *atypical* when its normalized squared norm
‖(x − mean)/std‖² exceeds ratio × its 90th percentile (the radius the model keeps), and V is the
variance of the typical rows (docs/method.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the reference distance: the 90th percentile, not the median, so that sparse data (most rows near
# the centre, a few with many features on) keeps its rows, and sinks up to 10% of rows still stand out
TYPICAL_QUANTILE = 0.9


@dataclass(frozen=True)
class DataScale:
    """``mean``/``std`` [d] to normalize with, ``variance`` V = E‖x_n − E x_n‖² of typical rows in the
    normalized space, and ``typical_radius`` (squared norm of a normalized row, None: no limit)."""

    mean: torch.Tensor
    std: torch.Tensor
    variance: float
    typical_radius: float | None
    per_dim_std: torch.Tensor  # [d] std of the typical normalized rows (what --encoder-scale divides by)


def estimate_scale(x: torch.Tensor, standardize: str, typical_ratio: float) -> DataScale:
    """The scale of rows ``x`` [n, d] for ``standardize`` global | dimension | none (rows kept in
    float32, every sum in float64)."""
    x = x.float()
    d = x.shape[1]
    keep = typical_rows(x, typical_ratio)
    mean, per_dim = _moments(x[keep])
    if standardize == "global":
        std = torch.full((d,), float(per_dim.sum() / d) ** 0.5, dtype=torch.float64)
    elif standardize == "dimension":
        std = std_or_one(per_dim, 1e-16)
    else:
        mean, std = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    if float(std.min()) <= 1e-8:
        std = torch.ones_like(std)
    norm = (x - mean.float()) / std.float()
    radius = None
    if typical_ratio and standardize != "none":
        # the model's own criterion, about the typical mean in the space it works in
        sq = norm.pow(2).sum(dim=1, dtype=torch.float64)
        radius = typical_ratio * float(sq.quantile(TYPICAL_QUANTILE))
        keep = sq <= radius
    per_norm = _moments(norm[keep])[1]
    variance = float(per_norm.sum())
    per_std = std_or_one(per_norm, 1e-16 * max(variance, 1e-300))
    return DataScale(mean.float(), std.float(), variance, radius, per_std.float())


def typical_rows(x: torch.Tensor, typical_ratio: float) -> torch.Tensor:
    """bool [n]: the rows of ``x`` [n, d] (float32) with ‖x − c‖² ≤ ratio × q₉₀(‖x_i − c‖²), c the
    coordinate-wise median (every row when ``typical_ratio`` is 0)."""
    if not typical_ratio:
        return torch.ones(len(x), dtype=torch.bool)
    dist = (x - x.median(dim=0).values).pow(2).sum(dim=1, dtype=torch.float64)
    return dist <= typical_ratio * dist.quantile(TYPICAL_QUANTILE)


def std_or_one(variance: torch.Tensor, floor: float) -> torch.Tensor:
    """Per-dimension standard deviations, 1 where the variance is at most ``floor`` (a dimension
    without variance is left as it is)."""
    return torch.where(variance > floor, variance.sqrt(), torch.ones_like(variance))


def identity_scale(d: int) -> DataScale:
    """No scaling, every row typical (the paper objective on raw states needs no data pass)."""
    return DataScale(torch.zeros(d), torch.ones(d), 1.0, None, torch.ones(d))


def _moments(x: torch.Tensor, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (biased) variance of rows ``x``, summed in float64 by blocks of rows
    (no float64 copy of the whole sample)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), rows):
        block = x[i : i + rows].double()
        total, total_sq = total + block.sum(dim=0), total_sq + block.pow(2).sum(dim=0)
    mean = total / len(x)
    return mean, (total_sq / len(x) - mean.pow(2)).clamp_min(0)
