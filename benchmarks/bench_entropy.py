"""Rows/s of the `bae entropy` reduction vs the bare encode matmul over the same rows in memory.

    python benchmarks/bench_entropy.py [--rows 65536] [--d 576] [--expansion 4] [--doc-len 128]
        [--device auto]

Baseline (same run, same process): the float32 rows already in memory on ``--device``, the encoder
matmul ``x @ W_encᵀ + b`` in batches of 4096 there, nothing else (not even the threshold); the
reduction encodes and counts on ``--device`` too (``bae entropy --device``). Measured: the
reduction with Σ H_b only (read the Zarr store, decode float16, encode, per-position counts, write
each unit's partial counts) on local dask threads; the same with the default estimators (whole-code
hashes and counts, pair counts of 64 bits for the Chow–Liu bound) followed by the estimates
themselves (NSB, Chow–Liu trees, verdicts), and again with 32 bootstrap replicates; and the Σ H_b
reduction with every partial already on disk (a resumed run's cost). ``--pair-cost`` also
times the Chow–Liu bound's parts at d' = 8192 with all bits paired: the BᵀB GEMM per batch of 4096
rows and the tree per group. ``--startup`` times the whole ``bae entropy`` command (a fresh process:
imports, store and checkpoint, counting, estimates, table and plot) on a one-unit store and on a
``--startup-units`` store: the fixed start-up (time to the first row) and the rows/s at the margin.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bae.common.devices import DEVICE_HELP, resolve_device
from bae.pipeline.entropy.bounds import chow_liu_bound
from bae.pipeline.entropy.counts import CountSpec, RowKey, count_groups
from bae.pipeline.entropy.estimates import estimate_columns
from bae.stores import ActivationStore, RowFilter, StoreLayout
from bae.trainer import ModelConfig, build_autoencoder
from bae.trainer.provenance import Provenance


def make_store(path: Path, n: int, d: int, doc_len: int) -> tuple[ActivationStore, np.ndarray]:
    rng = np.random.default_rng(0)
    layout = StoreLayout(n_rows=n, unit_rows=4096, d_model=d, layers=[0], dtype="float16")
    store = ActivationStore.create(str(path), layout, attrs={"config": {}})
    rows = np.arange(n)
    for u in range(store.n_units):
        a, b = store.unit_range(u)
        store.write_unit(
            u,
            {0: rng.standard_normal((b - a, d), dtype=np.float32)},
            token_ids=rows[a:b] % 500,
            doc_ids=rows[a:b] // doc_len,
            positions=rows[a:b] % doc_len,
            valid=np.ones(b - a, bool),
        )
    return store, store.read_layer(0, 0, n)


@torch.no_grad()
def bare_encode(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, batch: int = 4096) -> float:
    """Seconds for ``x @ wᵀ + b`` over all rows (on their device, waited for)."""
    t = time.perf_counter()
    for a in range(0, len(x), batch):
        torch.addmm(b, x[a : a + batch], w.T)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t


def reduction_rss(store: str, checkpoint: str, n_units: int) -> float:
    """Peak RSS (MiB, VmHWM: unlike ru_maxrss not inherited from this process) of a fresh process
    that runs the reduction over the whole store."""
    code = (
        "from bae.pipeline.entropy.counts import CountSpec, RowKey, count_groups; "
        "from bae.stores import RowFilter; "
        f"count_groups(CountSpec({store!r}, {checkpoint!r}, 0, RowFilter(), RowKey('positions'), "
        f"tuple(range({n_units}))), show_progress=False); "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    return (
        int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        / 1024
    )


def rss_report(tmp: Path, rows: int, d: int, doc_len: int, checkpoint: Path) -> None:
    for scale in (1, 4):
        store, _ = make_store(tmp / f"rss-{scale}.zarr", rows * scale, d, doc_len)
        size = store.n_rows * d * 2 / 2**20
        rss = reduction_rss(store.url, str(checkpoint), store.n_units)
        print(f"  reduction over {store.n_rows:>9,} rows ({size:,.0f} MiB float16): peak RSS {rss:,.0f} MiB")


def entropy_command(store: str, checkpoint: str, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of ``bae entropy`` with default estimators in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    command = ["-m", "bae.cli", "entropy", "-s", store, "-a", checkpoint, "-o", str(out), "--no-progress"]
    subprocess.run([sys.executable, *command], capture_output=True, check=True)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def startup_report(tmp: Path, d: int, doc_len: int, checkpoint: Path, units: int, repeats: int) -> None:
    """Start-up of ``bae entropy`` (intercept of time vs rows) and its marginal rate (slope)."""
    small, _ = make_store(tmp / "startup-1.zarr", 4096, d, doc_len)
    large, _ = make_store(tmp / f"startup-{units}.zarr", 4096 * units, d, doc_len)
    runs = {
        name: [entropy_command(s.url, str(checkpoint), tmp / f"startup-{name}-{r}") for r in range(repeats)]
        for name, s in (("small", small), ("large", large))
    }
    for i, what in enumerate(("wall", "CPU")):
        t1, tn = min(r[i] for r in runs["small"]), min(r[i] for r in runs["large"])
        rate = (large.n_rows - small.n_rows) / max(tn - t1, 1e-9)
        print(
            f"  bae entropy {what:4s}: {t1:5.1f} s on {small.n_rows:,} rows, {tn:5.1f} s on "
            f"{large.n_rows:,}: "
            f"start-up {t1 - small.n_rows / rate:4.1f} s, then {rate:,.0f} rows/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--doc-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss", action="store_true", help="also peak memory vs store size")
    parser.add_argument("--pair-cost", action="store_true", help="also the Chow–Liu bound's cost at d'=8192")
    parser.add_argument("--startup", action="store_true", help="also the whole command's start-up")
    parser.add_argument("--startup-units", type=int, default=16, help="units of the larger --startup store")
    parser.add_argument("--only-startup", action="store_true", help="--startup alone (no reduction timings)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args()
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-entropy-"))
    n = args.rows
    store, x = make_store(tmp / "s.zarr", n, args.d, args.doc_len)
    torch.manual_seed(0)
    model = build_autoencoder(ModelConfig(d_model=args.d, expansion=args.expansion), Provenance(layer=0))
    model.save_pretrained(tmp / "bae")
    if args.startup or args.only_startup:
        startup_report(tmp, args.d, args.doc_len, tmp / "bae", args.startup_units, args.repeats)
        if args.only_startup:
            return
    w, b = model.encoder.weight.detach().to(device), model.encoder.bias.detach().to(device)
    xt = torch.from_numpy(x).to(device)
    units = tuple(range(store.n_units))
    results: dict[str, list[float]] = {
        "bare encode matmul": [],
        "Σ H_b only": [],
        "default estimators": [],
        "defaults + bootstrap 32": [],
        "Σ H_b, partials on disk": [],
    }
    pair_bits = tuple(range(0, model.n_bits, max(1, model.n_bits // 64)))[:64]
    full = {"default estimators": {}, "defaults + bootstrap 32": {"bootstrap": 32}}
    for r in range(args.repeats):
        results["bare encode matmul"].append(bare_encode(xt, w, b))
        key, ckpt = RowKey("positions"), str(tmp / "bae")
        spec = CountSpec(store.url, ckpt, 0, RowFilter(), key, units, joint=False, device=args.device)
        spec = spec.with_partials(tmp / f"partials-{r}")
        t = time.perf_counter()
        counts = count_groups(spec, show_progress=False)
        results["Σ H_b only"].append(time.perf_counter() - t)
        t = time.perf_counter()
        count_groups(spec, show_progress=False)
        results["Σ H_b, partials on disk"].append(time.perf_counter() - t)
        for name, extra in full.items():
            every = CountSpec(
                store.url,
                str(tmp / "bae"),
                0,
                RowFilter(),
                RowKey("positions"),
                units,
                pair_bits=pair_bits,
                device=args.device,
                **extra,
            ).with_partials(tmp / f"partials-{name[:8]}-{r}")
            t = time.perf_counter()
            estimate_columns(count_groups(every, show_progress=False), 0.95, pair_bits)
            results[name].append(time.perf_counter() - t)
    assert int(counts.rows.sum()) == n
    base = min(results["bare encode matmul"])
    print(
        f"{n} rows, d={args.d}, d'={model.n_bits} bits, {len(counts.keys)} positions, on {device}, "
        f"{torch.get_num_threads()} torch threads, best of {args.repeats}"
    )
    for name, times in results.items():
        best = min(times)
        print(f"  {name:28s} {n / best:>12,.0f} rows/s   {base / best:5.2f}x bare encode")
    if args.rss:
        rss_report(tmp, n, args.d, args.doc_len, tmp / "bae")
    if args.pair_cost:
        pair_cost(8192)


def pair_cost(m: int, rows: int = 4096) -> None:
    """Seconds for the Chow–Liu bound's parts with m paired bits: BᵀB of one batch, and one tree."""
    rng = np.random.default_rng(0)
    bits = torch.from_numpy((rng.random((rows, m)) < 0.3).astype(np.float32))
    t = time.perf_counter()
    pairs = (bits.T @ bits).to(torch.int64).numpy()
    gemm = time.perf_counter() - t
    t = time.perf_counter()
    chow_liu_bound(rows, pairs.diagonal().copy(), pairs)
    tree = time.perf_counter() - t
    print(
        f"  pair bound at m={m}: BᵀB of {rows} rows {gemm:.2f} s (float32 GEMM), "
        f"tree {tree:.2f} s per group, pair counts {m * m * 8 / 2**20:.0f} MiB per group (int64)"
    )


if __name__ == "__main__":
    main()
