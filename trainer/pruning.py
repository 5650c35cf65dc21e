"""Pruning, re-seeding and splitting bits: moves of the normalized objective that its gradient cannot make.

The step's surrogate gradient only reaches rows near a bit's threshold, so a bit that fires with
confidence on the wrong rows is never turned off, and a bit that never fires is never pointed at
what the code misses. Measured on synthetic sets (docs/method.md §7): without these moves a sparse
truth is covered by OR-like fragments of its bits that the entropy term cannot remove. The moves
test a bit against the objective itself, FVU against β times its code bits (docs/method.md §3):

- ``BitMoves.prune``: greedily switch off the bit whose removal raises the batch FVU by less than
  β·cost(p), its mean contribution p·w moved into the decoder bias, re-scoring the others after
  each removal (from sums over rows, so processes reduce them once and take the same decisions);
- ``BitMoves.reseed``: point a switched-off bit at what the code misses: of 64 candidate rows among
  the worse-reconstructed half, the one whose residual direction splits the rows best (the bit fires
  where the rows' projection on it passes halfway from the median to that row's); its decoder
  column and a shift of the decoder bias are the least-squares fit of the residuals, and it is kept
  only when its own FVU gain (beyond the bias shift's) exceeds twice β·cost(p) (so a bit fitted to
  noise is refused, and a pruned bit does not come straight back). Its encoder row is sized so that
  Adam's first steps (~lr per coordinate) cannot rotate it before the gradient has shaped it;
- ``BitMoves.split``: replace a working bit that covers several features (an OR of them, their mean as
  its column) by up to two re-seeded bits where that lowers the batch objective;
- ``BitMoves.join`` (on with the others; ``--no-join``): replace two or more correlated working bits that
  cover one feature between them (fragments, each needed given the others) by one re-seeded bit
  where that lowers the batch objective.

All are deterministic functions of the weights and the rows (bitwise resume keeps), and reset the
Adam moments of the weights they write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from numba import njit

from bae.trainer.merge import bit_correlation, reset_moments, switch_off
from bae.trainer.models import Autoencoder
from bae.trainer.objectives import bit_cost
from bae.trainer.pair_penalties import exact_counts
from bae.trainer.split_search import best_split, subtract_seed

RESEED_HORIZON = 100  # steps of Adam drift a re-seeded encoder row's norm is sized for
SPLIT_TRIES = 32  # working bits tried for a split at each merge (those with the most residual energy)
SPLIT_SAME = 0.99  # a lone re-seeded bit agreeing with the replaced one on this share of rows is that bit
JOIN_TRIES = 32  # pairs of working bits tried for a join at each merge (the most correlated)
JOIN_MIN_PHI = 0.3  # |φ| between two bits below which they are not tried together
JOIN_EXTRA = 2  # further bits correlated with a pair that are tried with it


@torch.no_grad()
def switched_off(model: Autoencoder) -> torch.Tensor:
    """The indices of the switched-off bits (encoder row 0, bias −1, decoder column 0). Only the
    moves switch a bit off or wake it, and a held bit's weights do not change between them, so the
    trainer finds the set after each merge and holds it until the next."""
    encoder, decoder = model.encoder, model.decoder
    if encoder.bias is None:
        return torch.zeros(0, dtype=torch.long, device=encoder.weight.device)
    candidates = (encoder.bias == -1).nonzero().squeeze(1)  # the bias first: cheap, and rarely −1
    keep = (encoder.weight[candidates] == 0).all(dim=1) & (decoder.weight[:, candidates] == 0).all(dim=0)
    return candidates[keep]


@torch.no_grad()
def prune_statistics(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Sums over the rows ``x`` (normalized) that ``BitMoves.prune`` needs, flat so that processes can
    add them: [n, count_j, A_j = Σ_i b_ij e_i·w_j, E_j = Σ_i e_i·w_j, the bits' BᵀB (exact
    counts)], e_i = x_i − x̂_i."""
    out = model(x)
    bits = out.bits.detach()
    projected = (x - out.recon).double() @ model.decoder.weight.double()  # e_i·w_j
    a = (bits.double() * projected).sum(0)
    n = torch.tensor([len(x)], dtype=torch.float64, device=x.device)
    gram = exact_counts(bits.float()).double().flatten()
    return torch.cat([n, bits.double().sum(0), a, projected.sum(0), gram])


