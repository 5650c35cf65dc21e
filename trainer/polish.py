"""The polish: after the last step, the objective minimized over hard codes by alternation.

Gradient training with the moves of ``bae.trainer.pruning`` can end in a code that the objective
itself scores far worse than the code that generated the data (docs/method.md §7): true bits
covered by ANDs of two others, thresholds off by a few percent of rows. The polish takes the
trained code on a sample of training rows and repeats, for at most ``POLISH_ROUNDS`` rounds:

1. the decoder as the least-squares fit of the rows on the bits (with the decoder bias);
2. each row's bits reassigned one bit at a time, in order, to whichever value lowers that row's
   squared error given the others and the decoder (Gauss–Seidel; a compiled pass over the rows);
3. each bit's encoder row refitted as the linear discriminant Σ⁻¹(μ₁ − μ₀) of the encoder's input
   (Σ its covariance over the rows, μ₁ and μ₀ the means where the reassigned bit is on and off),
   with the threshold that agrees with the reassigned bit on the most rows — so the bits stay one
   linear threshold of the row each, what the model can encode;
4. the bits that no longer vary dropped, then one at a time the bit whose removal lowers
   L = FVU + β·S most, its cost from the least-squares fit exactly (‖c_j‖² / (G⁻¹)_jj, G the
   normal matrix), while one does;
5. when a round of 1–4 does not lower L: one bit added in a free slot instead, the better of two
   candidates where it lowers L by more than its own cost β·cost(p) (it buys twice its cost, as a
   re-seed must: a split of the noise's largest direction can buy it once) — the re-seed's search
   (``bae.trainer.split_search.best_split``) and the two halves of the residual's first principal
   direction, read by its linear discriminant (a feature the code misses entirely whose share is
   below the noise's in every row, which the search, led by single rows, does not see). Grown
   only then: grown early, a bit can lock in a tangle the rounds would have undone.

Each kept round or grown bit must lower L on the rows; when neither does, the polish ends. What it
cannot undo: a feature split into exclusive fragments (an AND and an AND-NOT of it with another
bit) is a fixed point of these steps — the join, a move during training, replaces such groups. The
model is written only when some round was kept: encoder rows (at their former norms) and biases
of the kept bits, the least-squares decoder, the other bits switched off. Deterministic in the
weights and the rows (a killed run redoes it identically). It runs on the CPU, in float64 where it
solves and float32 where it sweeps the rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch
from numba import njit

from bae.trainer.merge import switch_off
from bae.trainer.models import Autoencoder
from bae.trainer.objectives import bit_cost
from bae.trainer.pruning import switched_off
from bae.trainer.split_search import best_split

POLISH_ROUNDS = 10
IMPROVEMENT = 1e-6  # a round must lower L by this much (relative) to be kept


@dataclass(frozen=True)
class PolishReport:
    """What the polish did: rounds kept, varying bits and L on its rows before and after."""

    rounds: int
    bits_before: int
    bits_after: int
    objective_before: float
    objective_after: float
    seconds: float

    def metrics(self) -> dict[str, float | int]:
        return {
            "polish_rounds": self.rounds,
            "polish_seconds": self.seconds,
            "polish_bits_before": self.bits_before,
            "polish_bits_after": self.bits_after,
            "polish_objective_before": self.objective_before,
            "polish_objective_after": self.objective_after,
        }


@dataclass(frozen=True)
class Code:
    """A hard code on the polish's rows: its bits [n, m] (float32), the model slots they sit in,
    and, once refitted, their encoder directions [m, d] and thresholds on the encoder's input."""

    bits: torch.Tensor
    slots: torch.Tensor
    directions: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None

    def take(self, keep: torch.Tensor) -> Code:
        """The bits at column indices ``keep``."""
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        return Code(self.bits[:, keep], self.slots[keep], pick(self.directions), pick(self.thresholds))


