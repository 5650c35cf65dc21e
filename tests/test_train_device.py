"""Training off the CPU, checked on the CPU: the float16 dense pair penalties equal numpy's integers
and the popcount path bit for bit; the non-finite check read at log steps stops as the per-step one
does; the TF32 switch is local; bf16 autocast stays near the float32 loss."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from bae.common.errors import BaeError
from bae.trainer.bit_products import bit_counts, packed_signs
from bae.trainer.config import ModelConfig, TrainConfig
from bae.trainer.loop import FiringWindow, JsonlLog, Trainer, TrainState, float32_matmuls, lr_lambda
from bae.trainer.models import build_autoencoder
from bae.trainer.objectives import NormalizedObjective
from bae.trainer.pair_penalties import abs_covariance, dense_signs, exact_counts, exact_product
from bae.trainer.target import FVUTarget


def rates_bits(n: int, m: int, seed: int) -> torch.Tensor:
    """float32 0/1 columns with spread firing rates, a dead and an always-on column."""
    gen = torch.Generator().manual_seed(seed)
    bits = (torch.rand(n, m, generator=gen) < torch.rand(m, generator=gen)).float()
    bits[:, 3], bits[:, 7] = 0.0, 1.0
    return bits


def test_exact_product_is_integer_exact_past_float16_range() -> None:
    """Entries in {−1, 0, 1}, contractions of 5000 terms (sums past 2048, where float16 has gaps)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-1, 2, (7, 5000), generator=gen).float()
    b = torch.randint(0, 2, (5000, 9), generator=gen).float()
    b[:, 0] = 1.0
    a[0] = 1.0  # out[0, 0] = 5000 - ...: a sum of 5000 ones
    expected = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)
    assert expected[0, 0] == 5000
    assert np.array_equal(exact_product(a, b).numpy(), expected)
    ones = torch.ones(4097, 1, dtype=torch.float16)
    assert int((ones.T @ ones).item()) != 4097  # one float16 GEMM cannot hold it: why the slices


@pytest.mark.parametrize(("t", "m", "k"), [(1, 1, 1), (509, 130, 70), (4100, 40, 33)])
def test_dense_counts_equal_numpy_and_the_popcounts(t: int, m: int, k: int) -> None:
    gen = torch.Generator().manual_seed(t)
    a = (torch.rand(t, m, generator=gen) < 0.4).float()
    b = (torch.rand(t, k, generator=gen) < 0.7).float()
    dense = exact_product(a.T, b)
    assert np.array_equal(dense.numpy(), a.numpy().astype(np.int64).T @ b.numpy().astype(np.int64))
    assert torch.equal(dense, bit_counts(a, b))
    assert torch.equal(exact_counts(a), bit_counts(a))  # the CPU dispatch: popcounts


@pytest.mark.parametrize(("n", "m", "small"), [(64, 150, False), (4100, 60, False), (509, 130, True)])
def test_dense_signs_equal_the_packed_signs_bit_for_bit(n: int, m: int, small: bool, monkeypatch) -> None:
    """Σ|C|, pᵀ·sign(C), sign(C) and B·sign(C): the same numbers from both paths (constant columns
    kept on the dense path: their numerators are exactly 0); ``small``: sign blocks of 32 rows and
    slices of 64 terms, so both loops take several turns at a size the CPU does quickly."""
    if small:
        monkeypatch.setattr("bae.trainer.pair_penalties.SIGN_BLOCK", 32)
        monkeypatch.setattr("bae.trainer.pair_penalties.EXACT_SLICE", 64)
    bits = rates_bits(n, m, seed=n + m)
    varying = ((bits.sum(0) > 0) & (bits.sum(0) < n)).nonzero().squeeze(1)
    dense, packed = dense_signs(bits), packed_signs(bits)
    assert dense.abs_sum == packed.abs_sum
    assert torch.equal(dense.p_sign, packed.p_sign) and len(packed.cols) == len(varying)
    assert torch.count_nonzero(dense.p_sign[[3, 7]]) == 0
    b = bits.numpy().astype(np.int64)
    numerator = n * (b.T @ b) - np.outer(b.sum(0), b.sum(0))
    np.fill_diagonal(numerator, 0)
    assert np.array_equal(dense.sign.numpy(), np.sign(numerator))
    assert torch.equal(dense.product(bits), packed.product(bits))
    # the gradient's rounding: (B·sign(C) − pᵀsign(C))·scale, in the bits' dtype on both paths
    assert torch.equal(dense.product(bits, 0.37, centre=True), packed.product(bits, 0.37, centre=True))


@pytest.mark.parametrize("n", [509, 4100])
def test_abs_covariance_dense_equals_popcounts_value_and_gradient(n: int) -> None:
    bits = rates_bits(n, 90, seed=n)
    values, grads = [], []
    for dense in (False, True):
        leaf = bits.clone().requires_grad_()
        value = abs_covariance(leaf, dense=dense)
        (grad,) = torch.autograd.grad(value * 0.7, leaf)
        values.append(value)
        grads.append(grad)
    assert torch.equal(values[0], values[1])
    assert torch.equal(grads[0], grads[1])


