"""Store write and sampler read throughput against numpy writing/reading the same bytes, in one run.

    python benchmarks/bench_store.py [--gib 1.0] [--d 1024] [--dir /tmp] [--checksum/--no-checksum]

Prints MB/s for each path and the ratios store/numpy. Both paths write unit-sized files to the same
directory tree (so both hit the page cache the same way) and read them back in a shuffled unit order.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bae.stores import ActivationStore, StoreLayout, StoreSampler


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="float16 payload to write and read")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--unit-rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bae-bench-", dir=args.dir))
    rows = int(args.gib * (1 << 30) / (2 * args.d)) // args.unit_rows * args.unit_rows
    n_units = rows // args.unit_rows
    payload = rows * args.d * 2
    rng = np.random.default_rng(0)
    # one unit of data reused for every unit: generation stays out of the timings
    unit = rng.standard_normal((args.unit_rows, args.d)).astype(np.float16)
    token_ids = np.zeros(args.unit_rows, np.int32)
    positions = np.arange(args.unit_rows, dtype=np.int32) % 512
    valid = np.ones(args.unit_rows, bool)
    order = rng.permutation(n_units)
    try:
        base = root / "numpy"
        base.mkdir()

        def numpy_write() -> None:
            for u in range(n_units):
                unit.tofile(base / f"{u}.bin")

        def numpy_read() -> None:
            for u in order:
                np.fromfile(base / f"{u}.bin", dtype=np.float16)

        window = 8

        def numpy_sampler_read() -> None:
            """The least work that yields what the sampler yields: shuffled float32 batches."""
            for w in range(0, n_units, window):
                parts = [
                    torch.from_numpy(np.fromfile(base / f"{u}.bin", dtype=np.float16))
                    for u in order[w : w + window]
                ]
                raw = torch.cat(parts).view(-1, args.d)
                perm = torch.from_numpy(rng.permutation(len(raw)))
                x = raw.index_select(0, perm).float()
                for b in range(0, len(x), args.batch):
                    x[b : b + args.batch]

        layout = StoreLayout(
            n_rows=rows, unit_rows=args.unit_rows, d_model=args.d, layers=[0], checksum=args.checksum
        )
        store = ActivationStore.create(str(root / "store"), layout, attrs={"config": {}})

        def store_write() -> None:
            for u in range(n_units):
                start = u * args.unit_rows
                doc_ids = np.arange(start, start + args.unit_rows) // 512
                store.write_unit(u, {0: unit}, token_ids, doc_ids, positions, valid)

        def sampler_read() -> None:
            sampler = StoreSampler(store, 0, args.batch, buffer_rows=window * args.unit_rows, prefetch=2)
            for _, _ in zip(sampler, range(rows // args.batch)):
                pass

        t_np_w = _timed(numpy_write)
        t_st_w = _timed(store_write)
        t_np_r = _timed(numpy_read)
        t_np_s = _timed(numpy_sampler_read)
        t_st_r = _timed(sampler_read)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = payload / 1e6
    print(f"payload: {payload / (1 << 30):.2f} GiB float16, {rows} rows x d={args.d}, {n_units} units")
    print(f"checksum (crc32c): {'on' if args.checksum else 'off'}")
    print(f"numpy write    {mb / t_np_w:8.0f} MB/s")
    print(f"store write    {mb / t_st_w:8.0f} MB/s   ratio {t_np_w / t_st_w:.2f}x  (target >= 0.8x)")
    print(f"numpy read     {mb / t_np_r:8.0f} MB/s   (raw bytes, no decoding: an upper bound)")
    print(f"numpy batches  {mb / t_np_s:8.0f} MB/s   (raw bytes -> shuffled float32 batches)")
    print(
        f"sampler read   {mb / t_st_r:8.0f} MB/s   ratio {t_np_s / t_st_r:.2f}x vs numpy batches "
        f"(target >= 0.8x), {t_np_r / t_st_r:.2f}x vs raw bytes"
    )
    print(f"sampler rows/s {rows / t_st_r:8.0f} (float32 batches of {args.batch}, shuffled)")


if __name__ == "__main__":
    main()
