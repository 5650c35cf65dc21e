"""``--device`` for `bae entropy`, `bae features` and `bae evaluate`: the on-device counts (torch ops,
run here on CPU) equal an independent NumPy count and the host path, the device is no part of any
recorded identity, and a device this machine lacks is one clear error with nothing written."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bae_testing.entropy import LAYER, make_known_store, save_bae
from bae_testing.features import make_text_store, save_autoencoder

from bae.cli import main
from bae.common.errors import BaeError
from bae.pipeline.entropy.counts import (
    CountSpec,
    RowKey,
    batch_counts,
    count_groups,
    exact_float,
    merge_all,
    pack_bits,
    poisson_weights,
)
from bae.pipeline.entropy.run import EntropyConfig, run_entropy
from bae.pipeline.evaluate.config import EvaluateConfig
from bae.pipeline.evaluate.run import process_device
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.frequency import run_frequency
from bae.stores import RowFilter, iter_unit_rows
from bae.trainer import load_autoencoder

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``bae ARGS`` run in this process as the console script runs it; its one-line error (exit 2)."""
    argv, sys.argv = sys.argv, ["bae", *args]
    try:
        with pytest.raises(SystemExit) as exit_status:
            main()
    finally:
        sys.argv = argv
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1
    return err


def numpy_counts(keys, inverse, bits, doc_ids, bootstrap, pair_bits):
    """Per group, straight from the rows: rows, ones, bootstrap rows/ones, pair counts, whole codes."""
    weights = poisson_weights(doc_ids, bootstrap, 0) if bootstrap else None
    out = []
    for g in np.unique(inverse):
        sel = inverse == g
        b = bits[sel].astype(np.int64)
        chosen = b[:, list(pair_bits)]
        codes = Counter(bytes(row) for row in np.packbits(bits[sel], axis=1))
        boot = (weights[:, sel], weights[:, sel] @ b) if weights is not None else None
        out.append((keys[g], int(sel.sum()), b.sum(0), boot, chosen.T @ chosen, codes))
    return out


@pytest.mark.parametrize("on_device", [True, False], ids=["torch-ops", "host"])
@pytest.mark.parametrize("d", [13, 64])
def test_batch_counts_equal_an_independent_numpy_count(on_device, d):
    rng = np.random.default_rng(d)
    n, keys = 600, np.array([-2, 4, 7, 30, 31])
    bits = rng.random((n, d)) < rng.random(d)
    bits[:40] = bits[0]  # repeated whole codes
    inverse = np.minimum(rng.geometric(0.4, n) - 1, len(keys) - 1)  # skewed group sizes
    doc_ids = rng.integers(0, 25, n)
    pair_bits = (0, 3, d - 1)
    got = batch_counts(
        keys,
        inverse,
        torch.from_numpy(bits),
        doc_ids,
        bootstrap=5,
        pair_bits=pair_bits,
        on_device=on_device,
    )
    expected = numpy_counts(keys, inverse, bits, doc_ids, 5, pair_bits)
    assert got.codes is not None and got.boot_rows is not None and got.boot_ones is not None
    assert got.pairs is not None
    for i, (key, rows, ones, (boot_w, boot_ones), pairs, codes) in enumerate(expected):
        assert got.keys[i] == key and got.rows[i] == rows
        np.testing.assert_array_equal(got.ones[i], ones)
        np.testing.assert_array_equal(got.boot_rows[:, i], boot_w.sum(1))
        np.testing.assert_array_equal(got.boot_ones[:, i], boot_ones)
        np.testing.assert_array_equal(got.pairs[i], pairs)
        mine = got.codes.group_slices(np.array([key]))[0]
        assert sorted(got.codes.count[mine].tolist()) == sorted(codes.values())
    for name in ("ones", "boot_rows", "boot_ones", "pairs"):
        assert getattr(got, name).dtype == np.int64


