"""The polish (bae.trainer.polish): each of its steps against an independent computation, and the
whole on a planted code that starts tangled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bae.trainer.config import ModelConfig, TrainConfig
from bae.trainer.models import BinaryAutoencoder
from bae.trainer.objectives import bit_cost
from bae.trainer.polish import Code, LeastSquares, Polisher, polish

BETA = 3e-3


def planted(
    n: int = 6000, d: int = 16, r: int = 6, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Rows x = Σ_k t_k a_k v_k over dimensions of scales 1..10 + isotropic noise of 2% of the
    variance, the fair bits t [n, r],
    and the decoding map P [d, r] (least squares from x back to t)."""
    rng = np.random.default_rng(seed)
    t = rng.random((n, r)) < 0.5
    v = rng.standard_normal((r, d)) * np.logspace(0, 1, d)
    v *= np.exp(rng.uniform(0, np.log(4), r))[:, None] / np.linalg.norm(v, axis=1, keepdims=True)
    x = t @ v
    x += rng.standard_normal((n, d)) * np.sqrt(0.02 * x.var(0).sum() / d)  # isotropic: no split of it pays
    centred = x - x.mean(0)
    p = np.linalg.lstsq(centred, t - t.mean(0), rcond=None)[0]
    return torch.from_numpy(centred.astype(np.float32)), t, p


def objective(bits: np.ndarray, x: np.ndarray) -> float:
    """L = FVU + β·S of a code with its least-squares decoder (numpy, from scratch)."""
    a = np.c_[bits.astype(float), np.ones(len(bits))]
    coef = np.linalg.lstsq(a, x, rcond=None)[0]
    fvu = ((x - a @ coef) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return float(fvu + BETA * bit_cost(torch.from_numpy(bits.mean(0))).sum())


def polisher(x: torch.Tensor) -> Polisher:
    variance = float((x - x.mean(0)).pow(2).sum(1).mean())
    return Polisher(x, x, torch.ones(x.shape[1]), BETA, variance, intercept=True, n_bits=16)


def test_reassign_is_one_bit_at_a_time_in_order() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((300, 7)).astype(np.float32))
    bits = torch.from_numpy((rng.random((300, 9)) < 0.4).astype(np.float32))
    fit = LeastSquares(bits, x, intercept=True)
    got = polisher(x).reassign(bits, fit).numpy()

    w, b0 = fit.columns.float().numpy(), fit.bias.float().numpy()
    want = bits.numpy().copy()
    for i in range(len(want)):  # each row, each bit in order: the value with the smaller error
        for j in range(want.shape[1]):
            errors = []
            for value in (0.0, 1.0):
                want[i, j] = value
                errors.append(float(((x[i].numpy() - want[i] @ w - b0) ** 2).sum()))
            want[i, j] = float(errors[1] < errors[0])
    np.testing.assert_array_equal(got, want)


def test_least_squares_drop_is_a_refit() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 5))
    bits = (rng.random((400, 8)) < 0.3).astype(np.float64)

    def sse(b: np.ndarray) -> tuple[float, np.ndarray]:
        a = np.c_[b, np.ones(len(b))]
        coef = np.linalg.lstsq(a, x, rcond=None)[0]
        return float(((x - a @ coef) ** 2).sum()), coef

    fit = LeastSquares(torch.from_numpy(bits), torch.from_numpy(x), intercept=True)
    full, _ = sse(bits)
    costs = fit.removal_costs().numpy()
    for j in range(bits.shape[1]):
        assert costs[j] == pytest.approx(sse(np.delete(bits, j, 1))[0] - full, rel=1e-6, abs=1e-9)
    fit.drop(3)
    fit.drop(5)
    rest = [j for j in range(8) if j not in (3, 5)]
    _, coef = sse(bits[:, rest])
    np.testing.assert_allclose(fit.coef.numpy()[[*rest, 8]], coef, atol=1e-8)
    assert not fit.kept[[3, 5]].any() and fit.kept[rest].all()
    assert np.isinf(fit.removal_costs().numpy()[[3, 5]]).all()


def test_refit_threshold_agrees_with_the_most_rows() -> None:
    x, t, _ = planted(n=2000)
    bits = torch.from_numpy(t.astype(np.float32))
    bits[:50, 0] = 1 - bits[:50, 0]  # a few rows the truth's threshold cannot follow
    pol = polisher(x)
    code = pol.refit_encoder(Code(bits, torch.arange(bits.shape[1])))
    assert code is not None and code.directions is not None and code.thresholds is not None
    proj = (x @ code.directions.T).numpy()
    for j in range(bits.shape[1]):
        target = bits[:, j].numpy()
        order = np.sort(proj[:, j])
        cuts = np.r_[order[0] - 1, (order[1:] + order[:-1]) / 2, order[-1] + 1]
        best = min(int(((proj[:, j] > c) != target).sum()) for c in cuts)  # every cut, by brute force
        assert int((code.bits[:, j].numpy() != target).sum()) == best
    assert (code.bits[:, 1:].numpy() == t[:, 1:]).all()  # the untouched bits: one threshold each