class LeastSquares:
    """The decoder fitted to a code: x ≈ B·C (+ c₀), in float64; ``inverse`` is (AᵀA)⁻¹, A = [B 1].
    Dropped bits keep their place (zero rows, ``kept`` False) so that a drop is one rank-one
    update, not a copy."""

    def __init__(self, bits: torch.Tensor, x: torch.Tensor, intercept: bool):
        a = bits.double()
        if intercept:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        gram = a.T @ a
        gram.diagonal().add_(1e-9 * float(gram.diagonal().mean().clamp_min(1.0)))
        self.inverse = torch.linalg.inv(gram)
        self.coef = self.inverse @ (a.T @ x.double())
        self.m = bits.shape[1]
        self.kept = torch.ones(self.m, dtype=torch.bool)
        self.intercept = intercept

    @property
    def columns(self) -> torch.Tensor:
        """The decoder columns of the bits [m, d] (zero for dropped ones)."""
        return self.coef[: self.m]

    @property
    def bias(self) -> torch.Tensor:
        return self.coef[self.m] if self.intercept else torch.zeros_like(self.coef[0])

    def removal_costs(self) -> torch.Tensor:
        """The rise of the summed squared error when bit j is dropped and the rest refitted (∞ for
        dropped bits)."""
        diag = self.inverse.diagonal()[: self.m]
        cost = self.columns.pow(2).sum(1) / torch.where(self.kept, diag, 1.0)
        return cost.masked_fill(~self.kept, math.inf)

    def drop(self, j: int) -> None:
        """Refit without bit j: the normal matrix's inverse downdated (Schur complement), no solve."""
        col = self.inverse[:, j].clone()
        pivot = float(col[j])
        self.coef.addr_(col, self.coef[j].clone(), alpha=-1.0 / pivot)
        self.inverse.addr_(col, col, alpha=-1.0 / pivot)
        self.inverse[j, :] = 0
        self.inverse[:, j] = 0
        self.coef[j] = 0
        self.kept[j] = False