def test_device_and_host_paths_give_identical_counts():
    rng = np.random.default_rng(1)
    n, d = 300, 40
    bits = torch.from_numpy(rng.random((n, d)) < 0.3)
    args = (np.array([1, 2, 3]), rng.integers(0, 3, n), bits, rng.integers(0, 9, n))
    kw = {"bootstrap": 3, "pair_bits": (1, 5, 9)}
    a, b = batch_counts(*args, **kw, on_device=True), batch_counts(*args, **kw, on_device=False)
    for name in ("keys", "rows", "ones", "boot_rows", "boot_ones", "pairs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.codes is not None and b.codes is not None
    for name, value in a.codes.arrays().items():
        np.testing.assert_array_equal(value, b.codes.arrays()[name])


@pytest.mark.parametrize("k", [1, 8, 9, 2304])
def test_pack_bits_equals_numpy_packbits(k):
    bits = np.random.default_rng(k).random((17, k)) < 0.5
    np.testing.assert_array_equal(pack_bits(torch.from_numpy(bits)), np.packbits(bits, axis=1))


def test_float_sums_switch_to_float64_where_float32_would_round():
    assert exact_float(2**24 - 1) is torch.float32
    assert exact_float(2**24) is torch.float64
    assert float(torch.tensor(2**24, dtype=torch.float32) + 1) == 2**24  # why


def test_store_counts_on_the_device_path_equal_count_groups(tmp_path):
    """A whole store through the torch ops (on CPU) equals ``count_groups`` under --device cpu."""
    store, _ = make_known_store(tmp_path / "s.zarr", n_docs=20, doc_len=12, unit_rows=64, seed=2)
    ckpt = save_bae(tmp_path / "bae", identity=False, expansion=3, seed=4)
    units = tuple(range(store.n_units))
    spec = CountSpec(store.url, str(ckpt), LAYER, RowFilter(), RowKey("positions"), units, batch_rows=9)
    spec_kw = {"bootstrap": 4, "pair_bits": (0, 5, 11)}
    cpu = count_groups(replace(spec, **spec_kw, device="cpu"), show_progress=False)
    model = load_autoencoder(ckpt)
    parts = []
    for _, x, rows in iter_unit_rows(store, LAYER, RowFilter(), units):
        keys, inverse = np.unique(rows["positions"], return_inverse=True)
        for a in range(0, len(x), 9):
            bits = model.encode(torch.from_numpy(x[a : a + 9]))
            part = batch_counts(
                keys, inverse[a : a + 9], bits, rows["doc_ids"][a : a + 9], **spec_kw, on_device=True
            )
            parts.append(part)
    device = merge_all(parts)
    for name in ("keys", "rows", "ones", "boot_rows", "boot_ones", "pairs"):
        np.testing.assert_array_equal(getattr(device, name), getattr(cpu, name))
    assert device.codes is not None and cpu.codes is not None
    for name, value in device.codes.arrays().items():
        np.testing.assert_array_equal(value, cpu.codes.arrays()[name])


def test_entropy_tables_are_identical_across_device_spellings_and_partials_are_reused(tmp_path):
    store, _ = make_known_store(tmp_path / "s.zarr")
    ckpt = save_bae(tmp_path / "bae", identity=False, expansion=2, seed=1)

    def run(out: str, device: str) -> Path:
        config = EntropyConfig(
            store=store.url,
            checkpoints=[str(ckpt)],
            out=str(tmp_path / out),
            bootstrap=4,
            null_groups=0,
            device=device,
        )
        run_entropy(config, show_progress=False)
        return tmp_path / out

    cpu, auto = run("cpu", "cpu"), run("auto", "auto")
    for name in ("entropy.csv", "entropy.parquet"):
        assert (cpu / name).read_bytes() == (auto / name).read_bytes()
    partials = sorted((cpu / "partials").glob("*/unit-*.npz.zst"))
    assert len(partials) == store.n_units
    written = {p: p.stat().st_mtime_ns for p in partials}
    csv = (cpu / "entropy.csv").read_bytes()
    run("cpu", "auto")  # the same output directory under the other spelling: accepted, partials reused
    assert sorted((cpu / "partials").glob("*/unit-*.npz.zst")) == partials
    assert {p: p.stat().st_mtime_ns for p in partials} == written
    assert (cpu / "entropy.csv").read_bytes() == csv


@NO_CUDA
def test_entropy_on_a_missing_gpu_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    store, _ = make_known_store(tmp_path / "s.zarr")
    ckpt = save_bae(tmp_path / "bae")
    out = tmp_path / "out"
    err = refused(capsys, "entropy", "-s", store.url, "-a", str(ckpt), "-o", str(out), "--device", "cuda")
    assert err.startswith("error: device 'cuda': no CUDA device is visible")
    assert not out.exists()


@NO_CUDA
def test_features_frequency_on_a_missing_gpu_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    make_text_store(tmp_path / "s.zarr", None)
    ckpt = save_autoencoder(tmp_path / "bae", "bae")
    out = tmp_path / "out"
    args = ("features", "frequency", "-s", str(tmp_path / "s.zarr"), "-a", str(ckpt), "-o", str(out))
    err = refused(capsys, *args, "--device", "cuda:0")
    assert err.startswith("error: device 'cuda:0': no CUDA device is visible")
    assert not out.exists()


def test_features_frequency_is_identical_across_device_spellings_and_reused(tmp_path):
    make_text_store(tmp_path / "s.zarr", None)
    ckpt = save_autoencoder(tmp_path / "bae", "relu_sae")

    def config(out: str, device: str) -> FeaturesConfig:
        return FeaturesConfig(
            store=str(tmp_path / "s.zarr"), checkpoint=str(ckpt), out=str(tmp_path / out), device=device
        )

    run_frequency(config("cpu", "cpu"), False, quiet=True)
    run_frequency(config("auto", "auto"), False, quiet=True)
    for name in ("frequency.json", "frequency.csv"):
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes()
    recorded = (tmp_path / "cpu" / "frequency.json").stat().st_mtime_ns
    run_frequency(config("cpu", "auto"), False, quiet=True)  # reused, not recomputed
    assert (tmp_path / "cpu" / "frequency.json").stat().st_mtime_ns == recorded


def test_evaluate_device_overrides_accelerate_and_is_not_recorded_as_shaping():
    state, device = process_device("auto")
    assert device == state.device
    assert process_device("cpu")[1] == torch.device("cpu")
    shaping = EvaluateConfig(device="cpu").shaping()
    assert "device" not in shaping and shaping == EvaluateConfig(device="auto").shaping()


@NO_CUDA
def test_evaluate_on_a_missing_gpu_is_refused():
    with pytest.raises(BaeError, match="no CUDA device is visible"):
        process_device("cuda")


def test_specs_carry_the_spelling_so_each_worker_resolves_auto_itself(tmp_path):
    import pickle

    store, _ = make_known_store(tmp_path / "s.zarr")
    ckpt = save_bae(tmp_path / "bae")
    spec = CountSpec(store.url, str(ckpt), LAYER, RowFilter(), RowKey("positions"), (0,), device="auto")
    assert pickle.loads(pickle.dumps(spec)).device == "auto"
    other = replace(spec, device="cpu")
    assert spec.fingerprint() == other.fingerprint()  # the device shapes no partial count


def test_tie_keys_and_top_selection_as_torch_ops_equal_the_numpy_hash_and_lexsort():
    from bae.common.hashing import mix64, unit_interval
    from bae.pipeline.features.topk import random_keys, select_top

    rows = np.array([0, 1, 7, 2**40 + 3, 2**62 + 11], np.int64)
    cols = np.arange(6, dtype=np.int64)
    keys = random_keys(torch.from_numpy(rows)[:, None], torch.from_numpy(cols)[None, :], 5, 2)
    base = mix64(np.array([5 * 1_000_003 + 2], np.uint64))
    with np.errstate(over="ignore"):
        z = mix64(mix64(rows.astype(np.uint64)[:, None] ^ base) + cols.astype(np.uint64)[None, :])
    np.testing.assert_array_equal(keys.numpy(), unit_interval(z))  # bit for bit
    rng = np.random.default_rng(0)
    primary = torch.from_numpy(rng.integers(0, 4, (9, 40)).astype(np.float64))
    primary[primary == 0] = -torch.inf
    key = torch.from_numpy(rng.integers(0, 3, (9, 40)) / 3)  # ties in both
    got = select_top(primary, key, 12).numpy()
    for g in range(9):
        p, q = primary[g].numpy(), key[g].numpy()
        order = np.lexsort((-q, -p))[:12]
        np.testing.assert_array_equal(p[got[g]], p[order])
        np.testing.assert_array_equal(q[got[g]], q[order])
