"""``split_search.best_split`` against the same search written as dense torch products."""

from __future__ import annotations

import math

import pytest
import torch

from bae.trainer.objectives import bit_cost
from bae.trainer.split_search import RESEED_CANDIDATES, RESEED_MARGIN, best_split


def dense_best_split(x: torch.Tensor, residual: torch.Tensor, beta: float, variance: float, bias: bool):
    """Every candidate scored at once in float64: [n, c] projections, [c, d] means."""
    n, r, xd = len(x), residual.double(), x.double()
    err = r.pow(2).sum(1)
    half = err.argsort(descending=True, stable=True)[: max(n // 2, 1)]  # ties: lower row first
    rows = half[torch.linspace(0, len(half) - 1, min(RESEED_CANDIDATES, len(half))).round().long()]
    u = r[rows] / err[rows].sqrt()[:, None]
    proj = xd @ u.T
    t = 0.5 * (proj[rows, torch.arange(len(rows))] + proj.median(dim=0).values)
    fire = proj > t
    m = fire.sum(0).double()
    on_sum, total = fire.double().T @ r, r.sum(0)
    on = on_sum / m.clamp_min(1)[:, None]
    off = (total - on_sum) / (n - m).clamp_min(1)[:, None] if bias else torch.zeros_like(on)
    between = m * on.pow(2).sum(1) + (n - m) * off.pow(2).sum(1) - (total.pow(2).sum() / n if bias else 0)
    net = between / (n * variance) - RESEED_MARGIN * beta * bit_cost(m / n)
    net = torch.where((m > 0) & (m < n), net, torch.full_like(net, -math.inf))
    c = int(net.argmax())
    return None if not float(net[c]) > 0 else (u[c], float(t[c]), fire[:, c], on[c], off[c])


def batch(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows made of sparse features plus noise, and the residual of a crude reconstruction."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(12, d, generator=g) * 2
    on = torch.rand(n, 12, generator=g) < 0.15
    x = on.float() @ features + 0.3 * torch.randn(n, d, generator=g)
    return x, x - 0.5 * x.mean(0) - 0.2 * on[:, :3].float() @ features[:3]


@pytest.mark.parametrize(
    ("n", "d", "bias", "seed", "beta"),
    [(301, 24, True, 0, 1e-3), (256, 40, False, 1, 1e-3), (64, 7, True, 2, 1e-2), (2, 3, True, 3, 1e-4)],
)
def test_a_run_of_seeds_is_the_dense_searchs(n: int, d: int, bias: bool, seed: int, beta: float) -> None:
    """Seed after seed on one residual, as the re-seed does: the same bits, to float tolerance."""
    x, residual = batch(n, d, seed)
    variance = float(x.var(0).sum())
    seeds = 0
    for _ in range(40):
        got, want = (
            best_split(x, residual, beta, variance, bias),
            dense_best_split(x, residual, beta, variance, bias),
        )
        assert (got is None) == (want is None)
        if got is None or want is None:
            break
        assert torch.equal(got[2], want[2])
        assert got[1] == pytest.approx(want[1], rel=1e-5, abs=1e-5)
        for a, b in ((got[0], want[0]), (got[3], want[3]), (got[4], want[4])):
            assert a.dtype == torch.float32 and torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5)
        residual.sub_(torch.where(got[2][:, None], got[3], got[4]))
        seeds += 1
    assert seeds >= (1 if n < 10 else 5)


def test_broad_candidates_are_summed_over_the_rows_they_leave_out() -> None:
    """Residuals opposite to their rows put a candidate's own projection below the median, so it
    fires on most rows (summed through its complement): the choice is still the dense one's."""
    x, _ = batch(200, 16, 3)
    residual = -x
    got, want = best_split(x, residual, 1e-3, 1.0, True), dense_best_split(x, residual, 1e-3, 1.0, True)
    assert got is not None and want is not None and torch.equal(got[2], want[2])
    assert int(got[2].sum()) > 100
