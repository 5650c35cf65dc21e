"""Known ground truth: r independent Bernoulli(0.5) features in random directions -> ~r bits,
with `bae train`'s defaults at any data scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bae.pipeline.entropy.calibrate import write_set
from bae.pipeline.entropy.synthetic import SyntheticSpec
from bae.stores import ActivationStore, StoreLayout
from bae.trainer.config import TrainConfig
from bae.trainer.run import train


def synthetic_store(
    path: Path, r: int, n: int = 8192, d: int = 64, noise: float = 0.05, scale: float = 1.0
) -> Path:
    """h = scale·(Σ_k c_k v_k + noise), c_k ~ Bernoulli(0.5), v_k ~ N(0, I_d); documents of 16 rows."""
    rng = np.random.default_rng(r)
    directions = rng.standard_normal((r, d)).astype(np.float32)
    c = rng.integers(0, 2, (n, r)).astype(np.float32)
    h = scale * (c @ directions + noise * rng.standard_normal((n, d)).astype(np.float32))
    layout = StoreLayout(n_rows=n, unit_rows=1024, d_model=d, layers=[0], dtype="float32")
    store = ActivationStore.create(path, layout, attrs={"config": {"synthetic_r": r}})
    for u in range(layout.n_units):
        a, b = layout.unit_range(u)
        rows = np.arange(a, b)
        store.write_unit(
            u,
            layers={0: h[a:b]},
            token_ids=rows % 7,
            doc_ids=rows // 16,
            positions=rows % 16,
            valid=np.ones(b - a, bool),
        )
    return path


def train_defaults(store: Path, out: Path, steps: int = 1200, **options) -> dict:
    """``bae train`` with its defaults (no tuning flags), a short budget and one final validation."""
    config = TrainConfig(
        store=str(store),
        out=str(out),
        layer=0,
        steps=steps,
        log_every=steps,
        val_every=steps,
        checkpoint_every=steps,
        **{"batch_size": 256, **options},
    )
    return train(config, show_progress=False)[1]


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_default_objective_holds_at_any_data_scale(tmp_path: Path, r: int, scale: float) -> None:
    """With no tuning flags (the prune/re-seed moves on, γ = 0), the code is the r true bits and
    explains the variance at scales 10⁻² to 10² (the paper objective's λ learns nothing at 10⁻² and
    is negligible at 10²). Measured: r bits, Σ H_b 3.99 / 7.99, FVU 0.0025 / 0.0012 at every scale
    (the runs differ in float rounding only)."""
    store = synthetic_store(tmp_path / "syn.zarr", r, scale=scale)
    got = train_defaults(store, tmp_path / "run")
    assert got["val_fvu"] <= 0.05, got
    assert r - 0.5 <= got["val_set_entropy"] <= 1.3 * r, got
    assert got["warnings"] == "none", got


def test_target_fvu_is_met_with_the_true_code(tmp_path: Path) -> None:
    """At a target FVU of 0.1 the run ends at or below it with the 8 true bits (each worth ~0.12 of
    FVU here, so no code size sits on the target). Bits leave and return over hundreds of steps
    whatever β is (Adam bounds each step): the run settles at a code size near the target, not on
    it (docs/method.md §3)."""
    store = synthetic_store(tmp_path / "syn.zarr", 8)
    target = train_defaults(store, tmp_path / "target", steps=2400, target_fvu=0.1)
    assert target["val_fvu"] <= 0.1 * 1.25, target
    assert abs(target["val_set_entropy"] - 8) <= 1, target


def test_dual_ascent_moves_beta_against_the_fvu_gap() -> None:
    from bae.trainer.target import FVUTarget

    below = FVUTarget(target=0.2, log_beta=math.log(1e-3))
    for _ in range(100):
        below.update(0.05)  # reconstruction better than asked: bits are too cheap
    assert below.beta() > 1e-3
    above = FVUTarget.from_state(json.loads(json.dumps(below.state_dict())))
    assert above == below  # the checkpointed state round-trips exactly
    for _ in range(100):
        above.update(0.6)
    assert above.beta() < below.beta()
    for _ in range(100_000):
        above.update(1.0)
    assert above.beta() == pytest.approx(1e-6)  # clipped
    assert FVUTarget.starting_at(0.2, 3e-3).beta() == pytest.approx(3e-3)  # from the run's --beta
    assert FVUTarget.starting_at(0.2, 0.0).beta() == pytest.approx(1e-6)  # inside the bounds


def test_warnings_name_what_makes_a_code_unfit() -> None:
    from bae.trainer.run import code_warnings

    assert code_warnings({"val_varying_bits": 5, "val_fvu": 0.2, "dense_oriented_0.1": 3}, 64) == []
    said = code_warnings({"val_varying_bits": 0, "val_fvu": 1.3, "dense_oriented_0.1": 40}, 64)
    assert len(said) == 3 and "collapsed" in said[0] and "1.3" in said[1] and "40 of 64" in said[2]
    assert code_warnings({"val_fvu": 0.2}, 64, target_fvu=0.19) == []
    sae = code_warnings({"dense_0.1": 40, "dense_oriented_0.1": 40}, 64, architecture="relu_sae")
    assert sae == ["40 of 64 features are dense (active on > 10% of rows)"]
    assert "off the target 0.1" in code_warnings({"val_fvu": 0.2}, 64, target_fvu=0.1)[0]


def test_sixteen_bits_under_a_wide_variance_span_are_the_code(tmp_path: Path) -> None:
    """A calibration cell of docs/method.md §7 at a seed it did not use: 16 independent bits, d = 64,
    per-dimension variance spanning 10⁴. Without the encoder's preconditioner the defaults kept
    19 bits (Σ H_b +16%) at FVU 0.06–0.08."""
    d = 64
    spec = SyntheticSpec.build("independent", 16, np.zeros(d), np.logspace(0, 2, d), seed=3)
    store = write_set(tmp_path / "s.zarr", spec, 0, 20_000, {"test": "wide span"})
    summary = train_defaults(Path(store.url), tmp_path / "run", steps=3000, batch_size=512)
    assert abs(summary["val_set_entropy"] - 16) <= 1.6, summary
    assert summary["val_fvu"] <= 0.1 and summary["val_varying_bits"] == 16, summary


def test_the_moves_keep_a_sparse_code_small(tmp_path: Path) -> None:
    """The default prune/re-seed moves on a sparse calibration cell at a seed docs/method.md §7 did
    not use: 8 bits firing 5% of the time each (2.29 bits), d = 64, per-dimension variance spanning
    10⁴. Measured: 30 varying bits, Σ H_b 12.1, FVU 0.027 by default; 46 bits, Σ H_b 17.4, FVU 0.103
    with ``--no-prune-reseed``. Still over the truth (§7)."""
    d = 64
    spec = SyntheticSpec.build("sparse", 8, np.zeros(d), np.logspace(0, 2, d), seed=3)
    store = write_set(tmp_path / "s.zarr", spec, 0, 20_000, {"test": "sparse"})
    summary = train_defaults(Path(store.url), tmp_path / "run", steps=3000, batch_size=512)
    assert summary["val_fvu"] <= 0.05, summary
    assert summary["val_varying_bits"] <= 40 and summary["val_set_entropy"] <= 7 * spec.entropy, summary


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_gradient_training_alone_holds_at_any_data_scale(tmp_path: Path, scale: float) -> None:
    """``--no-prune-reseed`` (γ = 1, the defaults before the moves) is scale-free too: 8 independent
    bits at scales 10⁻² to 10². Measured: 8–12 bits (Σ H_b 7.99–11.5), FVU ≤ 0.01; the overshoot
    allowed here (up to 2.5 r) is the measured one of docs/method.md §7, not a target."""
    store = synthetic_store(tmp_path / "syn.zarr", 8, scale=scale)
    got = train_defaults(store, tmp_path / "run", prune_reseed=False)
    assert got["val_fvu"] <= 0.1, got
    assert 7.5 <= got["val_set_entropy"] <= 2.5 * 8, got
    assert got["warnings"] == "none", got
