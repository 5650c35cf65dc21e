"""Pruning and re-seeding bits (trainer/pruning.py) against independent computations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from bae.trainer.config import ModelConfig
from bae.trainer.models import BinaryAutoencoder
from bae.trainer.objectives import bit_cost
from bae.trainer.pruning import BitMoves, prune_statistics


def cost(p: float) -> float:
    """½(H_b(p) + 2 min(p, 1 − p)), written out."""
    if p in (0.0, 1.0):
        return 0.0
    return 0.5 * (-(p * math.log2(p) + (1 - p) * math.log2(1 - p)) + 2 * min(p, 1 - p))


def adam_with_moments(model: BinaryAutoencoder) -> torch.optim.Adam:
    """An Adam whose running moments are all non-zero (as after some steps)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(5.0),
            "exp_avg": torch.full_like(p, 0.5),
            "exp_avg_sq": torch.full_like(p, 0.25),
        }
    return optimizer


def brute_force_prune(bits, w_dec, b_dec, x, beta, variance) -> tuple[list[int], np.ndarray]:
    """Greedy pruning by recomputing the batch FVU with each candidate's decoder column zeroed and
    its mean p_j·w_j added to the decoder bias; returns the bits in order and the final bias."""
    p = bits.mean(0)
    live = {j for j in range(len(p)) if 0 < p[j] < 1}
    w, b = w_dec.copy(), b_dec.copy()
    n = len(x)

    def fvu(w_now, b_now) -> float:
        return float(((x - bits @ w_now.T - b_now) ** 2).sum() / (n * variance))

    removed = []
    while live:
        base = fvu(w, b)
        scores = {}
        for j in live:
            trial = w.copy()
            trial[:, j] = 0
            scores[j] = fvu(trial, b + p[j] * w[:, j]) - base - beta * cost(p[j])
        j = min(scores, key=lambda k: scores[k])
        if scores[j] >= 0:
            break
        b = b + p[j] * w[:, j]
        w[:, j] = 0
        live.discard(j)
        removed.append(j)
    return removed, b


def test_prune_switches_off_what_the_brute_force_greedy_does() -> None:
    torch.manual_seed(0)
    model = BinaryAutoencoder(ModelConfig(d_model=12, expansion=4))
    with torch.no_grad():
        model.decoder.weight.mul_(torch.rand(48).pow(4))  # columns from negligible to useful
    x = torch.randn(300, 12)
    bits = model.encode(x).numpy().astype(np.float64)
    w_dec, b_dec = (t.detach().double().numpy() for t in (model.decoder.weight, model.decoder.bias))
    variance, beta = 12.0, 2e-3
    expected, bias = brute_force_prune(bits, w_dec, b_dec, x.double().numpy(), beta, variance)
    assert 3 <= len(expected) < 48  # the case prunes some bits, not all

    optimizer = adam_with_moments(model)
    stats = prune_statistics(model, x)
    assert BitMoves(model, optimizer, beta, variance).prune(stats) == len(expected)
    off = sorted(j for j in range(48) if bool((model.encoder.weight[j] == 0).all()))
    assert off == sorted(expected)
    np.testing.assert_allclose(model.decoder.bias.detach().double().numpy(), bias, rtol=1e-5, atol=1e-6)
    for j in expected:  # never fires, decodes to nothing, moments reset
        assert model.encoder.bias[j] == -1 and bool((model.decoder.weight[:, j] == 0).all())
        assert bool((optimizer.state[model.encoder.weight]["exp_avg"][j] == 0).all())
        assert bool((optimizer.state[model.decoder.weight]["exp_avg_sq"][:, j] == 0).all())
    kept = [j for j in range(48) if j not in expected]
    assert bool((optimizer.state[model.encoder.weight]["exp_avg"][kept] == 0.5).all())
    # nothing to prune at β = 0
    assert BitMoves(model, optimizer, 0.0, 1.0).prune(prune_statistics(model, x)) == 0


