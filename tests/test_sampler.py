"""The streaming sampler: coverage per epoch, determinism, exact resume, filters, DDP shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bae.common.errors import BaeError
from bae.stores import StoreSampler, split_mask


def _indexed_store(tmp_path, n=3000, unit_rows=256, doc_len=10):
    from bae_testing.stores import indexed_store

    return indexed_store(tmp_path / "idx", n, unit_rows, doc_len)


def _rows(batches):
    return torch.cat(batches)[:, 0].long().numpy()


def test_every_eligible_row_once_per_epoch(tmp_path):
    store, data = _indexed_store(tmp_path)
    eligible = np.flatnonzero(data["valid"])
    sampler = StoreSampler(store, 0, batch_size=100, buffer_rows=600, seed=1)
    assert sampler.count_rows() == len(eligible) == 2700
    it = iter(sampler)
    epoch0 = _rows([next(it) for _ in range(27)])
    epoch1 = _rows([next(it) for _ in range(27)])
    assert sorted(epoch0) == sorted(epoch1) == list(eligible)
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    assert sampler.epoch == 2


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    store, _ = _indexed_store(tmp_path)
    a = _rows([b for b, _ in zip(StoreSampler(store, 0, 64, seed=5, buffer_rows=512), range(30))])
    b = _rows([b for b, _ in zip(StoreSampler(store, 0, 64, seed=5, buffer_rows=512), range(30))])
    c = _rows([b for b, _ in zip(StoreSampler(store, 0, 64, seed=6, buffer_rows=512), range(30))])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("stop_after", [1, 7, 42, 43, 61])
def test_resumed_cursor_continues_identical_sequence(tmp_path, stop_after):
    store, _ = _indexed_store(tmp_path)
    full = StoreSampler(store, 0, 64, seed=2, buffer_rows=700)
    reference = _rows([b for b, _ in zip(full, range(80))])
    first = StoreSampler(store, 0, 64, seed=2, buffer_rows=700)
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = first.state_dict()
    resumed = StoreSampler(store, 0, 64, seed=2, buffer_rows=700)
    resumed.load_state_dict(state)
    tail = [b for b, _ in zip(resumed, range(80 - stop_after))]
    assert np.array_equal(_rows(head + tail), reference)


def test_split_never_leaks_a_document(tmp_path):
    store, data = _indexed_store(tmp_path)
    train = _rows([b for b, _ in zip(StoreSampler(store, 0, 50, split="train", val_fraction=0.3), range(40))])
    val_sampler = StoreSampler(store, 0, 10, split="val", val_fraction=0.3)
    val = np.concatenate([rows["doc_ids"] for _, rows in val_sampler.iter_epoch_once()])
    train_docs = set(data["doc_ids"][train])
    assert train_docs and set(val) and not train_docs & set(val)
    assert 0.2 < len(set(val)) / 300 < 0.4
    docs = np.arange(10_000)
    assert not (split_mask(docs, "train", 0.3) & split_mask(docs, "val", 0.3)).any()
    assert (split_mask(docs, "train", 0.3) | split_mask(docs, "val", 0.3)).all()


def test_position_filter_and_invalid_rows(tmp_path):
    store, data = _indexed_store(tmp_path)
    sampler = StoreSampler(store, 0, 30, positions=[0, 3, 4])
    rows = _rows([b for b, _ in zip(sampler, range(20))])
    assert set(data["positions"][rows]) == {3, 4}  # position 0 rows are invalid in this store
    everything = StoreSampler(store, 0, 30, valid_only=False, positions=[0])
    assert everything.count_rows() == 300


def test_ranks_take_disjoint_batches_of_one_stream(tmp_path):
    store, _ = _indexed_store(tmp_path)
    single = [b for b, _ in zip(StoreSampler(store, 0, 40, seed=3), range(20))]
    r0 = [b for b, _ in zip(StoreSampler(store, 0, 40, seed=3, rank=0, world_size=2), range(10))]
    r1 = [b for b, _ in zip(StoreSampler(store, 0, 40, seed=3, rank=1, world_size=2), range(10))]
    assert all(torch.equal(a, b) for a, b in zip(single[0::2], r0))
    assert all(torch.equal(a, b) for a, b in zip(single[1::2], r1))


def test_memory_is_bounded_by_the_window(tmp_path):
    store, _ = _indexed_store(tmp_path, n=5000, unit_rows=100)
    sampler = StoreSampler(store, 0, 10, buffer_rows=300, prefetch=2)
    assert sampler.units_per_window == 3
    buffer = sampler._window_buffer()
    assert buffer.shape[:2] == (3, 100)
    sizes = {len(sampler._load_window(0, w, buffer)) for w in range(sampler.n_windows)}
    assert max(sizes) <= 300


def test_bad_sampler_arguments(tmp_path):
    store, _ = _indexed_store(tmp_path)
    with pytest.raises(BaeError, match="no layer 7; layers present: 0"):
        StoreSampler(store, 7, 10)
    with pytest.raises(BaeError, match="no rows pass the filters"):
        next(iter(StoreSampler(store, 0, 10, positions=[999])))
    state = StoreSampler(store, 0, 10, seed=1).state_dict()
    with pytest.raises(BaeError, match="does not match"):
        StoreSampler(store, 0, 10, seed=2).load_state_dict(state)