def test_polish_untangles_a_planted_code() -> None:
    """A code a gradient run ends in: true bit 0 read along a tilted direction (wrong on a quarter
    of the rows), true bit 5 only inside an OR with bit 4, beside 4 alone. The polish finds the six
    true bits, and the model then encodes them and decodes with their least-squares fit."""
    x, t, p = planted()
    model = BinaryAutoencoder(ModelConfig(d_model=x.shape[1], expansion=1))
    # x is centred, so p·x ≈ t − ½ for each true bit: t₄ ∨ t₅ is (t₄ − ½) + (t₅ − ½) > −½, and so on
    rows = [(p[:, 0] + 0.8 * p[:, 1] + 0.8 * p[:, 2], 0.0), (p[:, 1], 0.0), (p[:, 2], 0.0)]
    rows += [(p[:, 3], 0.0), (p[:, 4] + p[:, 5], 0.5), (p[:, 4], 0.0)]
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(-1.0)
        model.decoder.weight.zero_()
        for slot, (w, b) in enumerate(rows):
            model.encoder.weight[slot] = torch.from_numpy(w.astype(np.float32)) * 10
            model.encoder.bias[slot] = float(b) * 10
        model.decoder.weight[:, : len(rows)] = torch.randn(x.shape[1], len(rows))
    start = (model.encode(x).numpy() > 0)[:, : len(rows)]
    assert objective(start, x.numpy()) > objective(t, x.numpy()) + 0.01

    variance = float((x - x.mean(0)).pow(2).sum(1).mean())
    report = polish(model, x, BETA, variance)
    code = model.encode(x).numpy() > 0
    code = code[:, code.any(0) & ~code.all(0)]
    assert report.bits_before == report.bits_after == code.shape[1] == 6 and report.rounds >= 1
    for k in range(6):
        agree = [max((code[:, j] == t[:, k]).mean(), (code[:, j] != t[:, k]).mean()) for j in range(6)]
        assert max(agree) > 0.995
    assert report.objective_after == pytest.approx(objective(code, x.numpy()), rel=1e-4)
    assert report.objective_after < report.objective_before
    with torch.no_grad():
        recon = model(x).recon
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.03  # the model's own decoder is the fit: near the 2% noise floor


def test_polish_grows_a_missing_bit() -> None:
    """Five of six true bits encoded exactly: no round pays, so a bit is grown in a switched-off
    slot, and it is the sixth."""
    x, t, p = planted()
    model = BinaryAutoencoder(ModelConfig(d_model=x.shape[1], expansion=1))
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(-1.0)
        model.decoder.weight.zero_()
        model.encoder.weight[:5] = torch.from_numpy(p[:, :5].T.astype(np.float32)) * 10
        model.encoder.bias[:5] = 0.0
    report = polish(model, x, BETA, float((x - x.mean(0)).pow(2).sum(1).mean()))
    code = model.encode(x).numpy() > 0
    assert (report.bits_before, report.bits_after) == (5, 6) and code[:, 5:].any(0).sum() == 1
    grown = code[:, 5:][:, code[:, 5:].any(0)][:, 0]
    assert max((grown == t[:, 5]).mean(), (grown != t[:, 5]).mean()) > 0.995
    assert report.objective_after == pytest.approx(objective(t, x.numpy()), rel=0.01)


def test_polish_leaves_the_model_alone_when_no_round_pays() -> None:
    """One exact bit on noise-free rows: every round gives the same code and L, none is kept, and
    nothing is written."""
    rng = np.random.default_rng(3)
    t = rng.random(500) < 0.5
    x = torch.from_numpy((np.outer(t - t.mean(), [3.0, -1.0, 0.5, 2.0])).astype(np.float32))
    model = BinaryAutoencoder(ModelConfig(d_model=4, expansion=1))
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(-1.0)
        model.decoder.weight.zero_()
        model.encoder.weight[0] = torch.tensor([3.0, -1.0, 0.5, 2.0])
        model.encoder.bias[0] = 0.0
        model.decoder.weight[:, 0] = torch.tensor([3.0, -1.0, 0.5, 2.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = polish(model, x, BETA, float((x - x.mean(0)).pow(2).sum(1).mean()))
    assert (report.rounds, report.bits_before, report.bits_after) == (0, 1, 1)
    assert report.objective_after == report.objective_before == pytest.approx(BETA, rel=0.02)  # FVU 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_polish_config() -> None:
    base: dict = {"store": "s", "layer": 0, "out": "o"}
    assert TrainConfig.model_validate(base).polish is True  # on with the moves
    assert TrainConfig.model_validate({**base, "target_fvu": 0.1}).polish is False  # no moves there
    assert TrainConfig.model_validate({**base, "target_fvu": 0.1, "polish": True}).polish is True
    assert TrainConfig.model_validate({**base, "objective": "paper"}).polish is False
    with pytest.raises(ValueError, match="polish needs the normalized objective"):
        TrainConfig.model_validate({**base, "objective": "paper", "polish": True})
    with pytest.raises(ValueError, match="polish needs"):
        TrainConfig.model_validate({**base, "polish": True, "encoder_bias": False, "prune_reseed": False})
