"""Pruning and re-seeding bits: moves of the normalized objective that its gradient cannot make.

The step's surrogate gradient only reaches rows near a bit's threshold, so a bit that fires with
confidence on the wrong rows is never turned off, and a bit that never fires is never pointed at
what the code misses. Measured on synthetic sets (docs/method.md §7): without these moves a sparse
truth is covered by OR-like fragments of its bits that the entropy term cannot remove. Both moves
test a bit against the objective itself, FVU against β times its code bits (docs/method.md §3):

- ``prune_bits``: greedily switch off the bit whose removal raises the batch FVU by less than
  β·cost(p), its mean contribution p·w moved into the decoder bias, re-scoring the others after
  each removal (from sums over rows, so processes reduce them once and take the same decisions);
- ``reseed_bits``: point a switched-off bit at what the code misses: of 64 candidate rows among
  the worse-reconstructed half, the one whose residual direction splits the rows best (the bit fires
  where the rows' projection on it passes halfway from the median to that row's); its decoder
  column and a shift of the decoder bias are the least-squares fit of the residuals, and it is kept
  only when its own FVU gain (beyond the bias shift's) exceeds twice β·cost(p) (so a bit fitted to
  noise is refused, and a pruned bit does not come straight back). Its encoder row is sized so that
  Adam's first steps (~lr per coordinate) cannot rotate it before the gradient has shaped it.

Both are deterministic functions of the weights and the rows (bitwise resume keeps), and reset the
Adam moments of the weights they write.
"""

from __future__ import annotations

import math

import torch

from bae.trainer.merge import reset_moments, switch_off
from bae.trainer.models import Autoencoder
from bae.trainer.objectives import bit_cost
from bae.trainer.pair_penalties import exact_counts

RESEED_MARGIN = 2.0  # a re-seeded bit must buy twice its cost on the batch
RESEED_HORIZON = 100  # steps of Adam drift a re-seeded encoder row's norm is sized for
RESEED_CANDIDATES = 64  # rows whose residual directions are tried for each re-seeded bit


@torch.no_grad()
def hold_switched_off(model: Autoencoder) -> None:
    """Zero the gradients of switched-off bits (encoder row 0, bias −1, decoder column 0), so that
    only a re-seed wakes them. Without this the scaled sigmoid's surrogate gradient (never zero for
    a constant pre-activation) and the entropy term move every switched-off row by the same Adam
    step along the data's mean, and they come back together as copies of one bit."""
    encoder, decoder = model.encoder, model.decoder
    if encoder.bias is None or encoder.weight.grad is None:
        return
    candidates = (encoder.bias == -1).nonzero().squeeze(1)  # the bias first: cheap, and rarely −1
    if len(candidates) == 0:
        return
    off = candidates[
        (encoder.weight[candidates] == 0).all(dim=1) & (decoder.weight[:, candidates] == 0).all(dim=0)
    ]
    if len(off) == 0:
        return
    encoder.weight.grad[off] = 0
    if encoder.bias.grad is not None:
        encoder.bias.grad[off] = 0
    if decoder.weight.grad is not None:
        decoder.weight.grad[:, off] = 0