@dataclass(frozen=True)
class BitMoves:
    """The moves at one merge: the model and optimizer they write, and the objective's β and V
    (the FVU denominator) they test each bit against."""

    model: Autoencoder
    optimizer: torch.optim.Optimizer
    beta: float
    variance: float

    @torch.no_grad()
    def prune(self, stats: torch.Tensor) -> int:
        """Switch off, one at a time, the bit with the lowest ΔFVU − β·cost while that is negative.
        Removing bit j (rate p_j) with its mean p_j·w_j moved into the decoder bias adds
        (b_ij − p_j)·w_j to each residual e_i, so ΔFVU_j = (2(A_j − p_j E_j) + n p_j(1 − p_j)‖w_j‖²)
        / (n·V) on the rows behind ``stats`` (without a decoder bias p is 0 in these terms), and after
        it A_k += ((BᵀB)_kj − n p_k p_j) w_j·w_k while E is unchanged. Returns the number of bits
        switched off."""
        model, optimizer, beta, variance = self.model, self.optimizer, self.beta, self.variance
        d_bits = model.n_bits
        n = float(stats[0])
        counts, a, e = (stats[1 + i * d_bits : 1 + (i + 1) * d_bits].clone() for i in range(3))
        gram = stats[1 + 3 * d_bits :].reshape(d_bits, d_bits)
        if n < 2 or beta <= 0:
            return 0
        decoder = model.decoder
        w = decoder.weight.double()
        dots = w.T @ w  # w_j·w_k
        cost = beta * bit_cost(counts / n)
        shift = counts / n if decoder.bias is not None else torch.zeros_like(counts)
        live = (counts > 0) & (counts < n)
        spread = counts - n * shift * (2 * counts / n - shift)  # Σ_i (b_ij − p_j)²
        shift_e, spread_w = shift * e, spread * dots.diagonal()
        # gram holds integers (exactly symmetric: its row j is column j); dots is read by column
        host = [t.cpu().numpy() for t in (a, shift_e, spread_w, cost, counts, shift, gram, dots)]
        order = cast(Any, _greedy_prune)(*host, live.cpu().numpy(), n * variance)
        if len(order) and decoder.bias is not None:  # in the order removed, as the sums above assumed
            rates = shift[torch.from_numpy(order)].float()  # float32, as a float32 tensor times a scalar
            weight = decoder.weight.detach().cpu().numpy()
            bias = decoder.bias.detach().cpu().numpy().copy()
            _add_columns(bias, weight, order, rates.cpu().numpy())
            decoder.bias.copy_(torch.from_numpy(bias))
        pruned = order.tolist()
        if pruned:  # their columns are read by no later step: switched off all at once
            switch_off(model.encoder, decoder, pruned, optimizer)
        return len(pruned)

    @torch.no_grad()
    def reseed(self, x: torch.Tensor, idle: torch.Tensor) -> int:
        """Re-seed idle bits (bool [d'], constant over the recent steps) on the rows ``x`` (normalized),
        lowest index first, until a candidate does not buy ``RESEED_MARGIN`` × β·cost(p). An always-on
        idle bit's column moves into the decoder bias first. Returns the number of bits re-seeded."""
        model, optimizer, beta, variance = self.model, self.optimizer, self.beta, self.variance
        if beta <= 0 or len(x) < 2 or model.encoder.bias is None:
            return 0
        out = model(x)
        bits = out.bits > 0
        idle = idle & (bits.all(0) | ~bits.any(0))
        if not bool(idle.any()):
            return 0
        residual = (x - out.recon).float()
        row_norm = seed_row_norm(model, optimizer, ~(bits.all(0) | ~bits.any(0)))
        seeded = 0
        for j in idle.nonzero().squeeze(1).tolist():
            best = best_split(x, residual, beta, variance, model.decoder.bias is not None)
            if best is None:
                break
            if bool(bits[:, j].all()) and model.decoder.bias is not None:
                model.decoder.bias.add_(model.decoder.weight[:, j])  # an always-on bit was part of the bias
            write_seed(model, optimizer, j, best, row_norm)
            subtract_seed(residual, best)
            seeded += 1
        return seeded

    @torch.no_grad()
    def split(self, x: torch.Tensor, idle: torch.Tensor, tries: int = SPLIT_TRIES) -> int:
        """Replace working bits by up to two re-seeded ones where that lowers the objective on the rows
        ``x``: a bit firing on the OR of several features explains each of them halfway, and neither
        the gradient nor the prune (it pays for itself) nor the re-seed (it only fills idle bits)
        undoes it. Of the ``tries`` working bits with the most residual energy on their active side
        (their rarer value), each is removed (its mean contribution into the decoder bias, as the prune
        does), up to two bits are re-seeded on the residual as ``best_split`` picks them, and the
        change is kept only when FVU_b + β·cost(p) of the batch falls; the second bit takes an idle
        bit's slot (bool [d'], constant over the recent steps and on these rows). Returns the number of
        bits replaced."""
        model, optimizer, beta, variance = self.model, self.optimizer, self.beta, self.variance
        decoder = model.decoder
        if beta <= 0 or len(x) < 2 or model.encoder.bias is None:
            return 0
        out = model(x)
        bits = out.bits > 0
        constant = bits.all(0) | ~bits.any(0)
        slots = (idle & constant).nonzero().squeeze(1).tolist()
        working = ~constant
        if not slots or not bool(working.any()):
            return 0
        residual = (x - out.recon).float()
        p = bits.float().mean(0)
        active = torch.where(p <= 0.5, bits, ~bits).float()
        energy = torch.where(working, active.T @ residual.pow(2).sum(1), torch.zeros_like(p))
        candidates = energy.argsort(descending=True)[: min(tries, int(working.sum()))].tolist()
        row_norm = seed_row_norm(model, optimizer, working)
        bias = decoder.bias is not None
        n, replaced = len(x), 0
        for j in candidates:
            if not slots:
                break
            trial = self._without(residual, bits, p, [j])
            seeds = []
            for _ in range(2):
                best = best_split(x, trial, beta, variance, bias)
                if best is None:
                    break
                subtract_seed(trial, best)
                seeds.append(best)
            if not seeds or (
                len(seeds) == 1 and float((seeds[0][2] == bits[:, j]).float().mean()) >= SPLIT_SAME
            ):
                continue  # nothing, or the bit itself back (a re-fit, moments reset for nothing)
            old_cost = float(bit_cost(p[j]))
            new_cost = sum(float(bit_cost(s[2].float().mean())) for s in seeds)
            before = float(residual.pow(2).sum()) / (n * variance) + beta * old_cost
            if not float(trial.pow(2).sum()) / (n * variance) + beta * new_cost < before:
                continue
            if bias:
                decoder.bias.add_(decoder.weight[:, j].float() * float(p[j]))
            for slot, seed in zip([j, *slots[:1]], seeds):
                write_seed(model, optimizer, slot, seed, row_norm)
                bits[:, slot] = seed[2]
            slots = slots[len(seeds) - 1 :]
            residual, replaced = trial, replaced + 1
            p = bits.float().mean(0)
        return replaced

    @torch.no_grad()
    def join(self, x: torch.Tensor, tries: int = JOIN_TRIES) -> int:
        """Replace groups of correlated working bits by one re-seeded bit where that lowers the
        objective on the rows ``x``: a feature the code covers by two or three fragments, each
        firing on part of it and each needed given the others, is one bit, and neither the prune
        (each fragment pays for itself) nor the split (one bit into two) undoes them. For each of
        the ``tries`` most correlated pairs of working bits (|φ| > ``JOIN_MIN_PHI``, no bit in two
        groups), the pair and the pair with up to ``JOIN_EXTRA`` bits correlated with either are
        each removed (their mean contributions into the decoder bias, as the prune does), one bit
        is re-seeded on the residual as ``best_split`` picks it, and the option that lowers
        FVU_b + β·cost(p) most is kept, in the group's first slot. Returns the number of groups
        joined."""
        model = self.model
        if self.beta <= 0 or len(x) < 2 or model.encoder.bias is None:
            return 0
        out = model(x)
        bits = out.bits > 0
        varies = bits.any(0) & ~bits.all(0)
        working = varies.nonzero().squeeze(1)
        if len(working) < 2:
            return 0
        code = bits[:, working].double()
        phi = bit_correlation(len(x), code.sum(0), code.T @ code).abs().triu(1)  # each pair once
        flat = phi.flatten()
        ranked = flat.argsort(descending=True)[:tries].tolist()
        pairs = [divmod(t, len(working)) for t in ranked if float(flat[t]) > JOIN_MIN_PHI]
        residual = (x - out.recon).float()
        row_norm = seed_row_norm(model, self.optimizer, varies)
        p, used, joined = bits.float().mean(0), set(), 0
        for a, b in pairs:
            if {int(working[a]), int(working[b])} & used:
                continue
            beside = torch.maximum(phi[a] + phi[:, a], phi[b] + phi[:, b]).tolist()  # |φ| with a or b
            extra = sorted((i for i in range(len(working)) if i not in (a, b)), key=lambda i: -beside[i])
            extra = [
                i for i in extra[:JOIN_EXTRA] if beside[i] > JOIN_MIN_PHI and int(working[i]) not in used
            ]
            options = [[a, b], [a, b, *extra]] if extra else [[a, b]]
            tried = [self._one_for(x, residual, bits, p, [int(working[i]) for i in g]) for g in options]
            kept = [t for t in tried if t is not None]
            if not kept:
                continue
            _, group, seed, residual = min(kept, key=lambda t: t[0])
            self._replace(group, seed, bits, row_norm)
            p = bits.float().mean(0)
            used |= set(group)
            joined += 1
        return joined

    def _one_for(
        self, x: torch.Tensor, residual: torch.Tensor, bits: torch.Tensor, p: torch.Tensor, group: list[int]
    ) -> tuple[float, list[int], Any, torch.Tensor] | None:
        """(change of FVU_b + β·cost, group, seed, residual after) of replacing the bits ``group`` by
        one ``best_split`` seed, or None when that does not lower the objective."""
        decoder, n = self.model.decoder, len(x)
        trial = self._without(residual, bits, p, group)
        seed = best_split(x, trial, self.beta, self.variance, decoder.bias is not None)
        if seed is None:
            return None
        subtract_seed(trial, seed)
        before = float(residual.pow(2).sum()) + n * self.variance * self.beta * float(
            bit_cost(p[group]).sum()
        )
        after = float(trial.pow(2).sum()) + n * self.variance * self.beta * float(
            bit_cost(seed[2].float().mean())
        )
        return ((after - before) / (n * self.variance), group, seed, trial) if after < before else None

    def _without(
        self, residual: torch.Tensor, bits: torch.Tensor, p: torch.Tensor, group: list[int]
    ) -> torch.Tensor:
        """The batch's ``residual`` with the bits ``group`` removed and their mean contributions
        (rates ``p``) kept, as moving them into the decoder bias keeps them (the prune's rule)."""
        decoder = self.model.decoder
        trial = residual.clone()
        for j in group:
            shift = float(p[j]) if decoder.bias is not None else 0.0
            trial += (bits[:, j].float() - shift)[:, None] * decoder.weight[:, j].float()
        return trial

    def _replace(self, group: list[int], seed: Any, bits: torch.Tensor, row_norm: float) -> None:
        """Write ``seed`` into the first bit of ``group`` and switch the others off, the group's mean
        contributions moved into the decoder bias; ``bits`` (the batch's code) updated to match."""
        model, decoder = self.model, self.model.decoder
        if decoder.bias is not None:
            rates = bits[:, group].float().mean(0)
            decoder.bias.add_(decoder.weight[:, group].float() @ rates)
        write_seed(model, self.optimizer, group[0], seed, row_norm)
        switch_off(model.encoder, decoder, group[1:], self.optimizer)
        bits[:, group[0]] = seed[2]
        bits[:, group[1:]] = False


