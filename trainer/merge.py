"""Folding duplicate bits: a bit that copies (ρ > t) or complements (ρ < −t) an earlier bit adds
nothing to the reconstruction but costs H_b(p) bits, and it sits on a flat direction of the loss
(the decoder can split a column between the two at no cost), so gradients do not remove it."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def bit_correlation(n: int, sums: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Correlation of 0/1 bits from their row count, sums [d'] and Gram matrix BᵀB [d', d'] (0 for
    constant bits)."""
    p = sums.double() / n
    cov = gram.double() / n - torch.outer(p, p)
    var = cov.diagonal().clamp_min(0)
    alive = var > 1e-12
    scale = var.clamp_min(1e-12).sqrt()
    corr = cov / torch.outer(scale, scale)
    return corr.masked_fill(~(alive[:, None] & alive[None, :]), 0.0)


def reset_moments(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, index: tuple) -> None:
    """Zero Adam's running moments of ``param[index]`` (weights just written, not learned)."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if state:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0


@torch.no_grad()
def switch_off(
    encoder: nn.Linear,
    decoder: nn.Linear,
    bits: int | list[int],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Bits ``bits`` never fire (encoder row 0, bias −1) and decode to nothing; with ``optimizer``,
    the Adam moments of what was written are reset."""
    index = torch.as_tensor(bits, dtype=torch.long, device=encoder.weight.device)
    encoder.weight[index] = 0.0
    decoder.weight[:, index] = 0.0
    reset_moments(optimizer, encoder.weight, (index,))
    reset_moments(optimizer, decoder.weight, (slice(None), index))
    if encoder.bias is not None:
        encoder.bias[index] = -1.0
        reset_moments(optimizer, encoder.bias, (index,))


@torch.no_grad()
def merge_duplicate_bits(
    corr: torch.Tensor,
    encoder: nn.Linear,
    decoder: nn.Linear,
    threshold: float,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """For each pair k < j with |ρ_kj| > ``threshold`` (lowest index kept, each bit merged once):
    W_dec[:, k] ± W_dec[:, j] (a complement also moves W_dec[:, j] into b_dec), then bit j is switched
    off (encoder row 0, bias −1; with ``optimizer`` its Adam moments reset) and free to be learned
    again. Returns the number of bits merged."""
    upper = torch.triu(corr, diagonal=1)
    done = [False] * corr.shape[0]
    merged = []
    for k, j in torch.nonzero(upper.abs() > threshold).tolist():
        if done[k] or done[j]:
            continue
        column = decoder.weight[:, j].clone()
        if upper[k, j] > 0:
            decoder.weight[:, k] += column
        else:
            decoder.weight[:, k] -= column
            if decoder.bias is not None:
                decoder.bias.add_(column)
        done[j] = True  # never read again: switched off below, all at once
        merged.append(j)
    if merged:
        switch_off(encoder, decoder, merged, optimizer)
    return len(merged)