@dataclass(frozen=True)
class Polisher:
    """The rows [n, d] (normalized), the encoder's input on them (x / ``input_scale``), the
    objective's β and V, and the model's number of bits (slots a grown bit may take)."""

    x: torch.Tensor
    u: torch.Tensor
    input_scale: torch.Tensor
    beta: float
    variance: float
    intercept: bool
    n_bits: int

    def objective(self, code: Code, fit: LeastSquares) -> float:
        """L = FVU + β·S of the code with the least-squares decoder ``fit`` on the rows."""
        recon = code.bits.double() @ fit.columns + fit.bias
        fvu = float((self.x.double() - recon).pow(2).sum()) / (len(self.x) * self.variance)
        return fvu + self.beta * float(bit_cost(code.bits.double().mean(0)).sum())

    def reassign(self, bits: torch.Tensor, fit: LeastSquares) -> torch.Tensor:
        """Each row's bits, one at a time in order, set to the value with the lower squared error
        given the others: bit j is on where 2·r_off·w_j > ‖w_j‖², r_off the row's residual without
        it. The residual's projections on the columns (R·Wᵀ) are updated through the columns' Gram
        matrix after each change."""
        w = fit.columns.float()
        proj = (self.x - (bits @ w + fit.bias.float())) @ w.T
        out = bits.to(torch.uint8, copy=True).numpy()  # the pass writes into it
        _reassign(out, proj.numpy(), (w @ w.T).numpy())
        return torch.from_numpy(out).float()

    def refit_encoder(self, code: Code) -> Code | None:
        """Each varying bit's linear discriminant on the encoder's input and the threshold agreeing
        with it on the most rows, and the bits those give (the constant bits dropped; None when
        none varies)."""
        n = len(code.bits)
        on = code.bits.sum(0)
        code = code.take(((on > 0) & (on < n)).nonzero().squeeze(1))
        if code.bits.shape[1] == 0:
            return None
        b, u = code.bits, self.u
        total = u.double().sum(0)
        on_sum = b.double().T @ u.double()
        on_n = b.double().sum(0)[:, None]
        gap = on_sum / on_n - (total - on_sum) / (n - on_n)
        centred = u.double() - total / n
        directions = gap @ torch.linalg.pinv(centred.T @ centred / n, hermitian=True)
        proj = directions.float() @ u.T  # [m, n]: each bit's projections contiguous for the sort
        sorted_proj, order = proj.sort(dim=1, stable=True)
        target = b.T.gather(1, order)
        zero = torch.zeros(target.shape[0], 1, dtype=target.dtype)
        # the threshold between sorted rows k − 1 and k: ones below it and zeros above it disagree
        ones_below = torch.cat([zero, target.cumsum(1)], 1)
        zeros_above = (1 - target).sum(1, keepdim=True) - torch.cat([zero, (1 - target).cumsum(1)], 1)
        k = (ones_below + zeros_above).argmin(1)
        low = sorted_proj.gather(1, (k - 1).clamp(0, n - 1)[:, None])[:, 0]
        high = sorted_proj.gather(1, k.clamp(0, n - 1)[:, None])[:, 0]
        thresholds = torch.where(k == 0, low - 1, torch.where(k == n, high + 1, (low + high) / 2))
        return Code((proj > thresholds[:, None]).T.float(), code.slots, directions.float(), thresholds)

    def prune(self, code: Code) -> tuple[Code, LeastSquares]:
        """Drop, one at a time, the bit whose removal lowers L most, while one does."""
        fit = LeastSquares(code.bits, self.x, self.intercept)
        cost = self.beta * bit_cost(code.bits.double().mean(0))
        scale = len(self.x) * self.variance
        while bool(fit.kept.any()):
            gain = cost - fit.removal_costs() / scale
            j = int(gain.argmax())
            if float(gain[j]) <= 0:
                break
            fit.drop(j)
        if bool(fit.kept.all()):
            return code, fit
        kept = code.take(fit.kept.nonzero().squeeze(1))
        # solved afresh rather than compacted: the downdates' rounding does not carry into later rounds
        return kept, LeastSquares(kept.bits, self.x, self.intercept)

    def grow(self, code: Code, fit: LeastSquares) -> tuple[Code, LeastSquares]:
        """Add one bit in the first free slot where that lowers L most, else keep the code. Two
        candidates: the re-seed's best new bit for the residual (``best_split``, which looks along
        the residual directions of badly reconstructed rows), and the split of the residual's
        first principal direction into its two means' halves (a feature the code misses entirely
        but whose share is below the noise's in every row), read by its linear discriminant."""
        free = torch.ones(self.n_bits, dtype=torch.bool)
        free[code.slots] = False
        if code.directions is None or code.thresholds is None or not bool(free.any()):
            return code, fit  # the polish's codes always have their encoder rows
        slot = free.nonzero()[:1, 0]
        residual = self.x - (code.bits @ fit.columns.float() + fit.bias.float())
        candidates = []
        seed = best_split(self.x, residual, self.beta, self.variance, self.intercept)
        if seed is not None:
            direction = (seed[0] * self.input_scale)[None]
            threshold = torch.tensor([seed[1]], dtype=code.thresholds.dtype)
            candidates.append(Code(seed[2].float()[:, None], slot, direction, threshold))
        principal = self.refit_encoder(Code(principal_split(residual)[:, None], slot))
        if principal is not None:
            candidates.append(principal)
        best = (self.objective(code, fit), code, fit)
        for new in candidates:
            grown = Code(
                torch.cat([code.bits, new.bits], 1),
                torch.cat([code.slots, new.slots]),
                torch.cat([code.directions, cast(torch.Tensor, new.directions)]),
                torch.cat([code.thresholds, cast(torch.Tensor, new.thresholds)]),
            )
            grown_fit = LeastSquares(grown.bits, self.x, self.intercept)
            # as a re-seed, the new bit must buy twice its cost: a split of the noise's largest
            # direction can buy it once (measured on the d = 32 calibration sets, docs/method.md §7)
            margin = self.beta * float(bit_cost(new.bits.double().mean()))
            value = self.objective(grown, grown_fit)
            if value + margin < best[0]:
                best = (value, grown, grown_fit)
        return best[1], best[2]

    def round(self, code: Code, fit: LeastSquares) -> tuple[Code, LeastSquares] | None:
        """One round from ``code`` and its fit: reassign, refit the encoder, prune (None: no bit
        left)."""
        refit = self.refit_encoder(replace(code, bits=self.reassign(code.bits, fit)))
        return None if refit is None else self.prune(refit)


