"""The search behind every re-seeded bit: the candidate direction that splits a residual best.

The re-seed, the split and the join (``pruning.BitMoves``) each ask ``best_split`` for the new bit
that most lowers the batch objective on a residual R [n, d]; a merge asks ~500 times, one seed
after another. The two products of a call (the rows' projections on 64 candidate directions) run
in torch; everything else — the residual norms and their ranking, the candidates' directions, the
medians, the fired rows, the between-group sums of squares and the choice — is one pass each of
two compiled kernels, on the CPU (a GPU's tensors come over and go back: a few KiB of results for
~30 small operations that would each be a launch). Sums over the fired rows are taken over the
smaller of the fired rows and the others (most candidates fire on one or a few rows), in float64;
the medians are numpy's partition (numba's took 9× as long).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from bae.trainer.objectives import bit_cost

RESEED_MARGIN = 2.0  # a re-seeded bit must buy twice its cost on the batch
RESEED_CANDIDATES = 64  # rows whose residual directions are tried for each re-seeded bit

Seed = tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, torch.Tensor]


def candidate_ranks(n: int) -> np.ndarray:
    """The ranks (largest residual norm first) of the ``RESEED_CANDIDATES`` candidate rows among
    ``n``: evenly spaced over the upper half."""
    half = max(n // 2, 1)
    return np.rint(np.linspace(0, half - 1, min(RESEED_CANDIDATES, half))).astype(np.int64)


@njit(cache=True, fastmath=True)  # the norms' sums vectorized: they only rank the rows
def _directions(residual: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """(rows, their residuals normalized [c, d]) of the rows at ``ranks`` by residual norm."""
    n, d = residual.shape
    err = np.empty(n)
    for i in range(n):
        acc = 0.0
        for j in range(d):
            acc += float(residual[i, j]) ** 2
        err[i] = acc
    rows = np.argsort(-err, kind="mergesort")[ranks]
    u = np.empty((len(rows), d), np.float32)
    for q in range(len(rows)):
        scale = 1.0 / max(math.sqrt(err[rows[q]]), 1e-30)
        for j in range(d):
            u[q, j] = residual[rows[q], j] * scale
    return rows, u


@njit(cache=True)
def _side_sums(
    residual: np.ndarray, p: np.ndarray, t: float, fired: bool, out: np.ndarray
) -> int:  # pragma: no cover
    """out = Σ residual rows where (p > t) == ``fired``, in float64; returns how many rows."""
    out[:] = 0.0
    count = 0
    for i in range(len(p)):
        if (p[i] > t) == fired:
            count += 1
            for j in range(len(out)):
                out[j] += residual[i, j]
    return count


@njit(cache=True)
def _choose(
    proj: np.ndarray,
    medians: np.ndarray,
    rows: np.ndarray,
    residual: np.ndarray,
    bias: bool,
    penalty: np.ndarray,
    scale: float,
) -> tuple[int, float, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The candidate (a row of ``proj`` [c, n], the rows' projections on its direction) with the
    largest net gain: its between-group sum of squares / ``scale`` − ``penalty`` at its count.
    A candidate fires where the projection passes halfway from its lower median (``medians``) to
    its own row's. Returns (candidate or −1 when no net gain is positive, threshold, fire [n],
    on-mean, off-mean)."""
    c, n = proj.shape
    d = residual.shape[1]
    total, part = np.zeros(d), np.zeros(d)
    _side_sums(residual, np.ones(n), 0.0, True, total)
    total_sq = 0.0
    for j in range(d):
        total_sq += total[j] * total[j]
    best, best_net, best_t = -1, 0.0, 0.0
    for q in range(c):
        p = proj[q]
        t = 0.5 * (float(p[rows[q]]) + float(medians[q]))
        m = 0
        for i in range(n):
            if p[i] > t:
                m += 1
        if m == 0 or m == n:
            continue
        small = m <= n - m  # sum the smaller side: the fired rows or the others
        _side_sums(residual, p, t, small, part)
        on_sq = rest_sq = 0.0
        for j in range(d):
            on_j = part[j] if small else total[j] - part[j]
            on_sq += on_j * on_j
            rest_sq += (total[j] - on_j) ** 2
        between = on_sq / m
        if bias:
            between += rest_sq / (n - m) - total_sq / n
        net = between / scale - penalty[m]
        if net > best_net:
            best, best_net, best_t = q, net, t
    fire = np.zeros(n, np.bool_)
    on, off = np.zeros(d, np.float32), np.zeros(d, np.float32)
    if best < 0:
        return best, best_t, fire, on, off
    m = _side_sums(residual, proj[best], best_t, True, part)
    for i in range(n):
        fire[i] = proj[best, i] > best_t
    for j in range(d):
        on[j] = part[j] / m
        if bias:
            off[j] = (total[j] - part[j]) / (n - m)
    return best, best_t, fire, on, off


def best_split(
    x: torch.Tensor, residual: torch.Tensor, beta: float, variance: float, bias: bool
) -> Seed | None:
    """The best new bit for ``residual`` [n, d], or None when none buys ``RESEED_MARGIN`` × β·cost(p).

    Candidates: the residual directions of the ``RESEED_CANDIDATES`` rows at evenly spaced ranks
    of the upper half of residual norms (the single worst row alone is, on sparse data, a row with
    several features on, whose split is an AND of them). A candidate u fires where x·u passes
    halfway from the median to its row's projection; its gain is the between-group sum of squares
    of the residual beyond a bias shift's (the least-squares fit of (bias shift, new column)).
    Rows of equal residual norm rank by index, candidates of equal net gain likewise. Returns (u,
    threshold, fire [n], on-mean, off-mean) of the candidate with the largest net gain, on the
    device of ``x``; None for a residual that is not finite.
    """
    n, device = len(x), x.device
    r = residual.detach().float().cpu().contiguous().numpy()
    if not np.isfinite(r).all():
        return None
    rows, u = _directions(r, candidate_ranks(n))
    proj = (torch.from_numpy(u).to(device) @ x.detach().float().T).cpu().contiguous().numpy()  # [c, n]
    counts = torch.arange(n + 1, dtype=torch.float64)
    penalty = (RESEED_MARGIN * beta * bit_cost(counts / n)).numpy()
    medians = np.partition(proj, (n - 1) // 2, axis=1)[:, (n - 1) // 2]  # lower medians (numpy's is faster)
    best, t, fire, on, off = _choose(proj, medians, rows, r, bias, penalty, n * variance)
    if best < 0:
        return None
    return (
        torch.from_numpy(u[best]).to(device),
        float(t),
        torch.from_numpy(fire).to(device),
        torch.from_numpy(on).to(device),
        torch.from_numpy(off).to(device),
    )


def subtract_seed(residual: torch.Tensor, seed: Seed) -> torch.Tensor:
    """``residual`` [n, d] less a seed's reconstruction, in place: its on-mean on the rows it
    fires on, its off-mean on the others (each element as ``r − on`` or ``r − off`` rounds it)."""
    _, _, fire, on, off = seed
    fired = fire.nonzero().squeeze(1)
    rows = residual.index_select(0, fired) - on
    return residual.sub_(off).index_copy_(0, fired, rows)