def sparse_rows(
    n: int = 4000, d: int = 16, seed: int = 0, p: float = 0.1
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Three bits (rate ``p``, sparse by default) on orthogonal directions of norm 3, plus small noise."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((d, 3)))[0].T * 3.0  # [3, d]
    b = rng.random((n, 3)) < p
    x = b @ directions + 0.05 * rng.standard_normal((n, d))
    return torch.tensor(x, dtype=torch.float32), b, directions


def empty_code(directions: np.ndarray) -> tuple[BinaryAutoencoder, torch.Tensor]:
    """A 16-bit BAE whose bits never fire and decode to nothing, and the directions as a tensor."""
    model = BinaryAutoencoder(ModelConfig(d_model=16, expansion=1))
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(-1.0)
        model.decoder.weight.zero_()
    return model, torch.tensor(directions, dtype=torch.float32)


def test_reseed_finds_the_bit_the_code_misses_and_refuses_noise() -> None:
    x, b, directions = sparse_rows()
    model = BinaryAutoencoder(ModelConfig(d_model=16, expansion=1))  # 16 bits
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(-1.0)
        model.decoder.weight.zero_()
        for k in (0, 1):  # the code has bits 0 and 1 exactly; the truth's third bit is missing
            unit = torch.tensor(directions[k] / 3.0, dtype=torch.float32)
            model.encoder.weight[k] = unit
            model.encoder.bias[k] = -1.5
            model.decoder.weight[:, k] = torch.tensor(directions[k], dtype=torch.float32)
        model.decoder.bias.copy_(
            x.mean(0) - torch.tensor(b.mean(0)[:2] @ directions[:2], dtype=torch.float32)
        )
    optimizer = adam_with_moments(model)
    variance = float(x.var(0).sum())
    idle = torch.ones(16, dtype=torch.bool)
    idle[:2] = False
    moves = BitMoves(model, optimizer, 3e-3, variance)
    assert moves.reseed(x, idle) == 1  # the truth's bit, then noise refused
    got = model.encode(x)[:, 2].numpy()
    assert (got == b[:, 2]).mean() > 0.995
    # the row is sized for Adam's first steps: max(working rows' median norm 1, 100 · lr · √d = 4)
    assert float(model.encoder.weight[2].detach().norm()) == pytest.approx(4.0, rel=1e-5)
    column = model.decoder.weight[:, 2].detach().numpy()
    assert column @ directions[2] / (np.linalg.norm(column) * 3.0) > 0.99
    assert bool((optimizer.state[model.encoder.weight]["exp_avg"][2] == 0).all())
    assert bool((optimizer.state[model.encoder.bias]["exp_avg_sq"][2] == 0).all())
    assert bool((model.encoder.weight[3:] == 0).all())  # the rest stay off
    # a complete code leaves nothing worth re-seeding
    assert moves.reseed(x, idle & (torch.arange(16) > 2)) == 0


@pytest.mark.parametrize("lr", [1e-2, 1e-3])
def test_reseed_rebuilds_an_empty_code_at_a_norm_adam_cannot_scramble(lr: float) -> None:
    """After a prune that switched every bit off (a dense early code), re-seeding finds the truth's
    bits again, each encoder row at norm 100 · lr · √d: Adam moves a fresh row by ~lr per coordinate
    a step, so a row at norm 1 would be rotated within a few steps (at lr 1e-2: 0.04 a step here)."""
    x, b, _ = sparse_rows()
    model = BinaryAutoencoder(ModelConfig(d_model=16, expansion=1))
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(-1.0)
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(x.mean(0))
    optimizer = adam_with_moments(model)
    optimizer.param_groups[0]["lr"] = lr
    moves = BitMoves(model, optimizer, 3e-3, float(x.var(0).sum()))
    seeded = moves.reseed(x, torch.ones(16, dtype=torch.bool))
    assert seeded == 3
    codes = model.encode(x)[:, :3].numpy()
    for k in range(3):  # each truth bit is one seeded bit
        assert max((codes[:, j] == b[:, k]).mean() for j in range(3)) > 0.99
    norms = model.encoder.weight[:3].detach().norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), 100 * lr * 4.0, rtol=1e-5)


def batch_objective(model: BinaryAutoencoder, x: torch.Tensor, beta: float, variance: float) -> float:
    """FVU_b + β·S on the rows ``x``, computed from the encoded bits (independently of the moves)."""
    with torch.no_grad():
        out = model(x)
        fvu = float((x - out.recon).pow(2).sum()) / (len(x) * variance)
        p = out.bits.double().mean(0)
    return fvu + beta * sum(cost(float(q)) for q in p)


