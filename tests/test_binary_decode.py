"""The sparse decoder equals the GEMM it replaces: values and the three gradients, on odd shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bae.trainer import binary_decode
from bae.trainer.binary_decode import SPARSE_DENSITY, decode
from bae.trainer.config import ModelConfig
from bae.trainer.models import build_autoencoder


def sparse_bits(n: int, m: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    bits = (torch.rand(n, m, generator=gen) < density).float()
    bits[: min(3, n)] = 0.0  # rows with no bit on
    return bits


def float64_reference(bits: torch.Tensor, linear: nn.Linear, grad: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients (bits, weight, bias) in float64, from the written-out formulas."""
    b, w, g = bits.double(), linear.weight.detach().double(), grad.double()
    out = b @ w.T + (0 if linear.bias is None else linear.bias.detach().double())
    return [out, g @ w, g.T @ b, g.sum(0)]


@pytest.mark.parametrize(("n", "m", "d"), [(1, 1, 1), (7, 33, 5), (64, 130, 17), (509, 2304, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_decode_equals_the_product_and_its_gradients(n: int, m: int, d: int, bias: bool) -> None:
    torch.manual_seed(n + m)
    linear = nn.Linear(m, d, bias=bias)
    bits = sparse_bits(n, m, SPARSE_DENSITY / 2, seed=m).requires_grad_()
    grad = torch.randn(n, d)
    out = decode(bits, linear.weight, linear.bias)
    assert out.grad_fn is not None and "SparseDecode" in type(out.grad_fn).__name__
    out.backward(grad)
    expected = float64_reference(bits.detach(), linear, grad)
    got = [out.detach(), bits.grad, linear.weight.grad]
    if bias:
        got.append(linear.bias.grad)
    for a, b in zip(got, expected):
        assert a is not None and a.dtype == torch.float32
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5)


def test_dense_codes_and_other_dtypes_take_the_product() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    dense = sparse_bits(32, 64, 0.3, seed=1)
    assert torch.equal(decode(dense, linear.weight, linear.bias), linear(dense))
    sparse = sparse_bits(32, 64, SPARSE_DENSITY / 2, seed=2)
    wide = linear.double()
    assert torch.equal(decode(sparse.double(), wide.weight, wide.bias), wide(sparse.double()))
    linear = linear.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (
            decode(sparse, linear.weight, linear.bias).dtype == torch.bfloat16
        )  # autocast keeps its own path


def test_a_code_with_no_bit_on_decodes_to_the_bias() -> None:
    linear = nn.Linear(100, 6)
    bits = torch.zeros(9, 100, requires_grad=True)
    out = decode(bits, linear.weight, linear.bias)
    assert torch.equal(out.detach(), linear.bias.detach().expand(9, 6))
    out.sum().backward()
    assert linear.weight.grad is not None and not bool(linear.weight.grad.any())
    assert linear.bias.grad is not None and torch.equal(linear.bias.grad, torch.full((6,), 9.0))


def test_a_bae_pass_decodes_a_sparse_code_by_its_active_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's forward goes through the sparse path, and matches the plain decoder."""
    torch.manual_seed(3)
    model = build_autoencoder(ModelConfig(d_model=24, expansion=4))
    x = torch.randn(256, 24)
    with torch.no_grad():  # each bit on for ~0.5% of the rows: a sparse code
        pre = model.encoder(model.encoder_input(x))
        model.encoder.bias.sub_(pre.quantile(0.995, dim=0))
    out = model(x)
    assert 0 < float(out.bits.detach().mean()) <= SPARSE_DENSITY
    assert "SparseDecode" in type(out.recon.grad_fn).__name__
    assert torch.allclose(out.recon, model.decoder(out.code), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(binary_decode, "SPARSE_DENSITY", 0.0)  # the same pass as a GEMM
    assert "SparseDecode" not in type(model(x).recon.grad_fn).__name__


def test_the_sums_are_the_same_bits_on_one_thread_and_two() -> None:
    """Each row's and each column's sum is one thread's, in a fixed order: repeated calls and thread
    counts give bitwise the same output and weight gradient (the sums' own part of a resumed run)."""
    torch.manual_seed(5)
    linear = nn.Linear(2304, 96)
    bits = sparse_bits(509, 2304, SPARSE_DENSITY / 2, seed=5).requires_grad_()
    grad = torch.randn(509, 96)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            linear.zero_grad()
            bits.grad = None
            out = decode(bits, linear.weight, linear.bias)
            out.backward(grad)
            results.append([out.detach(), linear.weight.grad])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a is not None and b is not None and torch.equal(a, b)
