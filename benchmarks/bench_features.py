"""Throughput of `bae features` passes, as ratios to a plain encode-only pass over the same store.

    python benchmarks/bench_features.py [--rows 32768] [--d 64] [--expansion 8]

Baseline (measured in the same run): read every unit and run the encoder, nothing else.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.contexts import run_contexts
from bae.pipeline.features.frequency import run_frequency
from bae.pipeline.features.spec import scan_spec
from bae.stores import ActivationStore, StoreLayout
from bae.trainer import ModelConfig, build_autoencoder
from bae.trainer.provenance import Provenance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=8)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    n, d = args.rows, args.d
    rng = np.random.default_rng(0)
    layout = StoreLayout(n_rows=n, unit_rows=4096, d_model=d, layers=[0])
    store = ActivationStore.create(str(tmp / "s.zarr"), layout, attrs={"config": {}})
    for u in range(store.n_units):
        a, b = store.unit_range(u)
        store.write_unit(
            u,
            {0: rng.standard_normal((b - a, d), dtype=np.float32)},
            token_ids=np.arange(a, b) % 500,
            doc_ids=np.arange(a, b) // 64,
            positions=np.arange(a, b) % 64,
            valid=np.ones(b - a, bool),
        )
    torch.manual_seed(0)
    for arch in ("bae", "relu_sae"):
        model = build_autoencoder(
            ModelConfig(architecture=arch, d_model=d, expansion=args.expansion), Provenance(layer=0)
        )
        model.save_pretrained(tmp / arch)
        config = FeaturesConfig(
            store=str(tmp / "s.zarr"), checkpoint=str(tmp / arch), out=str(tmp / f"o-{arch}")
        )
        spec = scan_spec(config)
        spec.open()  # load the model before timing
        t = time.perf_counter()
        for unit in spec.units:
            for x, _ in spec.batches(unit):
                spec.open()[1].analyse(x)
        base = time.perf_counter() - t
        t = time.perf_counter()
        run_frequency(config, show_progress=False, quiet=True)
        freq = time.perf_counter() - t
        t = time.perf_counter()
        run_contexts(config, show_progress=False, quiet=True)
        ctx = time.perf_counter() - t
        print(
            f"{arch}: {n} rows, {model.n_bits} features | encode-only {n / base:,.0f} rows/s | "
            f"frequency pass {freq / base:.2f}x baseline time | contexts+ComSem pass (incl. text) "
            f"{ctx / base:.2f}x baseline time"
        )


if __name__ == "__main__":
    main()
