"""Direct chunk-file I/O: byte-identical to Zarr's encoding, read back by Zarr, errors name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bae_testing.stores import synthetic_rows, write_units

from bae.common.errors import BaeError
from bae.stores import ActivationStore, StoreLayout
from bae.stores.layout import LogicalDtype


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zarr.json" and not p.name.startswith(".bae-flag-")
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("checksum", [True, False])
def test_chunk_files_are_byte_identical_to_zarr(tmp_path, dtype, checksum):
    # 1000 rows in units of 128: the last unit is a partial edge chunk, padded with the fill value
    _assert_identical_to_zarr(tmp_path, 1000, 128, 8, dtype, checksum)


def test_large_chunks_checksummed_beside_the_write_are_identical_to_zarr(tmp_path):
    # 2 MiB chunks: the checksum is computed on another thread while the values are written
    _assert_identical_to_zarr(tmp_path, 2500, 1024, 512, "float32", True)


def _assert_identical_to_zarr(
    tmp_path: Path, n: int, unit_rows: int, d: int, dtype: LogicalDtype, checksum: bool
):
    layout = StoreLayout(
        n_rows=n, unit_rows=unit_rows, d_model=d, layers=[1, 4], dtype=dtype, checksum=checksum
    )
    data = synthetic_rows(n, d, [1, 4])
    direct = ActivationStore.create(str(tmp_path / "direct"), layout, attrs={"config": {}})
    assert set(direct._chunk_files) == set(direct._arrays)  # every array takes the direct path
    write_units(direct, data, range(direct.n_units))

    # the same values written by Zarr itself
    via_zarr = ActivationStore.create(str(tmp_path / "zarr"), layout, attrs={"config": {}})
    arrays = via_zarr._arrays  # zarr.Array handles
    for layer in (1, 4):
        arrays[f"layers/{layer}"][:] = direct.read_layer_physical(layer, 0, n)
    for name in ("token_ids", "doc_ids", "positions", "valid"):
        arrays[name][:] = np.asarray(data[name]).astype(arrays[name].dtype)
    arrays["units/done"][:] = 1
    arrays["units/clamped"][:] = 0

    assert _files(tmp_path / "direct") == _files(tmp_path / "zarr")
    # done flags are hard links to one file holding 1
    flag = tmp_path / "direct" / "units" / "done" / ".bae-flag-01"
    assert flag.read_bytes() == b"\x01" and flag.stat().st_nlink == 1 + direct.n_units
    # and the direct reader reads what Zarr wrote
    last = via_zarr.n_units - 1
    np.testing.assert_array_equal(
        via_zarr.read_unit_layer(4, last), direct.read_layer_physical(4, last * unit_rows, n)
    )
    assert via_zarr.read_unit_rows(last)["positions"].tolist() == list(data["positions"][last * unit_rows :])


def test_reads_into_a_caller_buffer(tmp_path):
    layout = StoreLayout(n_rows=256, unit_rows=128, d_model=4, layers=[0])
    store = ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {}})
    data = synthetic_rows(256, 4, [0])
    write_units(store, data, range(2))
    buffer = np.empty((128, 4), np.float16)
    got = store.read_unit_layer(0, 1, buffer)
    assert np.shares_memory(got, buffer)
    np.testing.assert_array_equal(got, data["layers"][0][128:].astype(np.float16))
    with pytest.raises(ValueError, match="C-contiguous float16 array of shape"):
        store.read_unit_layer(0, 1, np.empty((128, 4), np.float32))


def test_damaged_chunk_files_are_errors_naming_the_file(tmp_path):
    layout = StoreLayout(n_rows=256, unit_rows=128, d_model=4, layers=[0])
    store = ActivationStore.create(str(tmp_path / "s"), layout, attrs={"config": {}})
    write_units(store, synthetic_rows(256, 4, [0]), range(2))
    chunk = tmp_path / "s" / "layers" / "0" / "c" / "1" / "0"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[:-1])
    with pytest.raises(BaeError, match=r"c/1/0 has 1027 bytes, expected 1028"):
        store.read_unit_layer(0, 1)
    flipped = bytearray(raw)
    flipped[3] ^= 1
    chunk.write_bytes(bytes(flipped))
    with pytest.raises(BaeError, match="checksum mismatch"):
        store.read_unit_layer(0, 1)
    chunk.unlink()
    with pytest.raises(BaeError, match=r"c/1/0 is missing"):
        store.read_unit_layer(0, 1)


def test_compressed_and_remote_stores_go_through_zarr(tmp_path):
    layout = StoreLayout(n_rows=64, unit_rows=32, d_model=4, layers=[0], compressor={"name": "zstd"})
    compressed = ActivationStore.create(str(tmp_path / "z"), layout, attrs={"config": {}})
    assert not any(name.startswith("layers/") for name in compressed._chunk_files)
    data = synthetic_rows(64, 4, [0])
    write_units(compressed, data, range(2))
    np.testing.assert_array_equal(compressed.read_unit_layer(0, 1), data["layers"][0][32:].astype(np.float16))
    remote = ActivationStore.create("memory://bae-direct/s", layout, attrs={"config": {}})
    assert remote._chunk_files == {}
