"""Dashboards at scale: the report's write time and page sizes, and `bae export dashboard`'s time.

    python benchmarks/bench_dashboards.py [--features 8192] [--rows 4096] [--d 64]

1. ``write_report`` for ``--features`` synthetic features (20 contexts of ~100 characters each, all
   interpreted): seconds, index page size, total size of the per-feature pages.
2. ``bae features contexts`` then ``bae export dashboard`` on a random store of ``--rows`` rows and an
   untrained BAE with ``--features`` bits (token ids, no tokenizer): seconds of each, output size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bae.interop.dashboard import export_dashboard
from bae.interop.dashboard_config import DashboardExportConfig
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.contexts import BAE_MARGIN, run_contexts
from bae.pipeline.features.report import PAGES_DIR, REPORT_HTML, write_report
from bae.stores import ActivationStore, StoreLayout
from bae.trainer import ModelConfig, build_autoencoder
from bae.trainer.provenance import Provenance


def _size(path: Path) -> float:
    """MB under ``path`` (a file or a directory)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def bench_report(tmp: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    before, after = "the quick brown fox jumps over the lazy dog " * 2, " near the bank"
    context = {"before": before, "token": " river", "after": after, "doc": 12345, "position": 17, "bit": 1}
    features = []
    for j, f in enumerate(rng.random(n) ** 4):
        scores = np.sort(rng.random(20))[::-1]
        features.append(
            {
                "feature": j,
                "frequency": float(f),
                "oriented_frequency": float(min(f, 1 - f)),
                "assigned": int(rng.integers(0, 5000)),
                "contexts": [{**context, "score": float(s)} for s in scores],
            }
        )
    data = {"architecture": "bae", "score": BAE_MARGIN, "decoded": True, "summary": {"features": n}}
    data["features"] = features
    verdicts = [
        {"feature": j, "explanation": "numbers in dates and times", "score": 0.62, "interpretable": True}
        for j in range(n)
    ]
    interpretation = {"summary": {"interpretable": n, "interpreted": n}, "features": verdicts}
    start = time.perf_counter()
    write_report(tmp, data, interpretation)
    seconds = time.perf_counter() - start
    print(
        f"report, {n} features x 20 contexts: {seconds:.2f} s; index {_size(tmp / REPORT_HTML):.2f} MB; "
        f"{n} feature pages {_size(tmp / PAGES_DIR):.1f} MB"
    )


def bench_export(tmp: Path, n_features: int, rows: int, d: int) -> None:
    rng = np.random.default_rng(0)
    layout = StoreLayout(n_rows=rows, unit_rows=1024, d_model=d, layers=[0])
    store = ActivationStore.create(str(tmp / "s.zarr"), layout, attrs={"config": {}})
    for u in range(store.n_units):
        a, b = store.unit_range(u)
        store.write_unit(
            u,
            {0: rng.standard_normal((b - a, d)).astype(np.float32)},
            token_ids=rng.integers(0, 50000, b - a),
            doc_ids=np.arange(a, b) // 64,
            positions=np.arange(a, b) % 64,
            valid=np.ones(b - a, bool),
        )
    model = build_autoencoder(ModelConfig(d_model=d, expansion=n_features // d), Provenance(layer=0))
    model.save_pretrained(tmp / "bae")
    config = FeaturesConfig(store=str(tmp / "s.zarr"), checkpoint=str(tmp / "bae"), out=str(tmp / "feats"))
    start = time.perf_counter()
    run_contexts(config, show_progress=False, quiet=True)
    contexts_s = time.perf_counter() - start
    start = time.perf_counter()
    export = DashboardExportConfig(features=str(tmp / "feats"), out=str(tmp / "dash"))
    out = export_dashboard(export, quiet=True)
    export_s = time.perf_counter() - start
    print(
        f"contexts ({rows} rows, {model.n_bits} features, report included): {contexts_s:.1f} s; "
        f"export: {export_s:.1f} s, {len(list(out.glob('batch-*.json')))} batches, {_size(out):.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--d", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboards-"))
    (tmp / "report").mkdir()
    bench_report(tmp / "report", args.features)
    bench_export(tmp, args.features, args.rows, args.d)


if __name__ == "__main__":
    main()