@njit(cache=True)
def _add_columns(
    bias: np.ndarray, weight: np.ndarray, order: np.ndarray, rates: np.ndarray
) -> None:  # pragma: no cover - compiled
    """bias += weight[:, j] · rate_j for each j of ``order`` in turn, in float32 (each product and
    sum rounded as ``bias.add_(weight[:, j] * rate)`` rounds them)."""
    for i in range(len(order)):
        j, rate = order[i], rates[i]
        for k in range(len(bias)):
            bias[k] += weight[k, j] * rate


@njit(cache=True)
def _greedy_prune(
    a: np.ndarray,
    shift_e: np.ndarray,
    spread_w: np.ndarray,
    cost: np.ndarray,
    counts: np.ndarray,
    shift: np.ndarray,
    gram: np.ndarray,
    dots: np.ndarray,
    live: np.ndarray,
    scale: float,
) -> np.ndarray:  # pragma: no cover - compiled
    """``BitMoves.prune``'s greedy loop over float64 arrays: the live bit with the lowest ΔFVU − β·cost
    (the first on ties), while that is negative (a NaN score stops it, as it does ``argmin``);
    each removal updates A by column j. The same operations in the same order as the elementwise
    tensor version, so the same bits in the same order. Returns the removed bits in order."""
    order = np.empty(len(a), np.int64)
    removed = 0
    while True:
        best, j = np.inf, -1
        for k in range(len(a)):
            if live[k]:
                score = (2.0 * (a[k] - shift_e[k]) + spread_w[k]) / scale - cost[k]
                if np.isnan(score):
                    return order[:removed]
                if score < best:
                    best, j = score, k
        if j < 0 or not best < 0:
            return order[:removed]
        for k in range(len(a)):
            a[k] += (gram[j, k] - counts[k] * shift[j]) * dots[k, j]
        live[j] = False
        order[removed] = j
        removed += 1


