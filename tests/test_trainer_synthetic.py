"""Known ground truth: r independent Bernoulli(0.5) features in random directions -> ~r bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bae.stores import ActivationStore, StoreLayout
from bae.trainer.config import TrainConfig
from bae.trainer.run import train


def synthetic_store(path: Path, r: int, n: int = 8192, d: int = 64, noise: float = 0.05) -> Path:
    """h = Σ_k c_k v_k + noise, c_k ~ Bernoulli(0.5), v_k ~ N(0, I_d); documents of 16 rows."""
    rng = np.random.default_rng(r)
    directions = rng.standard_normal((r, d)).astype(np.float32)
    c = rng.integers(0, 2, (n, r)).astype(np.float32)
    h = c @ directions + noise * rng.standard_normal((n, d)).astype(np.float32)
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


@pytest.mark.parametrize("r", [4, 8, 16])
def test_set_entropy_recovers_r_bits(tmp_path: Path, r: int) -> None:
    store = synthetic_store(tmp_path / "syn.zarr", r)
    config = TrainConfig(
        store=str(store),
        out=str(tmp_path / "run"),
        layer=0,
        steps=1000,
        batch_size=256,
        lr=1e-2,
        estimator="sigmoid",
        lambda_entropy=6e-2,
        lambda_covariance=1e-2,
        entropy_start_steps=500,
        log_every=1000,
        val_every=1000,
        checkpoint_every=1000,
    )
    _, summary = train(config, show_progress=False)
    assert summary["val_rows"] > 500
    assert abs(summary["val_set_entropy"] - r) <= 0.1 * r, summary
    assert summary["val_fvu"] < 0.05, summary
    assert summary["warnings"] == "none", summary


def test_warnings_name_what_makes_a_code_unfit() -> None:
    from bae.trainer.run import code_warnings

    assert code_warnings({"val_varying_bits": 5, "val_fvu": 0.2, "dense_oriented_0.1": 3}, 64) == []
    said = code_warnings({"val_varying_bits": 0, "val_fvu": 1.3, "dense_oriented_0.1": 40}, 64)
    assert len(said) == 3 and "collapsed" in said[0] and "1.3" in said[1] and "40 of 64" in said[2]