def test_dense_abs_covariance_of_values_that_are_not_bits_is_nan() -> None:
    """No host read on the dense path: the misuse shows as NaN, which stops training."""
    assert math.isnan(abs_covariance(torch.full((4, 3), 0.5), dense=True).item())
    with pytest.raises(ValueError, match="0/1"):
        abs_covariance(torch.full((4, 3), 0.5), dense=False)


def trainer_for(tmp_path: Path, check_every_step: bool, saved: list, **options: Any) -> Trainer:
    fields: dict[str, Any] = {"store": "unused", "layer": 0, "out": str(tmp_path), "objective": "paper"}
    fields |= {"steps": 20, "batch_size": 64, "log_every": 5, "checkpoint_every": 5, "entropy_start_steps": 0}
    config = TrainConfig.model_validate(fields | options)
    torch.manual_seed(0)
    model = build_autoencoder(config.autoencoder_config(16))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, config.total_steps()))
    state = TrainState(model, optimizer, scheduler, FiringWindow(config.window_steps, model.n_bits))
    if config.target_fvu is not None:
        state.target = FVUTarget.starting_at(config.target_fvu, float(config.beta or 0.0))

    def save(st: TrainState) -> None:
        saved.append((st.step, all(bool(p.isfinite().all()) for p in st.model.parameters())))

    log = JsonlLog(tmp_path / "log.jsonl", None)
    return Trainer(config, Accelerator(cpu=True), state, log, save, check_every_step=check_every_step)


@pytest.mark.parametrize("check_every_step", [True, False])
def test_a_non_finite_step_stops_with_the_same_error_either_way(
    tmp_path: Path, check_every_step: bool
) -> None:
    """Batch 7 holds an inf: checked every step, the run stops in step 7; checked at log steps
    (the GPU default), at step 10, naming step 7 — and neither writes a non-finite value."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 16, generator=gen) for _ in range(20)]
    batches[7][3, 2] = math.inf
    saved: list = []
    trainer = trainer_for(tmp_path, check_every_step, saved)
    with pytest.raises(BaeError, match=r"training diverged at step 7: .*checkpoint step 5 is kept"):
        trainer.fit(iter(batches), show_progress=False)
    assert trainer.state.step == (7 if check_every_step else 10)
    assert saved == [(5, True)]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5]
    assert all(math.isfinite(v) for v in records[0].values() if isinstance(v, float))


@pytest.mark.parametrize("check_every_step", [True, False])
def test_a_non_finite_fvu_never_moves_the_target_multiplier(tmp_path: Path, check_every_step: bool) -> None:
    """Under --target-fvu the batch FVU is read every step: a non-finite one stops the run at that
    step, before β's dual step (a NaN would clip log β to its floor), with the usual error."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(64, 16, generator=gen) for _ in range(20)]
    batches[7][3, 2] = math.nan
    options = {"objective": "normalized", "target_fvu": 0.3}
    clean = trainer_for(tmp_path / "clean", True, [], **options)
    with pytest.raises(StopIteration):  # seven finite batches, then none
        clean.fit(iter(batches[:7]), show_progress=False)
    trainer = trainer_for(tmp_path / "nan", check_every_step, [], **options)
    with pytest.raises(BaeError, match="training diverged at step 7"):
        trainer.fit(iter(batches), show_progress=False)
    assert trainer.state.step == 7
    assert clean.state.target is not None and trainer.state.target is not None
    assert trainer.state.target.log_beta == clean.state.target.log_beta


def test_deferred_check_trains_identically_when_finite(tmp_path: Path) -> None:
    """Recording the check on the device changes nothing when every step is finite."""
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(64, 16, generator=gen) for _ in range(20)]
    weights = []
    for check_every_step in (True, False):
        trainer = trainer_for(tmp_path / str(check_every_step), check_every_step, [])
        trainer.fit(iter(batches), show_progress=False)
        weights.append([p.detach().clone() for p in trainer.state.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_tf32_switch_is_local_and_only_for_cuda() -> None:
    """The flag is set inside and restored after (an error included); the CPU is never touched.
    (Setting cuBLAS's flag needs no GPU; its effect on a GPU is not measured here.)"""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with float32_matmuls(torch.device("cpu"), True):
        assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), float32_matmuls(torch.device("cuda"), True):
        assert matmul.fp32_precision == "tf32"
        raise RuntimeError
    assert matmul.fp32_precision == before
    recorded = TrainConfig(store="s", layer=0, out="o").recorded()
    del recorded["tf32"]  # a run recorded before the option resumes
    assert TrainConfig.as_recorded_today(recorded)["tf32"] is False


def test_bf16_autocast_loss_is_near_the_float32_loss() -> None:
    """The normalized loss of one batch (d = 256, d' = 1024, 2048 rows) under bf16 autocast vs
    float32: the measured gap documented in docs/training.md (GPU notes) stays under 1%."""
    torch.manual_seed(0)
    model = build_autoencoder(ModelConfig(d_model=256, expansion=4, estimator="scaled_sigmoid"))
    x = torch.randn(2048, 256)
    objective = NormalizedObjective("bae", variance=256.0, gamma=1.0)  # V of standard normal rows
    loss32, _ = objective(x, model(x), 3e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss16, _ = objective(x, out, 3e-3)
    assert out.recon.dtype == torch.bfloat16  # autocast did run the GEMMs in bf16
    assert abs(loss16.item() - loss32.item()) < 0.01 * loss32.item()