def seed_row_norm(model: Autoencoder, optimizer: torch.optim.Optimizer, working: torch.Tensor) -> float:
    """The norm of a re-seeded encoder row: the ``working`` rows' median, and at least what Adam's
    first steps of ~lr per coordinate move a row in ``RESEED_HORIZON`` steps (they do not scramble
    the new bit)."""
    norms = model.encoder.weight[working].norm(dim=1)
    lr = float(optimizer.param_groups[0]["lr"])
    floor = RESEED_HORIZON * lr * math.sqrt(model.encoder.weight.shape[1])
    return max(float(norms.median()) if len(norms) else 0.0, floor, 1e-6)


def write_seed(
    model: Autoencoder,
    optimizer: torch.optim.Optimizer,
    slot: int,
    seed: tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, torch.Tensor],
    row_norm: float,
) -> None:
    """Make bit ``slot`` the ``best_split`` ``seed`` (u, threshold, fire, on-mean, off-mean): encoder
    row along u at ``row_norm`` (through the encoder's input scale), bias at the threshold, decoder
    column on − off and off into the decoder bias; its Adam moments reset."""
    u, t, _, on, off = seed
    encoder, decoder = model.encoder, model.decoder
    assert encoder.bias is not None
    w = u * (model.encoder_input_scale if model.config.encoder_scale else 1.0)
    k = row_norm / max(float(w.norm()), 1e-30)
    encoder.weight[slot], encoder.bias[slot] = w * k, -t * k
    decoder.weight[:, slot] = on - off
    if decoder.bias is not None:
        decoder.bias.add_(off)
    reset_moments(optimizer, encoder.weight, (slot,))
    reset_moments(optimizer, encoder.bias, (slot,))
    reset_moments(optimizer, decoder.weight, (slice(None), slot))
