"""Store write and sampler read throughput against numpy writing/reading the same bytes, in one run.

    python benchmarks/bench_store.py [--gib 1.0] [--d 1024] [--repeats 4] [--dir /tmp] [--no-checksum]

Prints MB/s for each path and the ratios store/numpy. Both paths write every unit's hidden states and
its four row arrays to fresh files in the same directory tree (so both hit the page cache the same
way), and read the hidden states back in a shuffled unit order.
Every timed phase starts after ``os.sync()``; the two writers take turns going first (the second
one pays for the first one's write-back); each path's median over ``--repeats`` rounds is reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bae.stores import ActivationStore, StoreLayout, StoreSampler


def _timed(fn) -> float:
    os.sync()  # dirty pages of the previous phase are not this phase's cost
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="float16 payload to write and read")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--unit-rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=4, help="rounds (writers take turns going first)")
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
    layout = StoreLayout(
        n_rows=rows, unit_rows=args.unit_rows, d_model=args.d, layers=[0], checksum=args.checksum
    )
    window = 8

    def unit_rows(u: int) -> dict[str, np.ndarray]:
        start = u * args.unit_rows
        doc_ids = np.arange(start, start + args.unit_rows) // 512
        return {"token_ids": token_ids, "doc_ids": doc_ids, "positions": positions, "valid": valid}

    def one_round(r: int) -> dict[str, float]:
        """Every path once, writing fresh files (as a harvest does), reading them back."""
        base = root / f"numpy-{r}"
        base.mkdir()
        store = ActivationStore.create(str(root / f"store-{r}"), layout, attrs={"config": {}})

        def numpy_write() -> None:
            for u in range(n_units):
                unit.tofile(base / f"{u}.bin")
                for name, values in unit_rows(u).items():  # the same bytes the store writes
                    values.tofile(base / f"{u}.{name}")

        def store_write() -> None:
            for u in range(n_units):
                store.write_unit(u, {0: unit}, **unit_rows(u))

        def numpy_read() -> None:
            for u in order:
                np.fromfile(base / f"{u}.bin", dtype=np.float16)

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

        def sampler_read() -> None:
            sampler = StoreSampler(store, 0, args.batch, buffer_rows=window * args.unit_rows, prefetch=2)
            for _, _ in zip(sampler, range(rows // args.batch)):
                pass

        # the writer that goes second pays for the first one's write-back on this disk: take turns
        writers = [numpy_write, store_write] if r % 2 == 0 else [store_write, numpy_write]
        phases = [*writers, numpy_read, numpy_sampler_read, sampler_read]
        times = {fn.__name__: _timed(fn) for fn in phases}
        shutil.rmtree(base)
        shutil.rmtree(root / f"store-{r}")
        return times

    try:
        rounds = [one_round(r) for r in range(args.repeats)]
        t_np_w, t_st_w, t_np_r, t_np_s, t_st_r = (
            statistics.median(t[name] for t in rounds)
            for name in ("numpy_write", "store_write", "numpy_read", "numpy_sampler_read", "sampler_read")
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = payload / 1e6
    print(f"payload: {payload / (1 << 30):.2f} GiB float16, {rows} rows x d={args.d}, {n_units} units")
    checksum = "on" if args.checksum else "off"
    print(f"checksum (crc32c): {checksum}; median of {args.repeats} rounds")
    print(f"numpy write    {mb / t_np_w:8.0f} MB/s   (hidden states + row arrays, one file per array)")
    print(f"store write    {mb / t_st_w:8.0f} MB/s   ratio {t_np_w / t_st_w:.2f}x  (target >= 0.8x)")
    print(f"numpy read     {mb / t_np_r:8.0f} MB/s   (raw bytes, no decoding: an upper bound)")
    print(f"numpy batches  {mb / t_np_s:8.0f} MB/s   (raw bytes -> shuffled float32 batches)")
    print(
        f"sampler read   {mb / t_st_r:8.0f} MB/s   ratio {t_np_s / t_st_r:.2f}x vs numpy batches "
        f"(target >= 0.8x), {t_np_r / t_st_r:.2f}x vs raw bytes"
    )
    print(f"sampler rows/s {rows / t_st_r:8.0f} (float32 batches of {args.batch}, shuffled)")
    for label, base, ours in (
        ("write", "numpy_write", "store_write"),
        ("read", "numpy_sampler_read", "sampler_read"),
    ):
        ratios = " ".join(f"{t[base] / t[ours]:.2f}" for t in rounds)
        print(f"{label} ratio per round: {ratios}")


if __name__ == "__main__":
    main()
