"""``bae features compare``: checkpoints trained on the same store (BAE, ReLU-L1 SAE, TopK SAE) side by
side: dense and dead counts, FVU, mean L0 and (when interpretation is on) interpretable features.

Each checkpoint gets its own ``<out>/<name>/`` with the single-checkpoint outputs, so re-running
reuses them; the table (``compare.csv``, ``compare.json``) and one plot (``compare.png``) sit in ``<out>``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from bae.common.atomic_files import atomic_savefig, atomic_write_json, atomic_write_text
from bae.common.console import print_summary
from bae.common.errors import BaeError
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.frequency import run_frequency
from bae.pipeline.features.interpret import run_interpret
from bae.trainer.models import read_model_config, resolve_model_dir


def checkpoint_names(checkpoints: list[str]) -> list[str]:
    """Short unique names: the directory name, suffixed with its index if two clash."""
    names = [Path(c).resolve().name for c in checkpoints]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def compare_row(name: str, config: FeaturesConfig, interpret: bool, show_progress: bool) -> dict[str, Any]:
    freq = run_frequency(config, show_progress, quiet=True)
    s = freq.summary
    assert config.checkpoint is not None  # set by for_checkpoint; run_frequency needs it
    architecture = read_model_config(resolve_model_dir(config.checkpoint))["architecture"]
    row: dict[str, Any] = {"name": name, "architecture": architecture, "features": s["features"]}
    row.update({k: v for k, v in s.items() if k.startswith(("dense>", "oriented_dense>"))})
    row.update(dead=s["dead"], fvu=round(freq.fvu, 6), mean_l0=round(freq.mean_l0, 3))
    if interpret:
        result = run_interpret(config, show_progress, quiet=True)["summary"]
        row.update(interpreted=result["interpreted"], interpretable=result["interpretable"])
    else:
        row.update(interpreted=None, interpretable=None)
    return row


def table_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def plot_compare(rows: list[dict[str, Any]], thresholds: list[float], path: Path) -> None:
    """One figure: grouped bars of dense/dead/interpretable counts, FVU and mean L0 beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = [f"dense>{t:g}" for t in thresholds] + ["dead", "interpretable"]
    fig, (ax, ax_fvu, ax_l0) = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1, 1]})
    x = np.arange(len(counts))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [row.get(c) or 0 for c in counts]
        ax.bar(x + i * width, values, width, label=f"{row['name']} ({row['architecture']})")
    ax.set_xticks(x + 0.4 - width / 2, counts)
    ax.set_ylabel("features")
    ax.set_title("dense / dead / interpretable features")
    ax.legend(fontsize=8)
    names = [r["name"] for r in rows]
    ax_fvu.bar(names, [r["fvu"] for r in rows], color="gray")
    ax_fvu.set_title("FVU")
    ax_l0.bar(names, [r["mean_l0"] for r in rows], color="gray")
    ax_l0.set_title("mean L0")
    for a in (ax_fvu, ax_l0):
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def run_compare(config: FeaturesConfig, interpret: bool = False, show_progress: bool = True) -> list[dict]:
    """Compare ``config.checkpoints`` over ``config.store``; ``interpret`` also runs ComSem on each."""
    checkpoints = config.need("checkpoints")
    if len(checkpoints) < 2:
        raise BaeError(f"compare needs at least two checkpoints, got {len(checkpoints)}")
    out = Path(config.out)
    rows = [
        compare_row(name, config.for_checkpoint(c, out / name), interpret, show_progress)
        for name, c in zip(checkpoint_names(checkpoints), checkpoints)
    ]
    atomic_write_text(out / "compare.csv", table_csv(rows))
    plot_compare(rows, config.dense_thresholds, out / "compare.png")
    atomic_write_json(out / "compare.json", {"config": config.model_dump(mode="json"), "rows": rows})
    print(format_table(rows))
    print_summary(
        f"bae features compare -> {out}", {"table": out / "compare.csv", "plot": out / "compare.png"}
    )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """An aligned text table of the comparison."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(c) for c in columns]] + [
        ["-" if r.get(c) is None else str(r.get(c, "")) for c in columns] for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells)
