"""Autoencoder models and loss terms against direct reference computations; save/load round trip."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest
import torch

from bae.common.errors import BaeError
from bae.trainer import ModelConfig, build_autoencoder, load_autoencoder
from bae.trainer.config import Architecture
from bae.trainer.models import BinaryAutoencoder, binary_step
from bae.trainer.objectives import (
    Objective,
    covariance_term,
    entropy_term,
    reconstruction_loss,
)
from bae.trainer.provenance import Provenance


@pytest.fixture
def bits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(37, 11, generator=g) < torch.linspace(0.0, 1.0, 11)).float()


def test_reconstruction_is_per_element_mean() -> None:
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    expected = sum((x[i, j] - y[i, j]) ** 2 for i in range(5) for j in range(7)) / 35
    assert torch.isclose(reconstruction_loss(x, y), cast(torch.Tensor, expected))


def test_entropy_is_sum_of_binary_entropies_in_bits(bits: torch.Tensor) -> None:
    expected = 0.0
    for j in range(bits.shape[1]):
        p = float(bits[:, j].mean())
        expected += -sum(q * math.log2(q) for q in (p, 1 - p) if q > 0)
    assert entropy_term(bits).item() == pytest.approx(expected, abs=1e-5)
    assert entropy_term(torch.zeros(4, 3)).item() == pytest.approx(0.0, abs=1e-8)


def test_covariance_is_offdiagonal_abs_sum_of_unbiased_cov(bits: torch.Tensor) -> None:
    cov = np.cov(bits.double().numpy(), rowvar=False, ddof=1)
    expected = np.abs(cov).sum() - np.abs(np.diag(cov)).sum()
    assert covariance_term(bits.double()).item() == pytest.approx(expected, rel=1e-10)


def test_objective_skips_terms_and_switches_entropy_on(bits: torch.Tensor) -> None:
    model = build_autoencoder(ModelConfig(d_model=6, expansion=2))
    x = torch.randn(9, 6)
    out = model(x)
    obj = Objective("bae", lambda_entropy=0.5, lambda_covariance=0.0)
    loss_off, terms_off = obj(x, out, entropy_on=False)
    loss_on, terms_on = obj(x, out, entropy_on=True)
    assert terms_on["entropy"] is not None
    assert "entropy" not in terms_off and "covariance" not in terms_off
    assert torch.isclose(loss_off, reconstruction_loss(x, out.recon))
    assert torch.isclose(loss_on, loss_off + 0.5 * entropy_term(out.bits))
    both = Objective("bae", 0.5, 0.25)(x, out, entropy_on=True)[0]
    assert torch.isclose(both, loss_on + 0.25 * covariance_term(out.bits))
    sae = build_autoencoder(ModelConfig(architecture="relu_sae", d_model=6, expansion=2))
    o = sae(x)
    l1 = Objective("relu_sae", l1_coefficient=0.1)(x, o, entropy_on=True)[0]
    assert torch.isclose(l1, reconstruction_loss(x, o.recon) + 0.1 * o.code.abs().sum(1).mean())


@pytest.mark.parametrize("threshold", ["gt", "ge"])
def test_step_forward_and_straight_through_gradient(threshold: str) -> None:
    z = torch.tensor([-1.0, 0.0, 2e-7, 3.0], requires_grad=True)
    h = binary_step(z, threshold, "ste")
    zero = 1.0 if threshold == "ge" else 0.0
    assert h.tolist() == [0.0, zero, 1.0, 1.0]
    upstream = torch.tensor([1e-6, -2.5, 3.0, 0.5])
    h.backward(upstream)
    assert z.grad is not None
    assert torch.equal(z.grad, upstream)


def test_sigmoid_estimator_gradient() -> None:
    z = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    binary_step(z, "gt", "sigmoid", temperature=0.5).backward(torch.ones(3))
    s = torch.sigmoid(z.detach() / 0.5)
    assert z.grad is not None
    assert torch.allclose(z.grad, s * (1 - s) / 0.5)


def test_bae_forward_matches_formula() -> None:
    model = build_autoencoder(ModelConfig(d_model=5, expansion=3))
    h = torch.randn(4, 5)
    expected_bits = (h @ model.encoder.weight.T + model.encoder.bias > 0).float()
    out = model(h)
    assert torch.equal(out.bits, expected_bits)
    assert torch.allclose(out.recon, expected_bits @ model.decoder.weight.T + model.decoder.bias)


def test_k_bit_pathway_decodes_groups_lsb_first() -> None:
    model = BinaryAutoencoder(ModelConfig(d_model=2, expansion=1, k_bits=3))
    assert model.n_bits == 6
    bits = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(model.code_from_bits(bits), torch.tensor([[5 / 7, 6 / 7]]))


def test_topk_keeps_k_largest() -> None:
    model = build_autoencoder(ModelConfig(architecture="topk_sae", d_model=8, topk=3))
    out = model(torch.randn(10, 8))
    assert ((out.code > 0).sum(1) <= 3).all()
    assert torch.equal(out.bits, (out.code > 0).float())


@pytest.mark.parametrize("arch", ["bae", "relu_sae", "topk_sae"])
def test_save_load_round_trip(tmp_path, arch: Architecture) -> None:
    config = ModelConfig(architecture=arch, d_model=10, expansion=2, standardize=True, topk=4)
    model = build_autoencoder(config, Provenance(store="s", layer=3, d_model=10))
    model.set_normalization(torch.randn(10), torch.rand(10) + 0.5)
    model.save_pretrained(tmp_path / "m")
    loaded = load_autoencoder(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.provenance.layer == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    h = np.random.default_rng(0).standard_normal((33, 10)).astype(np.float32)
    bits = loaded.encode_bits(h)
    assert bits.dtype == bool and bits.shape == (33, loaded.n_bits)
    assert np.array_equal(loaded.encode_packed(h), np.packbits(bits, axis=-1))
    assert np.array_equal(bits, model.encode_bits(torch.from_numpy(h)))
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_refuses_non_model(tmp_path) -> None:
    with pytest.raises(BaeError, match="no saved autoencoder"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BaeError, match="not a bae-autoencoder config"):
        load_autoencoder(tmp_path)