@torch.no_grad()
def polish(
    model: Autoencoder,
    x: torch.Tensor,
    beta: float,
    variance: float,
    optimizer: torch.optim.Optimizer | None = None,
) -> PolishReport:
    """Polish ``model``'s code on the rows ``x`` (normalized, typical) at the objective's β and V,
    in place (module docstring); the report says what it did."""
    start = time.perf_counter()
    encoder, decoder = model.encoder, model.decoder
    if encoder.bias is None or len(x) < 2 or beta <= 0:
        raise ValueError("the polish needs an encoder bias, rows and β > 0")
    u = model.encoder_input(x)
    bits = model.bits_of(encoder(u)).cpu()
    off = torch.zeros(model.n_bits, dtype=torch.bool)
    off[switched_off(model).cpu()] = True
    varying = (~off & bits.any(0) & ~bits.all(0)).nonzero().squeeze(1)
    scale = model.encoder_input_scale if model.config.encoder_scale else torch.ones(x.shape[1])
    polisher = Polisher(
        x.float().cpu(),
        u.float().cpu(),
        scale.float().cpu(),
        beta,
        variance,
        decoder.bias is not None,
        model.n_bits,
    )
    assert encoder.bias is not None
    rows = encoder.weight[varying.to(encoder.weight.device)].detach().float().cpu()
    thresholds = -encoder.bias[varying.to(encoder.weight.device)].detach().float().cpu()
    code = Code(bits[:, varying].float(), varying, rows, thresholds)
    fit = LeastSquares(code.bits, polisher.x, polisher.intercept)
    before = best = polisher.objective(code, fit)
    kept = 0
    for _ in range(POLISH_ROUNDS):
        # a round, or when it does not pay, a grown bit (module docstring, step 5)
        for move in (polisher.round, polisher.grow):
            step = move(code, fit)
            value = math.inf if step is None else polisher.objective(*step)
            if value < best - IMPROVEMENT * abs(best):
                break
        else:
            break
        assert step is not None
        (code, fit), best, kept = step, value, kept + 1
    if kept:
        write_code(model, code, fit, optimizer)
    return PolishReport(kept, len(varying), code.bits.shape[1], before, best, time.perf_counter() - start)


def write_code(
    model: Autoencoder, code: Code, fit: LeastSquares, optimizer: torch.optim.Optimizer | None
) -> None:
    """Make the model encode ``code`` and decode with ``fit``: each kept slot's encoder row along its
    direction at the row's former norm (a grown bit's at the others' median), bias at its
    threshold; decoder columns and bias from the fit; every other bit switched off."""
    encoder, decoder = model.encoder, model.decoder
    assert encoder.bias is not None and code.directions is not None and code.thresholds is not None
    device, dtype = encoder.weight.device, encoder.weight.dtype
    slots = code.slots.to(device)
    norms = encoder.weight[slots].double().norm(dim=1).cpu()
    if bool((norms == 0).any()):  # a grown bit's slot was switched off: the working rows' median
        working = norms[norms > 0]
        norms[norms == 0] = working.median() if len(working) else 1.0
    scale = norms / code.directions.double().norm(dim=1).clamp_min(1e-30)
    encoder.weight[slots] = (code.directions.double() * scale[:, None]).to(device, dtype)
    encoder.bias[slots] = (-code.thresholds.double() * scale).to(device, dtype)
    decoder.weight[:, slots] = fit.columns.T.to(device, dtype)
    if decoder.bias is not None:
        decoder.bias.copy_(fit.bias.to(device, dtype))
    others = torch.ones(model.n_bits, dtype=torch.bool, device=device)
    others[slots] = False
    others[switched_off(model)] = False  # already off
    rest = others.nonzero().squeeze(1).tolist()
    if rest:
        switch_off(encoder, decoder, rest, optimizer)


def principal_split(residual: torch.Tensor) -> torch.Tensor:
    """The rows [n] (float 0/1) on the upper side of the residual's first principal direction, cut
    where the two sides' means are furthest apart (the largest between-group sum of squares)."""
    r = residual.double()
    r = r - r.mean(0)
    direction = torch.linalg.eigh(r.T @ r)[1][:, -1]
    proj = r @ direction
    values, order = proj.sort()
    n = len(values)
    k = torch.arange(1, n, dtype=values.dtype)
    below = values.cumsum(0)[:-1]
    between = below.pow(2) / k + below.pow(2) / (n - k)  # the total is 0: the other side sums to −below
    cut = int(between.argmax()) + 1
    bits = torch.zeros(n, dtype=torch.float32)
    bits[order[cut:]] = 1
    return bits


@njit(cache=True)
def _reassign(bits: np.ndarray, proj: np.ndarray, gram: np.ndarray) -> None:
    """``Polisher.reassign``'s pass, row by row, in place: ``bits`` [n, m] (0/1), ``proj`` [n, m]
    the residual's projections R·Wᵀ, ``gram`` [m, m] = W·Wᵀ. A change of bit j moves the later
    bits' projections by −Δ·(w_j·w_k)."""
    n, m = bits.shape
    for i in range(n):
        for j in range(m):
            b = bits[i, j]
            norm = gram[j, j]
            on = 1 if 2.0 * (proj[i, j] + b * norm) > norm else 0
            if on != b:
                delta = np.float32(on - b)
                bits[i, j] = on
                for k in range(j + 1, m):
                    proj[i, k] -= delta * gram[j, k]
