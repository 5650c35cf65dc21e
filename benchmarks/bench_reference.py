"""`bae train` side by side with the authors' reference BAE code (CPU, training steps only).

The reference code (github.com/hc495/Binary_Autoencoder, MIT) is not part of bae: pass the path of a
checkout with ``--reference``; without one the benchmark says so and exits 0.

For each shape (d, d' = 4d) and thread count, each in a fresh subprocess on the same rows (standard
normal, seed 0; or, with ``--rows-from STORE``, a store's rows of ``--layer`` past position 0 in a
seeded random order), batch 512, Adam lr 5e-4, λ_H = λ_D = 1e-7 from the first step:
  * reference: its ``auto_encoder_trainer`` (STE ``sign`` binarization, no output activation, one
    epoch over the rows, a 2-row validation set; wandb disabled);
  * bae, ``--objective paper``: the real ``bae train`` loop reading the same rows from a Zarr store;
  * bae, normalized objective at ``--target-fvu 0.2`` (β adapted every step, γ = 1, no moves);
  * bae's defaults: the normalized objective without a target (γ = 0: no pairwise term; the
    prune/re-seed moves every 50 steps; bae's own learning rate and entropy start), over at least
    ``--default-steps`` (400) steps so that the moves take their share; ``l0`` is the bits its code fires
    per row at the end (standard normal rows hold nothing a bit pays for: every bit is pruned,
    l0 = 0 — pass a real store to see the defaults on a code they keep);
  * the five n·d·d' float32 products every exact BAE step needs (encoder and decoder forward, the
    decoder's two gradients, the encoder's weight gradient) and nothing else: the ceiling of any
    trainer that does them as float GEMMs (bae's defaults decode a sparse code without two of them,
    ``trainer/binary_decode.py``).
Prints rows/s and the ratios to the reference (target >= 3x).

    python benchmarks/bench_reference.py --reference /path/to/Binary_Autoencoder \
        [--dims 576 2048] [--threads 1 2] [--steps 24 4] [--rows-from runs/default/activations.zarr]
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


def child_reference(reference: Path, rows_file: Path, steps: int) -> dict:
    """Rows/s of the reference trainer's training loop on the benchmark's rows."""
    os.environ["WANDB_MODE"] = "disabled"
    sys.path.insert(0, str(reference))
    import wandb
    from module.binarized_autoencoder import BinarizedAutoencoder  # type: ignore[import-not-found]
    from train.trainer import auto_encoder_trainer  # type: ignore[import-not-found]

    wandb.init(mode="disabled")
    rows = torch.from_numpy(np.load(rows_file)[: steps * BATCH])
    d = rows.shape[1]
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


def child_bae(store: Path, steps: int, objective: str) -> dict:
    """Rows/s of the real `bae train` loop: its own log's throughput over the run's steps (past
    start-up: store open, model build)."""
    from bae.trainer.loop import last_record_with
    from bae.trainer.run import train
    from bae.trainer.run_folder import LOG_FILE

    with tempfile.TemporaryDirectory() as out:
        cfg = config(store, steps, out=out, objective=objective)
        if objective == "default":  # bae train's own lr and entropy start, as a user runs it
            cfg = cfg.model_copy(update={"entropy_start_steps": None})
        else:
            cfg = cfg.model_copy(update={"lr": 5e-4, "lambda_entropy": LAMBDA, "lambda_covariance": LAMBDA})
        train(cfg, show_progress=False)
        last = last_record_with(Path(out) / LOG_FILE, "tokens_per_s")
        polished = last_record_with(Path(out) / LOG_FILE, "polish_seconds")
    return {"rows_per_s": last["tokens_per_s"], "l0": last["l0"], "polish_s": polished.get("polish_seconds")}


def child_products(rows_file: Path, steps: int) -> dict:
    """Rows/s of the five products alone on the benchmark's rows (what bounds any exact trainer)."""
    rows = torch.from_numpy(np.load(rows_file)[: steps * BATCH])
    d = rows.shape[1]
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


