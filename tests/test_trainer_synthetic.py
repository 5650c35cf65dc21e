"""Known ground truth: r independent Bernoulli(0.5) features in random directions -> ~r bits,
with `bae train`'s defaults at any data scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


def train_defaults(store: Path, out: Path, **options) -> dict:
    """``bae train`` with its defaults (no tuning flags), a short budget and one final validation."""
    config = TrainConfig(
        store=str(store),
        out=str(out),
        layer=0,
        steps=1200,
        batch_size=256,
        log_every=1200,
        val_every=1200,
        checkpoint_every=1200,
        **options,
    )
    return train(config, show_progress=False)[1]


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_default_objective_holds_at_any_data_scale(tmp_path: Path, r: int, scale: float) -> None:
    """With no tuning flags, the code keeps the r true bits and explains the variance at scales
    10⁻² to 10² (the paper objective's λ learns nothing at 10⁻² and is negligible at 10²). The
    overshoot allowed here (up to 2.5 r) is the measured one of docs/method.md §7, not a target."""
    store = synthetic_store(tmp_path / "syn.zarr", r, scale=scale)
    got = train_defaults(store, tmp_path / "run")
    assert got["val_fvu"] <= 0.1, got
    assert r - 0.5 <= got["val_set_entropy"] <= 2.5 * r, got
    assert got["warnings"] == "none", got


def test_target_fvu_is_reached(tmp_path: Path) -> None:
    """Dual ascent on β lands the validation FVU near a loose target with fewer bits; a tight target
    that falls between two code sizes (each true bit is worth ~0.12 of FVU here) is met from below."""
    store = synthetic_store(tmp_path / "syn.zarr", 8)
    loose = train_defaults(store, tmp_path / "loose", target_fvu=0.3)
    tight = train_defaults(store, tmp_path / "tight", target_fvu=0.1)
    assert loose["val_fvu"] == pytest.approx(0.3, abs=0.05), loose
    assert tight["val_fvu"] <= 0.1 + 0.03, tight
    assert loose["val_set_entropy"] < tight["val_set_entropy"] - 1, (loose, tight)


def test_warnings_name_what_makes_a_code_unfit() -> None:
    from bae.trainer.run import code_warnings

    assert code_warnings({"val_varying_bits": 5, "val_fvu": 0.2, "dense_oriented_0.1": 3}, 64) == []
    said = code_warnings({"val_varying_bits": 0, "val_fvu": 1.3, "dense_oriented_0.1": 40}, 64)
    assert len(said) == 3 and "collapsed" in said[0] and "1.3" in said[1] and "40 of 64" in said[2]
    assert code_warnings({"val_fvu": 0.2}, 64, target_fvu=0.19) == []
    assert "off the target 0.1" in code_warnings({"val_fvu": 0.2}, 64, target_fvu=0.1)[0]
