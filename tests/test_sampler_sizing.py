"""The sampler's memory is sized by the store (window, read-ahead, cast slices) without changing
which rows come in which order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from bae_testing.stores import indexed_store, synthetic_rows, write_units

from bae.stores import ActivationStore, StoreLayout, StoreSampler
from bae.stores import sampler as sampler_module


def half_store(path, n=2000, unit_rows=200, d=16) -> tuple[ActivationStore, np.ndarray]:
    """A float16 store of random rows (layer 0) and its rows as float32."""
    layout = StoreLayout(n_rows=n, unit_rows=unit_rows, d_model=d, layers=[0], dtype="float16")
    store = ActivationStore.create(str(path), layout, attrs={"config": {}})
    data = synthetic_rows(n, d, [0])
    write_units(store, data, range(store.n_units))
    return store, data["layers"][0].astype(np.float16).astype(np.float32)


def batches(sampler: StoreSampler, n: int) -> torch.Tensor:
    return torch.cat([b for b, _ in zip(sampler, range(n))])


def test_window_never_larger_than_the_store(tmp_path):
    store, _ = indexed_store(tmp_path / "s", n=1000, unit_rows=100)
    huge = StoreSampler(store, 0, 64, seed=4, buffer_rows=1 << 30)
    exact = StoreSampler(store, 0, 64, seed=4, buffer_rows=1000)
    assert huge.units_per_window == exact.units_per_window == store.n_units
    assert huge.n_windows == 1
    assert huge._window_buffer().shape == (store.n_units, 100, 3)
    # a rank's window holds at most its share of the units
    assert huge._window_buffer(shares=3).shape[0] == 4
    assert torch.equal(batches(huge, 40), batches(exact, 40))  # 40 batches: three epochs


def test_read_ahead_is_bounded_in_bytes(tmp_path, monkeypatch):
    store, _ = indexed_store(tmp_path / "s", n=1000, unit_rows=100)
    window_bytes = 3 * 100 * 3 * 4  # units_per_window × unit_rows × d × float32
    monkeypatch.setattr(sampler_module, "READ_AHEAD_BYTES", 2 * window_bytes)
    assert StoreSampler(store, 0, 10, buffer_rows=300, prefetch=5).prefetch == 2
    assert StoreSampler(store, 0, 10, buffer_rows=300, prefetch=1).prefetch == 1
    monkeypatch.setattr(sampler_module, "READ_AHEAD_BYTES", window_bytes // 2)
    assert StoreSampler(store, 0, 10, buffer_rows=300, prefetch=5).prefetch == 1  # at least one


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetcher_makes_at_most_depth_items_ahead(depth):
    made: list[int] = []

    def source():
        for i in range(20):
            made.append(i)
            yield i

    stop = threading.Event()
    prefetcher = sampler_module._Prefetcher(source(), depth, stop)
    taken = []
    try:
        for item in prefetcher:
            taken.append(item)
            time.sleep(0.05)  # room for the thread to run ahead as far as it may
            assert len(made) <= len(taken) + depth
    finally:
        prefetcher.close()
    assert taken == list(range(20))


def test_order_and_values_do_not_depend_on_memory_settings(tmp_path, monkeypatch):
    """Read-ahead depth and the cast slice size change memory only: the same float32 rows, in the
    same order, as the float16 values widened exactly."""
    store, rows = half_store(tmp_path / "s")
    reference = batches(StoreSampler(store, 0, 50, seed=7, buffer_rows=600, prefetch=1), 90)
    for prefetch, decode_rows in ((3, 4096), (1, 7), (2, 1)):
        monkeypatch.setattr(sampler_module, "DECODE_ROWS", decode_rows)
        got = batches(StoreSampler(store, 0, 50, seed=7, buffer_rows=600, prefetch=prefetch), 90)
        assert torch.equal(got, reference)
    eligible = rows[np.arange(len(rows)) % 10 != 0]  # valid rows: position 0 plays BOS
    first_epoch = reference[: len(eligible)].numpy()
    order = np.lexsort(first_epoch.T[::-1])
    np.testing.assert_array_equal(first_epoch[order], eligible[np.lexsort(eligible.T[::-1])])