def warm_up() -> None:
    """Compile bae's numba kernels into their on-disk cache before anything is timed (a fresh
    install compiles each on first use, once)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "rows.zarr"
        make_store(store, 60 * BATCH, 64)
        for child in ("paper", "default"):
            run_child(["--steps", "60", "--store", str(store), "--child", child], 1)


def store_rows(path: Path, layer: int, n_rows: int, least: int) -> np.ndarray:
    """Up to ``n_rows`` rows of ``layer`` of the bae store at ``path`` past each window's first
    position (the attention sink), at least ``least``, in a seeded random order (bae's longer run
    takes more than one epoch of them). BaeError when the store cannot give them."""
    from bae.common.errors import BaeError
    from bae.stores import ActivationStore

    store = ActivationStore.open(path)
    if layer not in store.layers:
        raise BaeError(f"{path} holds layers {store.layers}, not --layer {layer}")
    meta = store.read_rows(0, store.n_rows)
    index = np.flatnonzero(meta["valid"] & (meta["positions"] > 0))
    if len(index) < least:
        raise BaeError(f"{path} holds {len(index)} valid rows past position 0; the run needs {least}")
    index = np.sort(np.random.default_rng(0).choice(index, min(n_rows, len(index)), replace=False))
    rows = store.read_layer(layer, 0, store.n_rows)[index].astype(np.float32)
    return rows[np.random.default_rng(1).permutation(len(rows))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, help="checkout of github.com/hc495/Binary_Autoencoder")
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[24, 4], help="steps per run, one per dim")
    ap.add_argument(
        "--default-steps", type=int, default=400, help="the defaults' run (entropy from ¼, then the moves)"
    )
    ap.add_argument("--rows-from", type=Path, help="a bae store whose rows to train on (d from it)")
    ap.add_argument("--layer", type=int, default=15, help="the layer of --rows-from")
    ap.add_argument("--child", choices=["reference", "paper", "normalized", "default", "products"])
    ap.add_argument("--store", type=Path)
    ap.add_argument("--rows", type=Path)
    args = ap.parse_args()
    if args.child:
        steps = args.steps[0]
        if args.child == "reference":
            result = child_reference(args.reference, args.rows, steps)
        elif args.child == "products":
            result = child_products(args.rows, steps)
        else:
            result = child_bae(args.store, steps, args.child)
        print(json.dumps(result))
        return
    if args.reference is None or not (args.reference / "train" / "trainer.py").is_file():
        print("reference code not found (pass --reference PATH to a Binary_Autoencoder checkout); skipped")
        return
    shapes = [(d, None) for d in args.dims]
    if args.rows_from is not None:  # one shape: the store's
        from bae.common.errors import BaeError  # not at the top: `import bae` sets the children's OpenMP

        n_rows = max(args.steps[0], args.default_steps) * BATCH
        try:
            loaded = store_rows(args.rows_from, args.layer, n_rows, args.steps[0] * BATCH)
        except BaeError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        shapes = [(loaded.shape[1], loaded)]
    source = "standard normal rows" if args.rows_from is None else f"{args.rows_from} layer {args.layer}"
    print(f"torch {torch.__version__}; {source}; batch {BATCH}, Adam lr 5e-4, λ_H = λ_D = {LAMBDA:g}")
    header = ["d", "d'", "threads", "steps", "reference", "paper", "x", "normalized", "x", "defaults", "x"]
    header += ["l0", "products", "x"]
    print(" ".join(f"{h:>10}" for h in header))
    warm_up()
    for (d, loaded), steps in zip(shapes, args.steps):
        with tempfile.TemporaryDirectory() as tmp:
            n_rows = max(steps, args.default_steps) * BATCH
            rows_file, store = Path(tmp) / "rows.npy", Path(tmp) / "rows.zarr"
            if loaded is None:
                loaded = np.random.default_rng(0).standard_normal((n_rows, d), dtype=np.float32)
            rows = loaded
            np.save(rows_file, rows)
            make_store(store, len(rows), d, rows)
            for threads in args.threads:
                common = ["--steps", str(steps), "--rows", str(rows_file), "--store", str(store)]
                reference = ["--child", "reference", "--reference", str(args.reference)]
                ref = run_child([*common, *reference], threads)
                paper = run_child([*common, "--child", "paper"], threads)
                norm = run_child([*common, "--child", "normalized"], threads)
                longer = ["--steps", str(max(steps, args.default_steps)), "--store", str(store)]
                default = run_child([*longer, "--child", "default"], threads)
                floor = run_child([*common, "--child", "products"], threads)
                r, f = ref["rows_per_s"], floor["rows_per_s"]
                cells = [d, d * EXPANSION, threads, steps, f"{r:.0f}"]
                for rate in (paper["rows_per_s"], norm["rows_per_s"], default["rows_per_s"]):
                    cells += [f"{rate:.0f}", f"{rate / r:.2f}x"]
                cells += [f"{default['l0']:.1f}", f"{f:.0f}", f"{f / r:.2f}x"]
                print(" ".join(f"{c:>10}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
