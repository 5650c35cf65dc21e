"""Helpers for store tests: synthetic stores, a CLI runner, array-by-array comparison."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from bae.stores import ActivationStore, StoreLayout


def synthetic_rows(n: int, d: int, layers: list[int], seed: int = 0, doc_len: int = 10) -> dict:
    """Deterministic hidden states and row arrays for ``n`` rows."""
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    return {
        "layers": {layer: rng.standard_normal((n, d)).astype(np.float32) * (layer + 1) for layer in layers},
        "token_ids": (idx * 7) % 1000,
        "doc_ids": idx // doc_len,
        "positions": idx % doc_len,
        "valid": idx % doc_len != 0,  # position 0 plays BOS
    }


def write_units(store: ActivationStore, data: dict, units) -> None:
    for unit in units:
        a, b = store.unit_range(unit)
        store.write_unit(
            unit,
            {layer: x[a:b] for layer, x in data["layers"].items()},
            token_ids=data["token_ids"][a:b],
            doc_ids=data["doc_ids"][a:b],
            positions=data["positions"][a:b],
            valid=data["valid"][a:b],
        )


def make_store(path: Path, n=1000, d=16, layers=(2,), unit_rows=128, seed=0, doc_len=10, **layout_kw):
    layout = StoreLayout(n_rows=n, unit_rows=unit_rows, d_model=d, layers=list(layers), **layout_kw)
    store = ActivationStore.create(str(path), layout, attrs={"config": {"seed": seed}})
    data = synthetic_rows(n, d, list(layers), seed, doc_len)
    write_units(store, data, range(store.n_units))
    return store, data


def indexed_store(path: Path, n: int = 3000, unit_rows: int = 256, doc_len: int = 10):
    """A float32 store of layer 0, d=3, whose rows carry their own row index in column 0."""
    layout = StoreLayout(n_rows=n, unit_rows=unit_rows, d_model=3, layers=[0], dtype="float32")
    store = ActivationStore.create(str(path), layout, attrs={"config": {}})
    data = synthetic_rows(n, 3, [0], doc_len=doc_len)
    data["layers"][0][:, 0] = np.arange(n)
    write_units(store, data, range(store.n_units))
    return store, data


def _attrs_but(group: zarr.Group, config_fields: tuple[str, ...]) -> dict[str, Any]:
    attrs: dict[str, Any] = copy.deepcopy(dict(group.attrs))
    config = attrs.get("bae", {}).get("config") or {}
    for name in config_fields:
        config.pop(name, None)
    return attrs


def assert_stores_identical(a: str | Path, b: str | Path, config_except: tuple[str, ...] = ()) -> None:
    """Every array of two Zarr groups equal, element by element, and the same attributes (but the
    recorded config's ``config_except`` fields, e.g. a corpus read from two places)."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert _attrs_but(ga, config_except) == _attrs_but(gb, config_except)
    names_a = sorted(name for name, _ in ga.arrays()) + sorted(
        f"{g}/{name}" for g, sub in ga.groups() for name, _ in sub.arrays()
    )
    names_b = sorted(name for name, _ in gb.arrays()) + sorted(
        f"{g}/{name}" for g, sub in gb.groups() for name, _ in sub.arrays()
    )
    assert names_a == names_b
    for name in names_a:
        np.testing.assert_array_equal(
            cast(zarr.Array, ga[name])[:], cast(zarr.Array, gb[name])[:], err_msg=name
        )


def run_bae(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real ``bae`` console script; returns the completed process (text output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("bae")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"bae {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
