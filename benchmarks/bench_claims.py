"""Independent harvest processes sharing one store (work claiming), on the embedded SmolLM2.

For N = 1, 2, 3 processes started at once on a fresh store with the same command: the wall time
(baseline: N = 1 in the same run), the units each process wrote and their sum (the total work: equal
to the store's units when no unit is computed twice). On a 2-core machine the wall-time gain is
bounded by the cores; the work split is what this measures.
Usage: python benchmarks/bench_claims.py [--tokens 16384] [--processes 1,2,3] [--layers 6,15]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(n: int, args: argparse.Namespace, root: Path) -> tuple[float, list[int]]:
    """Wall time of ``n`` simultaneous harvests on one new store, and the units each wrote."""
    store = root / f"n{n}.zarr"
    cmd = [sys.executable, "-m", "bae.cli", "harvest", "-o", str(store), "--max-tokens", str(args.tokens)]
    cmd += ["--layers", args.layers, "--context-length", "128", "--unit-rows", "512", "--no-progress"]
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    began = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - began
    if any(p.returncode for p in procs):
        raise SystemExit(f"a harvest failed:\n{outs}")
    return wall, [int(re.search(r"units\s+(\d+) written now", o).group(1)) for o in outs]  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description="Independent harvests sharing one store.")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--processes", default="1,2,3")
    parser.add_argument("--layers", default="6,15")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # convert the embedded GGUF once, outside the timings
        subprocess.run(
            [sys.executable, "-m", "bae.cli", "harvest", "-o", str(root / "warm.zarr"), "--max-tokens", "64"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            check=True,
            capture_output=True,
        )
        base = None
        print(f"{'N':>2} {'wall s':>8} {'vs N=1':>7}  units per process (sum)")
        for n in (int(v) for v in args.processes.split(",")):
            wall, units = run(n, args, root)
            base = base or wall
            print(f"{n:>2} {wall:8.1f} {base / wall:6.2f}x  {units} ({sum(units)})")


if __name__ == "__main__":
    main()
