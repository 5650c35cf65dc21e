"""The activation store: dtypes, overflow, crash safety, concurrent writers, config checks, dask views."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bae_testing.stores import assert_stores_identical, make_store, synthetic_rows, write_units

from bae.common.errors import BaeError
from bae.stores import ActivationStore, StoreLayout
from bae.stores.layout import any_nonfinite


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_each_dtype(tmp_path, dtype):
    _, data = make_store(tmp_path / "s", dtype=dtype, layers=(0, 3))
    reopened = ActivationStore.open(str(tmp_path / "s"))
    assert reopened.meta["dtype"]["logical"] == dtype
    for layer in (0, 3):
        got = reopened.read_layer(layer, 0, reopened.n_rows)
        want = torch.from_numpy(data["layers"][layer]).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(got, want)
    rows = reopened.read_rows(0, reopened.n_rows)
    for name in ("token_ids", "doc_ids", "positions", "valid"):
        np.testing.assert_array_equal(rows[name], data[name])


def test_bfloat16_is_bit_exact(tmp_path):
    layout = StoreLayout(n_rows=300, unit_rows=100, d_model=8, layers=[1], dtype="bfloat16")
    store = ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {}})
    x = torch.randn(300, 8).mul(1e3).to(torch.bfloat16)
    x[0, 0] = torch.finfo(torch.bfloat16).max
    x[0, 1] = torch.finfo(torch.bfloat16).tiny
    ones = np.ones(100, bool)
    for unit in range(3):
        a, b = store.unit_range(unit)
        store.write_unit(unit, {1: x[a:b]}, np.zeros(100), np.zeros(100), np.zeros(100), ones)
    bits = store.read_layer_physical(1, 0, 300)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, x.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(store.read_layer(1, 0, 300), x.float().numpy())


def _one_unit_store(tmp_path, **kw):
    layout = StoreLayout(n_rows=4, unit_rows=4, d_model=2, layers=[0], **kw)
    return ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {}})


def _write(store, x):
    n = len(x)
    return store.write_unit(0, {0: x}, np.zeros(n), np.zeros(n), np.arange(n), np.ones(n, bool))


def test_overflow_is_an_error_by_default(tmp_path):
    store = _one_unit_store(tmp_path)
    x = np.array([[1.0, 2.0], [7e4, 0.0], [0.0, -1e5], [3.0, 4.0]], np.float32)
    with pytest.raises(BaeError, match=r"2 values exceed the float16 range"):
        _write(store, x)
    assert not store.is_done(0)


def test_overflow_clamp_is_counted_never_inf(tmp_path):
    store = _one_unit_store(tmp_path, overflow="clamp")
    x = np.array([[1.0, 2.0], [7e4, 0.0], [0.0, -1e5], [3.0, 4.0]], np.float32)
    assert _write(store, x) == 2
    got = store.read_layer(0, 0, 4)
    assert np.isfinite(got).all()
    assert got[1, 0] == 65504 and got[2, 1] == -65504
    assert store.clamped_counts().tolist() == [2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_any_nonfinite_finds_every_nan_and_inf_and_nothing_else(dtype):
    info = torch.finfo(dtype)
    finite = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, 1.0], dtype=dtype)
    assert not any_nonfinite(finite) and not any_nonfinite(finite[:0])
    for bad in (float("inf"), float("-inf"), float("nan"), -float("nan")):
        x = finite.clone()
        x[3] = bad
        assert any_nonfinite(x) and any_nonfinite(x[2:5]) and not any_nonfinite(x[4:])


def test_nan_is_always_an_error(tmp_path):
    store = _one_unit_store(tmp_path, overflow="clamp")
    x = np.ones((4, 2), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(BaeError, match="NaN or inf"):
        _write(store, x)


WRITER = textwrap.dedent(
    """
    import os, sys, signal
    import numpy as np
    from bae.stores import ActivationStore, StoreLayout
    from bae_testing.stores import synthetic_rows, write_units

    path, mode = sys.argv[1], sys.argv[2]
    rank, world = (int(v) for v in sys.argv[3:5]) if len(sys.argv) > 3 else (0, 1)
    layout = StoreLayout(n_rows=6000, unit_rows=500, d_model=64, layers=[1, 4])
    store = ActivationStore.create(path, layout, attrs={"config": {"seed": 3}})
    data = synthetic_rows(6000, 64, [1, 4], seed=3)
    todo = [u for u in range(store.n_units) if u % world == rank and not store.is_done(u)]
    for u in todo:
        if mode == "die-mid-unit" and u == 5:
            a, b = store.unit_range(u)
            store.group["layers/1"][a:b] = np.full((b - a, 64), 9.0, np.float16)  # half of a unit
            store.group["valid"][a:b] = np.ones(b - a, bool)
            os.kill(os.getpid(), signal.SIGKILL)
        print("unit", u, flush=True)
        write_units(store, data, [u])
    """
)


def _writer(tmp_path, *args):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return [sys.executable, str(script), *args], {"PYTHONPATH": str(Path(__file__).resolve().parent)}


def _run_writer(tmp_path, *args):
    cmd, env = _writer(tmp_path, *args)
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_sigkill_mid_unit_then_rerun_is_identical(tmp_path):
    assert _run_writer(tmp_path, str(tmp_path / "ref"), "full").returncode == 0
    killed = _run_writer(tmp_path, str(tmp_path / "s"), "die-mid-unit")
    assert killed.returncode == -signal.SIGKILL
    partial = ActivationStore.open(str(tmp_path / "s"))
    assert partial.done_mask().tolist() == [True] * 5 + [False] * 7
    assert _run_writer(tmp_path, str(tmp_path / "s"), "full").returncode == 0
    assert_stores_identical(tmp_path / "ref", tmp_path / "s")


def test_sigkill_at_arbitrary_moments_then_rerun_is_identical(tmp_path):
    assert _run_writer(tmp_path, str(tmp_path / "ref"), "full").returncode == 0
    cmd, env = _writer(tmp_path, str(tmp_path / "s"), "full")
    for target in ("unit 2", "unit 7", "unit 11"):
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == target:
                time.sleep(0.005)  # inside the unit's writes
                proc.kill()
                break
        proc.wait()
    assert _run_writer(tmp_path, str(tmp_path / "s"), "full").returncode == 0
    assert_stores_identical(tmp_path / "ref", tmp_path / "s")


def test_two_writers_on_disjoint_units_lose_nothing(tmp_path):
    cmd0, env = _writer(tmp_path, str(tmp_path / "s"), "full", "0", "2")
    cmd1, _ = _writer(tmp_path, str(tmp_path / "s"), "full", "1", "2")
    # the store exists before the writers start, as in a harvest where rank 0 creates it
    layout = StoreLayout(n_rows=6000, unit_rows=500, d_model=64, layers=[1, 4])
    ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {"seed": 3}})
    procs = [subprocess.Popen(c, env={**os.environ, **env}, stdout=subprocess.DEVNULL) for c in (cmd0, cmd1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert _run_writer(tmp_path, str(tmp_path / "ref"), "full").returncode == 0
    assert_stores_identical(tmp_path / "ref", tmp_path / "s")
    store = ActivationStore.open(str(tmp_path / "s"))
    assert store.done_mask().all()
    np.testing.assert_array_equal(store.read_rows(0, 6000)["doc_ids"], np.arange(6000) // 10)


def test_different_config_is_refused_with_the_fields(tmp_path):
    make_store(tmp_path / "s", seed=1)
    layout = StoreLayout(n_rows=1000, unit_rows=256, d_model=16, layers=[2])
    with pytest.raises(BaeError) as err:
        ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {"seed": 2}})
    msg = str(err.value)
    assert "layout.unit_rows: 128 -> 256" in msg and "config.seed: 1 -> 2" in msg


def test_same_config_reopens_and_keeps_progress(tmp_path):
    store, _ = make_store(tmp_path / "s")
    layout = store.layout
    again = ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {"seed": 0}})
    assert again.done_mask().all()


def test_interrupted_creation_is_redone(tmp_path):
    layout = StoreLayout(n_rows=100, unit_rows=50, d_model=4, layers=[0])
    store = ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {}})
    store.group.attrs.put({"bae_incomplete": True})  # as if killed during creation
    with pytest.raises(BaeError, match="creation was interrupted"):
        ActivationStore.open(str(tmp_path / "s"))
    ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {}})
    assert ActivationStore.open(str(tmp_path / "s")).n_rows == 100


def test_bad_stores_are_refused_clearly(tmp_path):
    with pytest.raises(BaeError, match="not found"):
        ActivationStore.open(str(tmp_path / "nope"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(BaeError, match="not a bae activation store"):
        ActivationStore.open(str(tmp_path / "plain"))
    store, _ = make_store(tmp_path / "s")
    meta = dict(store.meta, schema_version=99)
    store.group.attrs.put({"bae": meta})
    with pytest.raises(BaeError, match="schema version 99 is not supported"):
        ActivationStore.open(str(tmp_path / "s"))
    with pytest.raises(BaeError, match="has no layer 5; layers present: 2"):
        make_store(tmp_path / "t")[0].read_layer(5, 0, 10)


def test_write_unit_checks_shapes(tmp_path):
    store = _one_unit_store(tmp_path)
    with pytest.raises(BaeError, match=r"shape \(3, 2\), expected \(4, 2\)"):
        store.write_unit(0, {0: np.zeros((3, 2))}, np.zeros(3), np.zeros(3), np.zeros(3), np.ones(3, bool))


def test_dask_view_matches_reads(tmp_path):
    store, data = make_store(tmp_path / "s", n=1000, unit_rows=128, layers=(2, 5))
    view = store.dask_layer(5)
    assert view.chunks[0][0] == 128 and view.dtype == np.float32
    np.testing.assert_array_equal(view.compute(), store.read_layer(5, 0, 1000))
    np.testing.assert_array_equal(store.dask_rows("positions").compute(), data["positions"])


def test_fsspec_memory_url(tmp_path):
    layout = StoreLayout(n_rows=64, unit_rows=32, d_model=4, layers=[1], dtype="bfloat16")
    store = ActivationStore.create("memory://bae-test/s", layout, attrs={"config": {}})
    data = synthetic_rows(64, 4, [1])
    write_units(store, data, range(2))
    again = ActivationStore.open("memory://bae-test/s")
    assert again.done_mask().all()
    np.testing.assert_allclose(again.read_layer(1, 0, 64), data["layers"][1], rtol=1e-2)


def test_zstd_compressor_round_trip(tmp_path):
    store, data = make_store(tmp_path / "s", compressor={"name": "zstd", "level": 3})
    np.testing.assert_array_equal(
        store.read_layer(2, 0, 1000), data["layers"][2].astype(np.float16).astype(np.float32)
    )


def test_documents_metadata(tmp_path):
    layout = StoreLayout(n_rows=10, unit_rows=10, d_model=2, layers=[0])
    docs = {"k": np.array([0, 1, 2]), "label": np.array(["a", "b", "c"], dtype=object)}
    store = ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {}}, documents=docs)
    got = ActivationStore.open(str(tmp_path / "s")).documents()
    assert got["k"].tolist() == [0, 1, 2] and got["label"].tolist() == ["a", "b", "c"]
    assert store.meta["n_docs"] == 3
