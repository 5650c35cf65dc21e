"""Benchmark `bae train` at d=576, d'=2304, batch 512 (CPU).

Prints, all measured in this run:
  * rows/s training from the Zarr store (the real `train` loop, `--objective paper`) vs from the
    same rows held in memory (same model, objective and optimizer, batches sliced from a tensor)
    -> ratio, target >= 0.95;
  * rows/s of the real loop with the default normalized objective at a target FVU (β adapted every
    step, duplicate-bit merges, the typical-row mask) vs the paper objective -> ratio, target >= 0.95;
  * the step's float GEMM FLOPs (the five products a BAE step does; the covariance is popcounts)
    per second of the in-memory step, as a fraction of this machine's measured float32 GEMM rate;
  * peak RSS of training from a store vs from a 4x larger store (must not grow with the store;
    the shuffle buffer is set to 16384 rows here, smaller than both stores).

Each measurement runs in a fresh subprocess so peak RSS is its own.
    python benchmarks/bench_train.py [--rows 32768] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

D, EXPANSION, BATCH = 576, 4, 512


def make_store(path: Path, n_rows: int, d: int = D, rows: np.ndarray | None = None) -> None:
    """A store of ``rows`` (default: standard normal rows, seed 0) at layer 1."""
    from bae.stores import ActivationStore, StoreLayout

    rng = np.random.default_rng(0)
    layout = StoreLayout(n_rows=n_rows, unit_rows=4096, d_model=d, layers=[1], dtype="float16")
    store = ActivationStore.create(path, layout, attrs={"config": {"bench": n_rows}})
    for u in range(layout.n_units):
        a, b = layout.unit_range(u)
        index = np.arange(a, b)
        x = rng.standard_normal((b - a, d), dtype=np.float32) if rows is None else rows[a:b]
        store.write_unit(
            u,
            layers={1: x},
            token_ids=index % 1000,
            doc_ids=index // 256,
            positions=index % 256,
            valid=np.ones(b - a, bool),
        )


def config(store: Path, steps: int, out: str, objective: str = "paper"):
    """The benchmark's run: ``paper``, ``normalized`` (at --target-fvu 0.2) or ``default`` (the
    normalized objective without a target: γ = 0 and the prune/re-seed moves every 50 steps)."""
    from bae.trainer.config import TrainConfig

    return TrainConfig(
        objective="paper" if objective == "paper" else "normalized",
        target_fvu=0.2 if objective == "normalized" else None,
        store=str(store),
        out=out,
        layer=1,
        steps=steps,
        batch_size=BATCH,
        expansion=EXPANSION,
        val_fraction=0.0,
        log_every=steps,
        checkpoint_every=10**9,
        entropy_start_steps=0,
        buffer_rows=16384,
    )


def child_store(store: Path, steps: int, objective: str = "paper") -> dict:
    from bae.trainer.loop import last_record_with
    from bae.trainer.run import train
    from bae.trainer.run_folder import LOG_FILE

    with tempfile.TemporaryDirectory() as out:
        train(config(store, steps, out=str(out), objective=objective), show_progress=False)
        last = last_record_with(Path(out) / LOG_FILE, "tokens_per_s")
    return {"rows_per_s": last["tokens_per_s"]}


def child_memory(store: Path, steps: int) -> dict:
    from bae.stores import ActivationStore
    from bae.trainer.models import build_autoencoder
    from bae.trainer.objectives import Objective

    cfg = config(store, steps, out="unused")
    s = ActivationStore.open(str(store))
    data = torch.from_numpy(s.read_layer(1, 0, s.n_rows))
    torch.manual_seed(0)
    model = build_autoencoder(cfg.autoencoder_config(D))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    objective = Objective("bae", float(cfg.lambda_covariance or 0))
    entropy_weight = float(cfg.lambda_entropy or 0)
    order = torch.randperm(len(data))

    def step(i: int) -> None:
        x = data[order[(i * BATCH) % (len(data) - BATCH) :][:BATCH]]
        opt.zero_grad(set_to_none=True)
        loss, _ = objective(x, model(x), entropy_weight)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return {
        "rows_per_s": steps * BATCH / (time.perf_counter() - t0),
        "step_s": (time.perf_counter() - t0) / steps,
    }


def machine_gemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square float32 matmul on this machine and thread count (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    _ = a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_gemm_flops() -> int:
    """Float GEMM FLOPs of one paper-objective BAE step as bae computes it: encoder forward, decoder
    forward, the decoder's weight and input gradients, the encoder's weight gradient (no input
    gradient: the rows need none). The covariance is integer popcounts, not counted."""
    return 5 * 2 * BATCH * D * D * EXPANSION


def run_child(kind: str, store: Path, steps: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--store", str(store), "--steps", str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", choices=["store", "memory", "normalized"])
    ap.add_argument("--store", type=Path)
    args = ap.parse_args()
    if args.child:
        if args.child == "memory":
            result = child_memory(args.store, args.steps)
        else:
            result = child_store(args.store, args.steps, "paper" if args.child == "store" else "normalized")
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small.zarr", Path(tmp) / "large.zarr"
        make_store(small, args.rows)
        make_store(large, 4 * args.rows)
        from_store = run_child("store", small, args.steps)
        memory = run_child("memory", small, args.steps)
        from_large = run_child("store", large, args.steps)
        normalized = run_child("normalized", small, args.steps)
    rate = machine_gemm_rate()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={D} d'={D * EXPANSION} "
        f"batch {BATCH}, {args.steps} steps, λ_H and λ_D on"
    )
    print(
        f"normalized objective, --target-fvu 0.2: {normalized['rows_per_s']:8.0f} rows/s  "
        f"ratio {normalized['rows_per_s'] / from_store['rows_per_s']:.3f} vs paper (target >= 0.95)"
    )
    print(f"in memory      : {memory['rows_per_s']:8.0f} rows/s  ({memory['step_s'] * 1e3:.0f} ms/step)")
    print(
        f"from Zarr store: {from_store['rows_per_s']:8.0f} rows/s  "
        f"ratio {from_store['rows_per_s'] / memory['rows_per_s']:.3f} (target >= 0.95)"
    )
    achieved = step_gemm_flops() / memory["step_s"]
    print(
        f"machine float32 GEMM rate (2048² matmul): {rate / 1e9:.1f} GFLOP/s; the in-memory step's "
        f"GEMM FLOPs per second of step: {achieved / 1e9:.1f} GFLOP/s = {achieved / rate:.2f} of it"
    )
    mib = args.rows * D * 2 / 2**20
    print(
        f"peak RSS: store {mib:.0f} MiB -> {from_store['peak_rss_mib']:.0f} MiB; "
        f"store {4 * mib:.0f} MiB -> {from_large['peak_rss_mib']:.0f} MiB "
        f"(in-memory baseline {memory['peak_rss_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
