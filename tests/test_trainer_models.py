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
from bae.trainer.merge import bit_correlation, merge_duplicate_bits
from bae.trainer.models import BinaryAutoencoder, binary_step
from bae.trainer.objectives import (
    NormalizedObjective,
    Objective,
    code_bits_term,
    covariance_term,
    entropy_term,
    fvu_term,
    reconstruction_loss,
    redundancy_term,
)
from bae.trainer.provenance import Provenance
from bae.trainer.run import make_optimizer
from bae.trainer.scale import estimate_scale


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
    obj = Objective("bae", lambda_covariance=0.0)
    loss_off, terms_off = obj(x, out, 0.0)  # before the entropy start
    loss_on, terms_on = obj(x, out, 0.5)
    assert terms_on["entropy"] is not None
    assert "entropy" not in terms_off and "covariance" not in terms_off
    assert torch.isclose(loss_off, reconstruction_loss(x, out.recon))
    assert torch.isclose(loss_on, loss_off + 0.5 * entropy_term(out.bits))
    both = Objective("bae", 0.25)(x, out, 0.5)[0]
    assert torch.isclose(both, loss_on + 0.25 * covariance_term(out.bits))
    sae = build_autoencoder(ModelConfig(architecture="relu_sae", d_model=6, expansion=2))
    o = sae(x)
    l1 = Objective("relu_sae", l1_coefficient=0.1)(x, o, 0.5)[0]
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


def test_normalized_terms_equal_direct_computations(bits: torch.Tensor) -> None:
    b = bits.double().numpy()
    p = b.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        hb = -np.nan_to_num(p * np.log2(p)) - np.nan_to_num((1 - p) * np.log2(1 - p))
    assert code_bits_term(bits.double()).item() == pytest.approx(
        (0.5 * (hb + 2 * np.minimum(p, 1 - p))).sum()
    )
    # ρ with ε = 1e-4 added to each bit's variance (constant bits then have ρ = 0)
    z = (b - p) / np.sqrt(b.var(0) + 1e-4)
    rho = z.T @ z / len(b)
    expected = (np.triu(rho, 1) ** 2).sum() / (2 * math.log(2))
    assert redundancy_term(bits.double()).item() == pytest.approx(expected, rel=1e-12)
    x, recon = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    assert fvu_term(x, recon, 2.5).item() == pytest.approx(((x - recon) ** 2).sum().item() / (9 * 2.5))


def test_normalized_objective_adds_beta_times_bits() -> None:
    model = build_autoencoder(ModelConfig(d_model=6, expansion=2))
    x = torch.randn(16, 6)
    out = model(x)
    obj = NormalizedObjective("bae", variance=3.0, gamma=0.5)
    off, terms_off = obj(x, out, 0.0)
    on, _ = obj(x, out, 0.2)
    assert torch.isclose(off, fvu_term(x, out.recon, 3.0)) and "code_bits" not in terms_off
    cost = code_bits_term(out.bits) + 0.5 * redundancy_term(out.bits)
    assert torch.isclose(on, off + 0.2 * cost)


def test_merging_a_duplicate_or_complement_keeps_the_reconstruction() -> None:
    torch.manual_seed(0)
    model = build_autoencoder(ModelConfig(d_model=5, expansion=1))
    with torch.no_grad():
        model.encoder.weight[3] = model.encoder.weight[0]  # bit 3 copies bit 0
        model.encoder.bias[3] = model.encoder.bias[0]
        model.encoder.weight[4] = -model.encoder.weight[1]  # bit 4 complements bit 1 (ties aside)
        model.encoder.bias[4] = -model.encoder.bias[1]
    x = torch.randn(400, 5)
    before = model(x)
    b = before.bits.detach().double()
    corr = bit_correlation(len(b), b.sum(0), b.T @ b)
    assert corr[0, 3] == pytest.approx(1.0) and corr[1, 4] == pytest.approx(-1.0)
    merged = merge_duplicate_bits(corr, model.encoder, model.decoder, threshold=0.95)
    after = model(x)
    assert merged == 2 and not after.bits[:, 3:].any()
    torch.testing.assert_close(after.recon, before.recon.detach(), atol=1e-5, rtol=0)


def test_scale_flags_massive_rows_and_global_scale_sets_v_to_d() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) * torch.linspace(0.1, 3.0, 8)
    x[::100] += 300.0  # 1% "attention sink" rows, far outside
    scale = estimate_scale(x, "global", 10.0)
    assert scale.variance == pytest.approx(8.0, rel=1e-6)  # typical rows in the global scale: V = d
    assert scale.typical_radius is not None
    norm = (x - scale.mean) / scale.std
    assert ((norm.pow(2).sum(1) > scale.typical_radius) == (torch.arange(2000) % 100 == 0)).all()
    assert estimate_scale(x, "none", 0.0).typical_radius is None


def test_adam_is_fused_on_cpu_and_a_resumed_optimizer_keeps_its_recorded_choice() -> None:
    """The fused kernel updates as the per-op loop does (to float rounding); an optimizer state
    written by a build without it restores unfused, so an older run resumes bit for bit."""
    torch.manual_seed(0)
    model = build_autoencoder(ModelConfig(d_model=8, expansion=2))
    fused = make_optimizer(model, 1e-2, torch.device("cpu"))
    assert fused.param_groups[0]["fused"] is True
    twin = build_autoencoder(ModelConfig(d_model=8, expansion=2))
    twin.load_state_dict(model.state_dict())
    loop = torch.optim.Adam(twin.parameters(), lr=1e-2)
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            (m(x).recon - x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    resumed = make_optimizer(twin, 1e-2, torch.device("cpu"))
    resumed.load_state_dict(loop.state_dict())
    assert not resumed.param_groups[0]["fused"]
