"""`bae train` side by side with the authors' reference BAE code (CPU, training steps only).

The reference code (github.com/hc495/Binary_Autoencoder, MIT) is not part of bae: pass the path of a
checkout with ``--reference``; without one the benchmark says so and exits 0.

For each shape (d, d' = 4d) and thread count, each in a fresh subprocess on the same standard-normal
rows (seed 0), batch 512, Adam lr 5e-4, λ_H = λ_D = 1e-7 from the first step:
  * reference: its ``auto_encoder_trainer`` (STE ``sign`` binarization, no output activation, one
    epoch over the rows, a 2-row validation set; wandb disabled);
  * bae, ``--objective paper``: the real ``bae train`` loop reading the same rows from a Zarr store;
  * bae, normalized objective at ``--target-fvu 0.2`` (β adapted every step, γ = 1, no moves);
  * bae's defaults: the normalized objective without a target (γ = 0: no pairwise term; the
    prune/re-seed moves every 50 steps), over at least ``DEFAULT_STEPS`` steps so that the moves
    take their share (one move step in 50);
  * the five n·d·d' float32 products every exact BAE step needs (encoder and decoder forward, the
    decoder's two gradients, the encoder's weight gradient) and nothing else: the ceiling of any
    trainer that does them as float GEMMs.
Prints rows/s and the ratios to the reference (target >= 3x).

    python benchmarks/bench_reference.py --reference /path/to/Binary_Autoencoder \
        [--dims 576 2048] [--threads 1 2] [--steps 24 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import BATCH, EXPANSION, config, make_store

LAMBDA = 1e-7
DEFAULT_STEPS = 100  # the defaults' run: two merge intervals, the first with the moves


def child_reference(reference: Path, d: int, steps: int) -> dict:
    """Rows/s of the reference trainer's training loop on the benchmark's rows."""
    os.environ["WANDB_MODE"] = "disabled"
    sys.path.insert(0, str(reference))
    import wandb
    from module.binarized_autoencoder import BinarizedAutoencoder  # type: ignore[import-not-found]
    from train.trainer import auto_encoder_trainer  # type: ignore[import-not-found]

    wandb.init(mode="disabled")
    rows = torch.from_numpy(np.random.default_rng(0).standard_normal((steps * BATCH, d), dtype=np.float32))
    torch.manual_seed(0)
    model = BinarizedAutoencoder(d, d * EXPANSION, binarization_type="sign", output_activation="none")
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    t0 = time.perf_counter()
    auto_encoder_trainer(
        model,
        rows,
        rows[:2],
        optimizer,
        BATCH,
        1,
        entropy_weight=LAMBDA,
        covarience_weight=LAMBDA,
        cuda=False,
    )
    return {"rows_per_s": steps * BATCH / (time.perf_counter() - t0)}


def child_bae(store: Path, d: int, steps: int, objective: str) -> dict:
    """Rows/s of the real `bae train` loop: its own log's throughput over the run's steps (past
    start-up: store open, model build)."""
    from bae.trainer.run import train
    from bae.trainer.run_folder import LOG_FILE

    with tempfile.TemporaryDirectory() as out:
        cfg = config(store, steps, out=out, objective=objective)
        cfg = cfg.model_copy(update={"lr": 5e-4, "lambda_entropy": LAMBDA, "lambda_covariance": LAMBDA})
        train(cfg, show_progress=False)
        last = json.loads((Path(out) / LOG_FILE).read_text().splitlines()[-1])
    return {"rows_per_s": last["tokens_per_s"]}


def child_products(d: int, steps: int) -> dict:
    """Rows/s of the five products alone on the benchmark's rows (what bounds any exact trainer)."""
    rows = torch.from_numpy(np.random.default_rng(0).standard_normal((steps * BATCH, d), dtype=np.float32))
    torch.manual_seed(0)
    enc, dec = torch.randn(d * EXPANSION, d) / d**0.5, torch.randn(d, d * EXPANSION) / d**0.5
    for step in range(steps):
        if step == 1:  # past the first step's warm-up
            t0 = time.perf_counter()
        x = rows[step * BATCH : (step + 1) * BATCH]
        bits = (x @ enc.T > 0).float()
        residual = bits @ dec.T - x
        dec_grad, bits_grad = residual.T @ bits, residual @ dec
        enc_grad = bits_grad.T @ x
        enc -= 1e-6 * enc_grad  # keep every product live
        dec -= 1e-6 * dec_grad
    return {"rows_per_s": (steps - 1) * BATCH / (time.perf_counter() - t0)}


def run_child(args: list[str], threads: int) -> dict:
    """One measurement in a fresh process on ``threads`` threads. bae's children get the OpenMP wait
    policy `import bae` sets before torch loads (here torch loads first); the reference its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["NUMBA_NUM_THREADS"] = str(threads)
    if "reference" not in args:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, help="checkout of github.com/hc495/Binary_Autoencoder")
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[24, 4], help="steps per run, one per dim")
    ap.add_argument("--child", choices=["reference", "paper", "normalized", "default", "products"])
    ap.add_argument("--store", type=Path)
    args = ap.parse_args()
    if args.child:
        d, steps = args.dims[0], args.steps[0]
        if args.child == "reference":
            result = child_reference(args.reference, d, steps)
        elif args.child == "products":
            result = child_products(d, steps)
        else:
            result = child_bae(args.store, d, steps, args.child)
        print(json.dumps(result))
        return
    if args.reference is None or not (args.reference / "train" / "trainer.py").is_file():
        print("reference code not found (pass --reference PATH to a Binary_Autoencoder checkout); skipped")
        return
    print(f"torch {torch.__version__}; batch {BATCH}, Adam lr 5e-4, λ_H = λ_D = {LAMBDA:g} from step 0")
    header = ["d", "d'", "threads", "steps", "reference", "paper", "x", "normalized", "x", "defaults", "x"]
    header += ["products", "x"]
    print(" ".join(f"{h:>10}" for h in header))
    for d, steps in zip(args.dims, args.steps):
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "rows.zarr"
            make_store(store, max(steps, DEFAULT_STEPS) * BATCH, d)
            for threads in args.threads:
                common = ["--dims", str(d), "--steps", str(steps)]
                ref = run_child(
                    [*common, "--child", "reference", "--reference", str(args.reference)], threads
                )
                paper = run_child([*common, "--child", "paper", "--store", str(store)], threads)
                norm = run_child([*common, "--child", "normalized", "--store", str(store)], threads)
                longer = ["--dims", str(d), "--steps", str(max(steps, DEFAULT_STEPS))]
                default = run_child([*longer, "--child", "default", "--store", str(store)], threads)
                floor = run_child([*common, "--child", "products"], threads)
                r, f = ref["rows_per_s"], floor["rows_per_s"]
                cells = [d, d * EXPANSION, threads, steps, f"{r:.0f}"]
                for rate in (paper["rows_per_s"], norm["rows_per_s"], default["rows_per_s"], f):
                    cells += [f"{rate:.0f}", f"{rate / r:.2f}x"]
                print(" ".join(f"{c:>10}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
