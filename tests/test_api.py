"""The Python API: StoreDataset through a DataLoader, set_entropy against `bae entropy`, the facade,
and every Python block of docs/api.md run against a small store and checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from bae_testing.entropy import LAYER, make_known_store, save_bae
from bae_testing.stores import indexed_store
from torch.utils.data import DataLoader

from bae import StoreDataset, StoreSampler, load_checkpoint, set_entropy
from bae.common.errors import BaeError
from bae.pipeline.entropy.config import EntropyConfig
from bae.pipeline.entropy.run import run_entropy

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def loader_rows(dataset: StoreDataset, workers: int) -> np.ndarray:
    """The store rows (column 0 of the indexed store) one epoch of a DataLoader yields, in order."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return torch.cat(list(loader))[:, 0].long().numpy()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return indexed_store(tmp_path_factory.mktemp("api") / "idx", n=3000, unit_rows=256)


def test_no_workers_is_the_samplers_epoch(indexed):
    store, data = indexed
    eligible = np.flatnonzero(data["valid"])  # 2700 rows: 27 batches of 100 per epoch
    dataset = StoreDataset(store, 0, batch_size=100, seed=1, buffer_rows=600)
    stream = iter(StoreSampler(store, 0, batch_size=100, seed=1, buffer_rows=600))
    for epoch in range(2):
        dataset.set_epoch(epoch)
        rows = loader_rows(dataset, 0)
        sampler_rows = torch.cat([next(stream) for _ in range(27)])[:, 0].long().numpy()
        assert np.array_equal(rows, sampler_rows)
        assert sorted(rows) == list(eligible)


def test_two_workers_cover_every_row_once_deterministically(indexed):
    store, data = indexed
    eligible = list(np.flatnonzero(data["valid"]))
    dataset = StoreDataset(store, 0, batch_size=64, seed=3, buffer_rows=512)
    epoch0 = loader_rows(dataset, 2)
    assert sorted(epoch0) == eligible
    assert np.array_equal(loader_rows(dataset, 2), epoch0)  # same seed and epoch: same order
    dataset.set_epoch(1)
    epoch1 = loader_rows(dataset, 2)
    assert sorted(epoch1) == eligible and not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, loader_rows(StoreDataset(store, 0, 64, seed=4, buffer_rows=512), 2))


def test_ranks_and_workers_split_the_units(indexed):
    store, data = indexed
    per_rank = [
        loader_rows(StoreDataset(store, 0, 50, seed=2, rank=rank, world_size=2, drop_last=False), 2)
        for rank in range(2)
    ]
    assert sorted(np.concatenate(per_rank)) == list(np.flatnonzero(data["valid"]))
    units = [set(rows // store.unit_rows) for rows in per_rank]
    assert units[0] and units[1] and not units[0] & units[1]  # each rank reads its own units


def test_drop_last_and_a_bad_rank(indexed):
    store, _ = indexed
    batches = list(DataLoader(StoreDataset(store, 0, 1000, drop_last=True), batch_size=None))
    assert [len(b) for b in batches] == [1000, 1000]  # 2700 eligible rows
    assert StoreDataset(store.url, 0, 10).count_rows() == 2700  # a path opens the store
    with pytest.raises(BaeError, match="rank 2 out of range"):
        StoreDataset(store, 0, 10, rank=2, world_size=2)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A store whose codes are known (layer 4, d'=8) and an identity BAE that recovers them."""
    root = tmp_path_factory.mktemp("known")
    store, data = make_known_store(root / "acts.zarr", n_docs=60, doc_len=10)
    return root, store, data, save_bae(root / "runs" / "bae-l4")


def test_set_entropy_equals_bae_entropy(known):
    root, store, data, checkpoint = known
    config = EntropyConfig(
        store=store.url, checkpoints=[str(checkpoint)], out=str(root / "entropy"), group_by="all",
        null_groups=0, bootstrap=40, bootstrap_seed=7, confidence=0.9,
    )  # fmt: skip
    run_entropy(config, show_progress=False)  # `bae entropy` after parsing its flags
    (table,) = pq.read_table(root / "entropy" / "entropy.parquet").to_pylist()
    valid = data["valid"]
    options = {"doc_ids": data["doc_ids"][valid], "bootstrap": 40, "bootstrap_seed": 7, "confidence": 0.9}
    from_states = set_entropy(data["states"][valid], checkpoint, **options)
    from_codes = set_entropy(torch.from_numpy(data["bits"][valid]).int(), **options)
    for result in (from_states, from_codes):
        assert set(result.columns) <= set(table)
        for name, value in result.columns.items():
            assert value == table[name] or (value != value and table[name] != table[name]), name
    assert table["n"] == valid.sum() and {"ci_low", "joint_bits", "upper_bits"} <= set(table)
    assert from_codes.verdict == table["verdict"] and np.isfinite(from_codes.ci_low)


def test_set_entropy_of_a_known_code():
    rng = np.random.default_rng(0)
    codes = np.zeros((4000, 12), bool)
    codes[:, :3] = rng.random((4000, 3)) < 0.5  # 3 fair bits, the rest constant: H = 3 bits
    result = set_entropy(codes)
    assert result.verdict == "resolved" and result.distinct_codes == 8
    assert result.joint_low <= 3.0 <= result.joint_high and abs(result.reported_bits - 3.0) < 0.01
    assert set_entropy(np.zeros((50, 4), bool)).verdict == "collapsed"


def test_set_entropy_refuses_bad_input(known):
    _, _, _, checkpoint = known
    with pytest.raises(BaeError, match="codes must be bool or 0/1"):
        set_entropy(np.full((5, 3), 0.5))
    with pytest.raises(BaeError, match="checkpoint expects d=8"):
        set_entropy(np.zeros((5, 3)), checkpoint)
    with pytest.raises(BaeError, match="doc_ids has 2 entries for 5 rows"):
        set_entropy(np.zeros((5, 3), bool), doc_ids=np.arange(2))
    with pytest.raises(BaeError, match=r"expected a non-empty \[N, d\] array"):
        set_entropy(np.zeros(5, bool))
    with pytest.raises(AttributeError, match="no column 'ci_low'"):
        _ = set_entropy(np.eye(4, dtype=bool)).ci_low


def test_import_bae_stays_light():
    code = "import sys, bae; print(sorted(m for m in ('torch', 'zarr', 'dask') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert load_checkpoint.__name__ == "load_autoencoder"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_every_python_block_of_the_api_doc_runs(known, monkeypatch, capsys):
    root, _, _, _ = known
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(root)  # acts.zarr (layer 4) and runs/bae-l4, as the page assumes
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert f"epoch 1: {namespace['dataset'].count_rows()} rows" in printed
    assert namespace["result"].n == namespace["valid"].sum() and namespace["model"].provenance.layer == LAYER