@torch.no_grad()
def prune_statistics(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Sums over the rows ``x`` (normalized) that ``prune_bits`` needs, flat so that processes can
    add them: [n, count_j, A_j = Σ_i b_ij e_i·w_j, E_j = Σ_i e_i·w_j, the bits' BᵀB (exact
    counts)], e_i = x_i − x̂_i."""
    out = model(x)
    bits = out.bits.detach()
    projected = (x - out.recon).double() @ model.decoder.weight.double()  # e_i·w_j
    a = (bits.double() * projected).sum(0)
    n = torch.tensor([len(x)], dtype=torch.float64, device=x.device)
    gram = exact_counts(bits.float()).double().flatten()
    return torch.cat([n, bits.double().sum(0), a, projected.sum(0), gram])


@torch.no_grad()
def prune_bits(
    model: Autoencoder,
    optimizer: torch.optim.Optimizer,
    stats: torch.Tensor,
    beta: float,
    variance: float,
) -> int:
    """Switch off, one at a time, the bit with the lowest ΔFVU − β·cost while that is negative.
    Removing bit j (rate p_j) with its mean p_j·w_j moved into the decoder bias adds
    (b_ij − p_j)·w_j to each residual e_i, so ΔFVU_j = (2(A_j − p_j E_j) + n p_j(1 − p_j)‖w_j‖²)
    / (n·V) on the rows behind ``stats`` (without a decoder bias p is 0 in these terms), and after
    it A_k += ((BᵀB)_kj − n p_k p_j) w_j·w_k while E is unchanged. Returns the number of bits
    switched off."""
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
    pruned = []
    while bool(live.any()):
        delta = (2 * (a - shift_e) + spread_w) / (n * variance)
        score = torch.where(live, delta - cost, torch.full_like(delta, math.inf))
        j = int(score.argmin())
        if not score[j] < 0:
            break
        a += (gram[:, j] - counts * shift[j]) * dots[:, j]
        live[j] = False
        if decoder.bias is not None:
            decoder.bias.add_(decoder.weight[:, j] * float(shift[j]))
        pruned.append(j)  # its column is read by no later step: switched off below, all at once
    if pruned:
        switch_off(model.encoder, decoder, pruned, optimizer)
    return len(pruned)


def best_split(
    x: torch.Tensor, residual: torch.Tensor, beta: float, variance: float, bias: bool
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The best new bit for ``residual`` [n, d], or None when none buys ``RESEED_MARGIN`` × β·cost(p).

    Candidates: the residual directions of the ``RESEED_CANDIDATES`` rows at evenly spaced ranks
    of the upper half of residual norms (the single worst row alone is, on sparse data, a row with
    several features on, whose split is an AND of them). A candidate u fires where x·u passes
    halfway from the median to its row's projection; its gain is the between-group sum of squares
    of the residual beyond a bias shift's (the least-squares fit of (bias shift, new column)).
    Returns (u, threshold, fire [n], on-mean, off-mean) of the candidate with the largest net gain.
    """
    n = len(x)
    err = residual.pow(2).sum(1)
    order = err.argsort(descending=True)[: max(n // 2, 1)]
    rows = order[torch.linspace(0, len(order) - 1, min(RESEED_CANDIDATES, len(order))).round().long()]
    u = residual[rows] / err[rows].sqrt().clamp_min(1e-30)[:, None]  # [c, d]
    proj = x.float() @ u.T  # [n, c]
    t = 0.5 * (proj[rows, torch.arange(len(rows))] + proj.median(dim=0).values)
    fire = proj > t
    m = fire.sum(0).to(residual.dtype)  # [c]
    on_sum = fire.to(residual.dtype).T @ residual  # [c, d]
    total = residual.sum(0)
    on = on_sum / m.clamp_min(1)[:, None]
    off = (total - on_sum) / (n - m).clamp_min(1)[:, None] if bias else torch.zeros_like(on)
    between = m * on.pow(2).sum(1) + (n - m) * off.pow(2).sum(1)
    if bias:
        between = between - total.pow(2).sum() / n
    net = between / (n * variance) - RESEED_MARGIN * beta * bit_cost(m / n)
    net = torch.where((m > 0) & (m < n), net, torch.full_like(net, -math.inf))
    c = int(net.argmax())
    if not float(net[c]) > 0:
        return None
    return u[c], float(t[c]), fire[:, c], on[c], off[c]


@torch.no_grad()
def reseed_bits(
    model: Autoencoder,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    idle: torch.Tensor,
    beta: float,
    variance: float,
) -> int:
    """Re-seed idle bits (bool [d'], constant over the recent steps) on the rows ``x`` (normalized),
    lowest index first, until a candidate does not buy ``RESEED_MARGIN`` × β·cost(p). An always-on
    idle bit's column moves into the decoder bias first. Returns the number of bits re-seeded."""
    if beta <= 0 or len(x) < 2 or model.encoder.bias is None:
        return 0
    out = model(x)
    bits = out.bits > 0
    idle = idle & (bits.all(0) | ~bits.any(0))
    if not bool(idle.any()):
        return 0
    residual = (x - out.recon).float()
    scale = model.encoder_input_scale if model.config.encoder_scale else torch.ones_like(x[0])
    working = ~(bits.all(0) | ~bits.any(0))
    # new encoder rows get the working rows' typical norm, and at least what Adam's first steps of
    # ~lr per coordinate would move them in RESEED_HORIZON steps (they do not scramble the new bit)
    norms = model.encoder.weight[working].norm(dim=1)
    lr = float(optimizer.param_groups[0]["lr"])
    floor = RESEED_HORIZON * lr * math.sqrt(x.shape[1])
    row_norm = max(float(norms.median()) if len(norms) else 0.0, floor, 1e-6)
    seeded = 0
    for j in idle.nonzero().squeeze(1).tolist():
        best = best_split(x, residual, beta, variance, model.decoder.bias is not None)
        if best is None:
            break
        u, t, fire, on, off = best
        if bool(bits[:, j].all()) and model.decoder.bias is not None:
            model.decoder.bias.add_(model.decoder.weight[:, j])  # an always-on bit was part of the bias
        w = u * scale
        k = row_norm / max(float(w.norm()), 1e-30)
        model.encoder.weight[j] = w * k
        model.decoder.weight[:, j] = on - off
        reset_moments(optimizer, model.encoder.weight, (j,))
        reset_moments(optimizer, model.decoder.weight, (slice(None), j))
        model.encoder.bias[j] = -t * k
        reset_moments(optimizer, model.encoder.bias, (j,))
        residual = torch.where(fire[:, None], residual - on, residual - off)
        if model.decoder.bias is not None:
            model.decoder.bias.add_(off)
        seeded += 1
    return seeded
