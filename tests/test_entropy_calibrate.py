"""``bae entropy calibrate``: synthetic sets of known code entropy at a store's scale, end to end.

The generator is checked on its own (population moments exact, sample moments close); the command
runs once at d=16 and is re-run to show it reuses its sets and runs. Whether training passes is not
asserted: with today's default training it does not; the table only has to be well formed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bae.pipeline.entropy.calibrate import COLUMNS, CalibrateConfig
from bae.pipeline.entropy.synthetic import KINDS, SyntheticSpec, true_entropy
from bae.pipeline.entropy.verdict import VERDICTS
from bae.stores import ActivationStore, StoreLayout, split_mask

D, LAYER = 16, 3
SCALE = np.logspace(0, 2, D)  # per-dimension std over 100x
OFFSET = np.linspace(-50, 50, D)


def h_b(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def make_source(path: Path, n: int = 3000, sink: float = 0.0) -> ActivationStore:
    """A store of scaled Gaussian rows at layer LAYER (documents of 10 rows, every row valid); with
    ``sink`` > 0 every 20th row adds ``sink`` to dimension 0 (an attention sink)."""
    rng = np.random.default_rng(0)
    x = (OFFSET + rng.standard_normal((n, D)) * SCALE).astype(np.float32)
    x[::20, 0] += sink
    layout = StoreLayout(n_rows=n, unit_rows=1000, d_model=D, layers=[LAYER], dtype="float32")
    store = ActivationStore.create(str(path), layout, {"config": {"test": "calibrate"}})
    for unit in range(store.n_units):
        a, b = store.unit_range(unit)
        i = np.arange(a, b)
        store.write_unit(
            unit, {LAYER: x[a:b]}, token_ids=i % 7, doc_ids=i // 10, positions=i % 10, valid=i >= 0
        )
    return store


def bae(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "bae.cli", "entropy", "calibrate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_known_entropy_formulas() -> None:
    assert true_entropy("independent", 4, 0.05, 0.2) == 4.0
    assert true_entropy("markov", 4, 0.05, 0.2) == pytest.approx(1 + 3 * h_b(0.2), abs=1e-12)
    assert true_entropy("sparse", 4, 0.05, 0.2) == pytest.approx(4 * h_b(0.05), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [4, 32])
def test_generator_matches_the_requested_scale(kind: str, r: int) -> None:
    """Population mean and variance per dimension exact (1e-9 relative); a 200k-row sample's within
    5% of each dimension's variance and 0.05 std of its mean; noise is ``noise_fraction`` of it."""
    spec = SyntheticSpec.build(kind, r, OFFSET, SCALE, seed=1, noise_fraction=0.02)
    np.testing.assert_allclose(spec.per_dim_variance(), SCALE**2, rtol=1e-9)
    np.testing.assert_allclose(spec.mean, OFFSET, rtol=1e-9, atol=1e-9)
    assert spec.fvu_floor == pytest.approx(0.02, rel=1e-9)
    states, bits = spec.sample(200_000, stream=0)
    assert states.dtype == np.float32 and bits.shape == (200_000, r)
    np.testing.assert_allclose(states.astype(np.float64).var(0), SCALE**2, rtol=0.05)
    assert np.all(np.abs(states.mean(0) - OFFSET) < 0.05 * SCALE)
    np.testing.assert_array_equal(spec.sample(1000, stream=3)[0], spec.sample(1000, stream=3)[0])  # seeded


def test_store_scale_leaves_sinks_out(tmp_path: Path) -> None:
    """The sets copy the moments of the typical rows: sinks 10⁴ std away on one dimension (5% of the
    rows) would otherwise put their variance, ~10⁷× a typical dimension's, into every synthetic row."""
    from bae.pipeline.entropy.calibrate import store_scale

    store = make_source(tmp_path / "src.zarr", sink=1e4 * SCALE[0])
    mean, std, used, atypical = store_scale(store, LAYER, 3000, seed=0, typical_ratio=10.0)
    assert (used, atypical) == (2850, 150)
    x = store.read_layer(LAYER, 0, 3000).astype(np.float64)
    typical = x[np.arange(3000) % 20 != 0]
    np.testing.assert_allclose(mean, typical.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, typical.std(0, ddof=1), rtol=1e-6)
    _, raw_std, used, atypical = store_scale(store, LAYER, 3000, seed=0, typical_ratio=0.0)
    assert (used, atypical) == (3000, 0) and raw_std[0] > 1000 * std[0]