@pytest.mark.parametrize("seed", [0, 1])
def test_split_replaces_an_or_of_two_features_by_the_two(seed: int) -> None:
    """A bit firing on feature 0 OR feature 1 (its column their mean) pays for itself, so the prune
    keeps it; the split removes it and re-seeds the two features, lowering the batch objective
    (computed here from the codes); on the code that results nothing is split again."""
    x, b, directions = sparse_rows(seed=seed)
    model, d = empty_code(directions)
    with torch.no_grad():
        model.encoder.weight[0] = (d[0] + d[1]) / (3 * math.sqrt(2))  # x·u = 2.1 on either feature
        model.encoder.bias[0] = -1.0
        model.decoder.weight[:, 0] = (d[0] + d[1]) / 2
        model.encoder.weight[1], model.encoder.bias[1] = d[2] / 3, -1.5  # feature 2 exactly
        model.decoder.weight[:, 1] = d[2]
        fired = model.encode(x).numpy()
        rates = torch.tensor(fired[:, :2].mean(0), dtype=torch.float32)
        model.decoder.bias.copy_(x.mean(0) - model.decoder.weight[:, :2] @ rates)
    assert (fired[:, 0] == (b[:, 0] | b[:, 1])).all()
    optimizer = adam_with_moments(model)
    variance, beta = float(x.var(0).sum()), 3e-3
    idle = torch.ones(16, dtype=torch.bool)
    idle[:2] = False
    moves = BitMoves(model, optimizer, beta, variance)
    assert moves.prune(prune_statistics(model, x)) == 0  # it pays
    before = batch_objective(model, x, beta, variance)
    assert moves.split(x, idle) == 1
    codes = model.encode(x).numpy()
    for k in range(3):  # each truth bit is now one bit of the code
        assert max((codes[:, j] == b[:, k]).mean() for j in range(16)) > 0.99
    assert int(((codes.any(0)) & ~codes.all(0)).sum()) == 3
    assert batch_objective(model, x, beta, variance) < before
    assert bool((optimizer.state[model.encoder.weight]["exp_avg"][0] == 0).all())  # rewritten: reset
    assert moves.split(x, idle & ~torch.tensor(codes.any(0))) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_join_replaces_two_fragments_of_one_feature_by_it(seed: int) -> None:
    """Feature 0 covered by two fragments, one firing on it with feature 1 and one without (each
    with feature 0's column, each needed given the other, so the prune keeps both): the join replaces
    them by one bit equal to feature 0 and the batch objective (computed here from the codes) falls;
    on the code that results nothing is joined again."""
    x, b, directions = sparse_rows(seed=seed, p=0.5)
    model, d = empty_code(directions)
    with torch.no_grad():
        model.encoder.weight[0], model.encoder.bias[0] = (d[0] + d[1]) / 6, -2.25  # 0 and 1
        model.encoder.weight[1], model.encoder.bias[1] = (d[0] - d[1]) / 6, -0.75  # 0, not 1
        model.encoder.weight[2], model.encoder.bias[2] = d[1] / 3, -1.5
        model.encoder.weight[3], model.encoder.bias[3] = d[2] / 3, -1.5
        model.decoder.weight[:, :4] = torch.stack([d[0], d[0], d[1], d[2]], 1)
        fired = model.encode(x).numpy()
        rates = torch.tensor(fired[:, :4].mean(0), dtype=torch.float32)
        model.decoder.bias.copy_(x.mean(0) - model.decoder.weight[:, :4] @ rates)
    assert (fired[:, 0] == (b[:, 0] & b[:, 1])).all() and (fired[:, 1] == (b[:, 0] & ~b[:, 1])).all()
    optimizer = adam_with_moments(model)
    variance, beta = float(x.var(0).sum()), 3e-3
    moves = BitMoves(model, optimizer, beta, variance)
    assert moves.prune(prune_statistics(model, x)) == 0  # each fragment pays given the other
    before = batch_objective(model, x, beta, variance)
    assert moves.join(x) == 1
    codes = model.encode(x).numpy()
    for k in range(3):  # each truth bit is one bit of the code
        assert max((codes[:, j] == b[:, k]).mean() for j in range(16)) > 0.99
    assert int(((codes.any(0)) & ~codes.all(0)).sum()) == 3
    assert batch_objective(model, x, beta, variance) < before
    assert bool((optimizer.state[model.encoder.weight]["exp_avg"][:2] == 0).all())  # rewritten: reset
    assert moves.join(x) == 0


