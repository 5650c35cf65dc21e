"""`bae store info/verify/import` through the real console script, bad input included."""

from __future__ import annotations

import json
import os
from typing import cast

import numpy as np
import pytest
import torch
import zarr
from bae_testing.stores import make_store, run_bae
from safetensors.torch import save_file

from bae.stores import ActivationStore


def test_info_reports_the_store(tmp_path):
    make_store(tmp_path / "s", n=1000, layers=(2, 4))
    proc = run_bae("store", "info", str(tmp_path / "s"), check=True)
    out = proc.stdout
    assert "layers           2, 4" in out and "d_model          16" in out
    assert "900 valid / 1.00k written / 1.00k planned" in out
    assert "8 done / 8 planned (128 rows each)" in out


def test_verify_ok_then_names_truncated_corrupted_and_missing_chunks(tmp_path):
    make_store(tmp_path / "s", n=1000, layers=(2,))
    ok = run_bae("store", "verify", str(tmp_path / "s"))
    assert ok.returncode == 0 and "OK; 8 units checked" in ok.stdout
    chunk3 = tmp_path / "s" / "layers" / "2" / "c" / "3" / "0"
    chunk3.write_bytes(chunk3.read_bytes()[:100])  # truncated
    chunk6 = tmp_path / "s" / "positions" / "c" / "6"
    raw = bytearray(chunk6.read_bytes())
    raw[10] ^= 0xFF  # one flipped byte: caught by the chunk checksum
    chunk6.write_bytes(bytes(raw))
    (tmp_path / "s" / "layers" / "2" / "c" / "1" / "0").unlink()  # a recorded unit lost a chunk file
    bad = run_bae("store", "verify", str(tmp_path / "s"))
    assert bad.returncode == 1
    assert "unit 1 (rows 128..256): layer 2: unreadable chunk" in bad.stdout and "is missing" in bad.stdout
    assert "unit 3 (rows 384..512): layer 2: unreadable chunk" in bad.stdout
    assert "unit 6 (rows 768..896): row arrays: unreadable chunk" in bad.stdout
    assert "3 bad unit(s)" in bad.stdout


def test_verify_lists_unwritten_units_without_failing(tmp_path):
    store, _ = make_store(tmp_path / "s", n=1000)
    cast(zarr.Array, store.group["units/done"])[4] = 0
    proc = run_bae("store", "verify", str(tmp_path / "s"))
    assert proc.returncode == 0 and "7 units checked, 1 not yet written" in proc.stdout


def _check_import(tmp_path, src, x, *extra):
    out = tmp_path / "imported"
    run_bae("store", "import", str(src), "--out", str(out), "--layer", "7", *extra, check=True)
    store = ActivationStore.open(str(out))
    assert store.layers == [7] and store.n_rows == len(x)
    np.testing.assert_array_equal(store.read_layer(7, 0, len(x)), x.astype(np.float16).astype(np.float32))
    rows = store.read_rows(0, len(x))
    np.testing.assert_array_equal(rows["doc_ids"], np.arange(len(x)))
    assert (rows["positions"] == 0).all() and rows["valid"].all()


def test_import_npy_safetensors_zarr(tmp_path):
    x = np.random.default_rng(0).standard_normal((700, 12)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    _check_import(tmp_path, tmp_path / "a.npy", x, "--unit-rows", "256")
    save_file({"acts": torch.from_numpy(x), "other": torch.zeros(2)}, tmp_path / "a.safetensors")
    _check_import(tmp_path / "st", tmp_path / "a.safetensors", x, "--tensor", "acts")
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=x.shape, dtype="float32", chunks=(100, 12))
    z[:] = x
    _check_import(tmp_path / "zz", tmp_path / "a.zarr", x)


def test_import_with_a_config_file_and_flag_override(tmp_path):
    x = np.ones((50, 4), np.float32)
    np.save(tmp_path / "a.npy", x)
    cfg = tmp_path / "imp.yaml"
    cfg.write_text(f"src: {tmp_path / 'a.npy'}\nout: {tmp_path / 'o'}\nlayer: 3\ndtype: bfloat16\n")
    run_bae("store", "import", "--config", str(cfg), "--layer", "9", check=True)
    store = ActivationStore.open(str(tmp_path / "o"))
    assert store.layers == [9] and store.meta["dtype"]["logical"] == "bfloat16"
    assert store.meta["config"]["layer"] == 9


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["store", "info", "{tmp}/missing"], "store {tmp}/missing: not found"),
        ("plain", ["store", "verify", "{tmp}/plain"], "is not a bae activation store"),
        (
            "npy4d",
            ["store", "import", "{tmp}/x.npy", "--out", "{tmp}/o"],
            "array shape (4, 2, 2, 2), expected [N, d] or [batch, seq, d]",
        ),
        ("npy", ["store", "import", "{tmp}/x.npy", "--out", "{tmp}/o", "--dtype", "float8"], "field 'dtype'"),
        ("npy", ["store", "import", "{tmp}/nope.npy", "--out", "{tmp}/o"], "nope.npy: not found"),
        ("badcfg", ["store", "import", "--config", "{tmp}/c.yaml"], "unknown field 'colour'"),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, setup, args, message):
    tmp = str(tmp_path)
    if setup == "plain":
        (tmp_path / "plain").mkdir()
    if setup == "npy4d":
        np.save(tmp_path / "x.npy", np.zeros((4, 2, 2, 2), np.float32))
    if setup == "npy":
        np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    if setup == "badcfg":
        (tmp_path / "c.yaml").write_text(json.dumps({"src": "a.npy", "out": "o", "colour": "red"}))
    proc = run_bae(*(a.format(tmp=tmp) for a in args))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=tmp) in lines[0]
    assert not os.path.exists(tmp_path / "o")


def test_unknown_schema_version_via_cli(tmp_path):
    store, _ = make_store(tmp_path / "s")
    store.group.attrs.put({"bae": dict(store.meta, schema_version=2)})
    proc = run_bae("store", "info", str(tmp_path / "s"))
    assert proc.returncode == 2 and "schema version 2 is not supported" in proc.stderr
