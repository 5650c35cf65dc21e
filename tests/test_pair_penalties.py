"""The fast pairwise penalties equal the plain formulas, values and gradients, on test batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bae.trainer.bit_products import bit_counts, packed_signs
from bae.trainer.config import ModelConfig
from bae.trainer.models import build_autoencoder
from bae.trainer.objectives import CORR_EPS, NormalizedObjective, Objective
from bae.trainer.pair_penalties import abs_covariance, correlation_squares, dense_signs


def plain_covariance(bits: torch.Tensor) -> torch.Tensor:
    """D as the reference code writes it: torch.cov, then the off-diagonal absolute sum."""
    cov = torch.cov(bits.T)
    return cov.abs().sum() - cov.diagonal().abs().sum()


def plain_redundancy(bits: torch.Tensor) -> torch.Tensor:
    centred = bits - bits.mean(dim=0)
    z = centred / (centred.pow(2).mean(dim=0) + CORR_EPS).sqrt()
    corr = z.T @ z / bits.shape[0]
    return (corr.pow(2).sum() - corr.diagonal().pow(2).sum()) / (4 * math.log(2))


def random_bits(n: int, m: int, seed: int) -> torch.Tensor:
    """0/1 columns with firing rates spread over (0, 1), plus a dead and an always-on column."""
    gen = torch.Generator().manual_seed(seed)
    rates = torch.rand(m, generator=gen)
    bits = (torch.rand(n, m, generator=gen) < rates).double()
    bits[:, 3], bits[:, 7] = 0.0, 1.0
    return bits


@pytest.mark.parametrize(
    ("t", "m", "k"), [(1, 1, 1), (63, 5, 7), (64, 64, 3), (509, 130, 70), (1000, 9, 200)]
)
def test_bit_counts_equal_the_float_product(t: int, m: int, k: int) -> None:
    gen = torch.Generator().manual_seed(t)
    a = (torch.rand(t, m, generator=gen) < 0.4).float()
    b = (torch.rand(t, k, generator=gen) < 0.6).float()
    assert torch.equal(bit_counts(a, b), (a.T @ b).int())
    assert torch.equal(bit_counts(a), (a.T @ a).int())


# n = 509 is prime: n·G_jk = n_j·n_k never holds for a varying pair, so no covariance is exactly 0
# and the float reference's sign agrees with the exact one.
@pytest.mark.parametrize(("n", "m", "seed"), [(509, 300, 0), (509, 67, 1), (127, 400, 2)])
def test_abs_covariance_value_and_gradient_equal_the_plain_formula(n: int, m: int, seed: int) -> None:
    bits = random_bits(n, m, seed).requires_grad_()
    fast = abs_covariance(bits)
    (g_fast,) = torch.autograd.grad(fast, bits)
    ref_bits = bits.detach().clone().requires_grad_()
    plain = plain_covariance(ref_bits)
    (g_plain,) = torch.autograd.grad(plain, ref_bits)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-12)
    # plain centring leaves column means of the gradient at rounding level, the exact one at 0
    g_plain = g_plain - g_plain.mean(dim=0)
    assert torch.allclose(g_fast, g_plain, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(g_fast[:, [3, 7]]) == 0
    # float32, as training runs it
    f32 = bits.detach().float().requires_grad_()
    (g32,) = torch.autograd.grad(abs_covariance(f32), f32)
    assert torch.allclose(g32.double(), g_plain, rtol=1e-5, atol=1e-7)


def test_exact_zero_covariances_get_the_zero_subgradient() -> None:
    """With ties (C_jk exactly 0) the exact sign is 0: gradient 2/(n−1)·Z·sign(C) with C from
    integer counts (an independent computation in numpy)."""
    bits = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    bits.requires_grad_()
    (grad,) = torch.autograd.grad(abs_covariance(bits), bits)
    b = bits.detach().numpy().astype(np.int64)
    n = len(b)
    numerator = n * (b.T @ b) - np.outer(b.sum(0), b.sum(0))
    np.fill_diagonal(numerator, 0)
    assert (numerator == 0).sum() > b.shape[1]  # the case under test: off-diagonal ties
    expected = 2 / (n - 1) * (b - b.mean(0)) @ np.sign(numerator)
    assert np.allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-12)
    value = np.abs(numerator).sum() / (n * (n - 1))
    assert abs_covariance(bits).item() == pytest.approx(value, rel=1e-12)


def test_abs_covariance_refuses_values_that_are_not_bits() -> None:
    with pytest.raises(ValueError, match="0/1"):
        abs_covariance(torch.full((4, 3), 0.5))


@pytest.mark.parametrize(("n", "m"), [(32, 100), (100, 32), (50, 50)])
def test_correlation_squares_value_and_gradient_equal_the_plain_formula(n: int, m: int) -> None:
    """Both Gram shapes (n < m, n ≥ m), with constant bits, against autograd of the d'×d' formula."""
    bits = random_bits(n, m, n + m).requires_grad_()
    (g_fast,) = torch.autograd.grad(correlation_squares(bits, CORR_EPS), bits)
    plain = plain_redundancy(bits) * 4 * math.log(2)
    (g_plain,) = torch.autograd.grad(plain, bits)
    assert correlation_squares(bits, CORR_EPS).item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.allclose(g_fast, g_plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["paper", "normalized"])
def test_objective_gradients_equal_the_plain_formulas_on_a_model(objective: str) -> None:
    """Loss and every parameter gradient of a BAE batch: the objective as trained vs the same
    objective written with the plain d'×d' formulas."""
    torch.manual_seed(0)
    model = build_autoencoder(ModelConfig(d_model=24, expansion=4)).double()
    x = torch.randn(509, 24, dtype=torch.float64)
    if objective == "paper":
        fast: Objective = Objective("bae", lambda_covariance=0.3)
    else:
        fast = NormalizedObjective("bae", variance=1.7, gamma=0.6)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, list(model.parameters())))

    out = model(x)
    loss, _ = fast(x, out, 0.2)
    g_fast = grads(loss)
    out = model(x)
    if objective == "paper":
        plain = (x - out.recon).pow(2).mean() + 0.3 * plain_covariance(out.bits)
        p = out.bits.mean(dim=0)
        plain = plain + 0.2 * -(p * torch.log2(p + 1e-10) + (1 - p) * torch.log2(1 - p + 1e-10)).sum()
    else:
        plain = (x - out.recon).pow(2).sum() / (509 * 1.7)
        p = out.bits.mean(dim=0)
        hb = -(p * torch.log2(p + 1e-10) + (1 - p) * torch.log2(1 - p + 1e-10))
        cost = 0.5 * (hb + 2 * torch.minimum(p, 1 - p)).sum() + 0.6 * plain_redundancy(out.bits)
        plain = plain + 0.2 * cost
    assert loss.item() == pytest.approx(plain.item(), rel=1e-10)
    for a, b in zip(g_fast, grads(plain)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("n", "m"), [(64, 150), (4, 40), (509, 90)])
def test_packed_and_dense_signs_agree_with_exact_integers(n: int, m: int) -> None:
    """The CPU popcount path, the dense path (other devices) and numpy's integers agree; n = 64 and
    n = 4 have many exact ties (sign 0)."""
    gen = torch.Generator().manual_seed(n + m)
    bits = (torch.rand(n, m, generator=gen) < 0.5).double()
    bits = bits[:, (bits.sum(0) > 0) & (bits.sum(0) < n)]
    b = bits.numpy().astype(np.int64)
    numerator = n * (b.T @ b) - np.outer(b.sum(0), b.sum(0))
    np.fill_diagonal(numerator, 0)
    sign = np.sign(numerator)
    packed, dense = packed_signs(bits), dense_signs(bits)
    for signs in (packed, dense):
        assert signs.abs_sum == pytest.approx(np.abs(numerator).sum() / (n * (n - 1)), rel=1e-12)
        assert np.allclose(signs.p_sign.numpy(), b.mean(0) @ sign, rtol=1e-12, atol=1e-12)
        assert np.array_equal(signs.product(bits).numpy(), b @ sign)
    bits.requires_grad_()
    (grad,) = torch.autograd.grad(abs_covariance(bits), bits)
    assert np.allclose(grad.numpy(), 2 / (n - 1) * (b - b.mean(0)) @ sign, rtol=1e-12, atol=1e-12)


def exact_numerators(b: np.ndarray) -> np.ndarray:
    """n·G_jk − n_j·n_k in numpy integers, 0 on the diagonal: (n−1)·n·C_jk, exactly."""
    numerator = len(b) * (b.T @ b) - np.outer(b.sum(0), b.sum(0))
    np.fill_diagonal(numerator, 0)
    return numerator


# widths around the 64-bit words and 64-bit tiles (one tile, an odd and an even number of them),
# batches of 2-3 rows (nearly every pair tied), all-zero and all-one bits
@pytest.mark.parametrize(
    ("n", "m", "rate"),
    [
        (2, 1, 0.5),
        (2, 70, 0.5),
        (3, 64, 0.5),
        (65, 63, 0.3),
        (64, 129, 0.5),
        (130, 191, 0.1),
        (509, 200, 0.7),
    ],
)
def test_packed_signs_on_odd_shapes_equal_numpy_integers(n: int, m: int, rate: float) -> None:
    gen = torch.Generator().manual_seed(n * m)
    bits = (torch.rand(n, m, generator=gen) < rate).double()
    bits[:, 0] = 0.0
    bits[:, -1] = 1.0
    b = bits.numpy().astype(np.int64)
    numerator = exact_numerators(b)
    signs = packed_signs(bits)
    assert signs.abs_sum == pytest.approx(np.abs(numerator).sum() / (n * (n - 1)), rel=1e-12, abs=0)
    assert np.allclose(signs.p_sign.numpy(), b.mean(0) @ np.sign(numerator), rtol=1e-12, atol=1e-12)
    assert np.array_equal(signs.product(bits).numpy(), b @ np.sign(numerator))


def test_packed_signs_with_listed_ties_and_dense_ties() -> None:
    """Bits with a few exact-zero covariances have them listed; bits with many (more than words in a
    mask row: a bit that fires on one row of 200 ties with many others) count against both masks.
    Both kinds here, against numpy's integers."""
    gen = torch.Generator().manual_seed(5)
    bits = (torch.rand(200, 300, generator=gen) < torch.rand(300, generator=gen)).float()
    signs = packed_signs(bits)
    assert len(signs.negative) > 0 and len(signs.tie) > 0
    b = bits.numpy().astype(np.int64)
    assert np.array_equal(signs.product(bits).numpy(), b @ np.sign(exact_numerators(b)))


@pytest.mark.parametrize("n", [1, 2])
def test_abs_covariance_on_batches_of_one_and_two_rows(n: int) -> None:
    """One row: every bit constant, no pair varies: D = 0, gradient 0. Two rows: the plain formula."""
    bits = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 1.0]])[:n].requires_grad_()
    value = abs_covariance(bits)
    (grad,) = torch.autograd.grad(value, bits)
    if n == 1:
        assert value.item() == 0.0 and torch.count_nonzero(grad) == 0
        return
    plain_bits = bits.detach().clone().requires_grad_()
    plain = plain_covariance(plain_bits)
    (g_plain,) = torch.autograd.grad(plain, plain_bits)
    assert value.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(grad, g_plain - g_plain.mean(dim=0), atol=1e-6)