def test_bit_cost_is_the_written_out_formula() -> None:
    p = torch.tensor([0.0, 0.05, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert torch.allclose(bit_cost(p), torch.tensor([cost(float(q)) for q in p], dtype=torch.float64))


@pytest.mark.parametrize("sparse", [True, False])
def test_switched_off_bits_stay_off_until_reseeded(sparse: bool) -> None:
    """The scaled sigmoid gives a constant pre-activation a gradient, and the entropy term pushes
    every switched-off row the same way: a full pass moves them all alike. The pass over the live
    bits gives the same loss and the same gradients to every other weight, and none to them."""
    from bae.trainer.merge import switch_off
    from bae.trainer.objectives import NormalizedObjective
    from bae.trainer.pruning import switched_off

    torch.manual_seed(1)
    model = BinaryAutoencoder(ModelConfig(d_model=8, expansion=2, estimator="scaled_sigmoid"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, 8) + 0.5  # a non-zero mean: the direction switched-off rows drift along
    with torch.no_grad():
        if sparse:  # each bit fires on its top 0.5% of rows: the decoder takes its sparse path
            model.encoder.bias.sub_(model.encoder(x).quantile(0.995, dim=0))
        for j in (3, 7):
            switch_off(model.encoder, model.decoder, j, optimizer)
    objective = NormalizedObjective("bae", variance=float(x.var(0).sum()))
    params = dict(model.named_parameters())
    full_loss, _ = objective(x, model(x), 3e-3)
    full = dict(zip(params, torch.autograd.grad(full_loss, list(params.values()))))
    drift = full["encoder.weight"][[3, 7]]
    assert bool((drift != 0).any()) and torch.equal(drift[0], drift[1])  # moved, and alike
    assert switched_off(model).tolist() == [3, 7]
    live = torch.tensor([0, 1, 2, 4, 5, 6, *range(8, 16)])
    out = model(x, live=live)
    assert torch.equal(out.bits, model(x).bits) and bool(out.bits.any())
    assert out.recon.grad_fn is not None
    assert ("SparseDecode" in type(out.recon.grad_fn).__name__) == sparse
    loss, _ = objective(x, out, 3e-3)
    assert torch.allclose(loss, full_loss, rtol=1e-6, atol=0)
    loss.backward()

    def bits_of(name: str, t: torch.Tensor, index: Any) -> torch.Tensor:
        """The entries of parameter ``name``'s tensor ``t`` that belong to the bits ``index``."""
        return t[:, index] if name == "decoder.weight" else t[index] if "encoder" in name else t

    for name, p in params.items():
        assert p.grad is not None
        assert torch.allclose(bits_of(name, p.grad, live), bits_of(name, full[name], live), atol=1e-7), name
        assert name == "decoder.bias" or bool((bits_of(name, p.grad, [3, 7]) == 0).all()), name
    optimizer.step()
    assert bool((model.encoder.weight[[3, 7]] == 0).all()) and bool((model.encoder.bias[[3, 7]] == -1).all())
    assert bool((model.decoder.weight[:, [3, 7]] == 0).all())


@pytest.mark.parametrize(
    "options",
    [
        {"architecture": "topk_sae"},
        {"merge_every": 0},
        {"k_bits": 2},
        {"objective": "paper"},
        {"encoder_bias": False},
    ],
)
def test_prune_reseed_is_refused_where_it_would_do_nothing(options: dict) -> None:
    from bae.trainer.config import TrainConfig

    with pytest.raises(ValueError, match="prune_reseed"):
        TrainConfig(store="s.zarr", layer=0, out="run", prune_reseed=True, **options)
    TrainConfig(store="s.zarr", layer=0, out="run", **options)  # without the option they are fine


def test_the_join_goes_with_the_moves_unless_turned_off() -> None:
    from bae.trainer.config import TrainConfig

    def config(**options: Any) -> TrainConfig:
        return TrainConfig(store="s.zarr", layer=0, out="run", **options)

    assert config().join and config().prune_reseed
    assert not config(join=False).join and config(join=False).prune_reseed
    for options in ({"target_fvu": 0.2}, {"objective": "paper"}, {"prune_reseed": False}):
        assert not config(**options).join and not config(**options).prune_reseed
    with pytest.raises(ValueError, match="join acts with the moves"):
        config(join=True, prune_reseed=False)


def test_the_moves_run_on_one_cpu_thread_and_give_the_threads_back() -> None:
    from bae.trainer.loop import one_cpu_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            raise RuntimeError("a move failed")
        assert torch.get_num_threads() == 2
        with one_cpu_thread(torch.device("meta")):
            assert torch.get_num_threads() == 2  # not a CPU: the host's threads untouched
    finally:
        torch.set_num_threads(before)