@pytest.mark.parametrize("kind", ["independent", "sparse"])
@pytest.mark.parametrize("seed, unit", [(2, 1.0), (7, 1e-2)])
def test_bit_shares_are_the_fvu_of_dropping_a_bit(kind: str, seed: int, unit: float) -> None:
    """An ideal decoder that replaces bit k by its mean loses exactly bit k's share of the variance
    (independent bits, fair or sparse), checked on a 200k-row sample at two scales and seeds."""
    spec = SyntheticSpec.build(kind, 4, OFFSET * unit, SCALE * unit, seed=seed)
    shares = spec.bit_shares()
    assert shares.sum() == pytest.approx(1 - spec.fvu_floor, rel=1e-9)  # independent: no cross terms
    states, bits = spec.sample(200_000, stream=0)
    total = states.astype(np.float64).var(0).sum()
    for k in range(4):
        kept = bits.astype(np.float64)
        kept[:, k] = spec.p
        error = states - (spec.offset + kept @ spec.mixing)
        assert error.var(0).sum() / total - spec.fvu_floor == pytest.approx(shares[k], rel=0.03, abs=2e-3)


def test_ranks_flag_parses_and_refuses() -> None:
    config = CalibrateConfig.model_validate({"store": "s", "layer": 0, "out": "o", "ranks": "8,4"})
    assert config.ranks == [4, 8]
    train = config.train_config("set.zarr", "run")
    assert (train.store, train.layer, train.out, train.steps) == ("set.zarr", 0, "run", 10_000)
    tokens = CalibrateConfig.model_validate({"store": "s", "layer": 0, "out": "o", "tokens": 10_000})
    assert tokens.train_config("set.zarr", "run").tokens == 10_000  # default steps do not clash


def test_calibrate_end_to_end_and_reuse(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src.zarr")
    out = tmp_path / "cal"
    args = ["--store", source.url, "--layer", str(LAYER), "-o", str(out), "--ranks", "4"]
    args += ["--rows", "4000", "--steps", "300", "--no-progress"]
    first = bae(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "cells within 10% of the truth" in first.stdout

    with (out / "calibration.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    assert [(row["kind"], row["r"]) for row in rows] == [(k, "4") for k in KINDS]
    truth = {row["kind"]: float(row["truth_bits"]) for row in rows}
    assert truth["independent"] == 4.0
    assert truth["markov"] == pytest.approx(1 + 3 * h_b(0.2), abs=1e-9)
    assert truth["sparse"] == pytest.approx(4 * h_b(0.05), abs=1e-9)
    for row in rows:
        assert row["verdict"] in VERDICTS and row["passed"] in ("True", "False")
        assert int(row["n"]) == 4000 and int(row["code_bits"]) == 4 * D  # every row, as `bae entropy`
        assert math.isfinite(float(row["entropy_bits"])) and math.isfinite(float(row["val_fvu"]))
        assert float(row["fvu_floor"]) == pytest.approx(0.02)
        expected = row["joint_bits"] if row["verdict"] == "resolved" else row["entropy_bits"]
        assert float(row["reported_bits"]) == float(expected)
        within = abs(float(row["reported_bits"]) - float(row["truth_bits"])) <= 0.1 * float(row["truth_bits"])
        assert row["passed"] == str(within)
    summary = json.loads((out / "calibration.json").read_text())
    assert summary["cells"] == 3 and summary["passed"] == sum(row["passed"] == "True" for row in rows)
    for kind in KINDS:
        assert ActivationStore.open(out / "sets" / f"{kind}-r4" / "store.zarr").done_mask().all()
        assert (out / "runs" / f"{kind}-r4" / "model").is_dir()

    def mtimes() -> dict[Path, int]:
        return {
            p: p.stat().st_mtime_ns for d in ("sets", "runs") for p in (out / d).rglob("*") if p.is_file()
        }

    before = mtimes()
    second = bae(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "already complete" in second.stdout
    assert mtimes() == before  # no set rewritten, no run retrained
    with (out / "calibration.csv").open() as f:
        assert list(csv.DictReader(f)) == rows

    held_out = bae(*args, "--split", "val")  # the same runs, measured on their validation rows only
    assert held_out.returncode == 0, held_out.stderr[-2000:]
    assert mtimes() == before and "the val split of 4000 rows" in held_out.stdout
    with (out / "calibration.csv").open() as f:
        val_rows = list(csv.DictReader(f))
    for kind, row in zip(KINDS, val_rows):
        doc_ids = ActivationStore.open(out / "sets" / f"{kind}-r4" / "store.zarr").read_rows(0, 4000)[
            "doc_ids"
        ]
        assert int(row["n"]) == int(split_mask(doc_ids, "val").sum()) < 4000
        assert row["val_fvu"] == rows[KINDS.index(kind)]["val_fvu"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer", str(LAYER), "--ranks", "0"], "field 'ranks'"),
        (["--layer", "7"], "has no layer 7"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path: Path, extra: list[str], message: str) -> None:
    source = make_source(tmp_path / "src.zarr", n=200)
    result = bae("--store", source.url, "-o", str(tmp_path / "cal"), *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
