"""``bae features compare``: checkpoints trained on the same store (BAE, ReLU-L1 SAE, TopK SAE) side by
side: dense and dead counts, FVU, mean L0, what splicing each into the LLM costs (``bae evaluate``:
spliced CE, CE recovered, KL, in ``<out>/evaluate/``) and (when interpretation is on) interpretable
features.

Each checkpoint gets its own ``<out>/<name>/`` with the single-checkpoint outputs, so re-running
reuses them; the table (``compare.csv``, ``compare.json``) and one plot (``compare.png``) sit in ``<out>``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from bae.common.atomic_files import atomic_savefig, atomic_write_json, atomic_write_text
from bae.common.console import format_table, print_summary
from bae.common.errors import BaeError
from bae.pipeline.evaluate.inputs import checkpoint_names
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.frequency import run_frequency
from bae.pipeline.features.interpret import run_interpret
from bae.trainer.models import read_model_config, resolve_model_dir


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


EVALUATE_COLUMNS = {"ce_spliced": "spliced_ce", "ce_recovered": "ce_recovered", "kl": "kl"}


def evaluate_columns(
    config: FeaturesConfig, checkpoints: list[str], show_progress: bool
) -> list[dict[str, Any]]:
    """Per checkpoint the spliced CE, CE recovered and KL of ``bae evaluate`` on the store's held-out
    documents (empty when the store records no harvest to take the LLM and documents from)."""
    from bae.pipeline.evaluate.config import EvaluateConfig
    from bae.pipeline.evaluate.inputs import recorded_harvest
    from bae.pipeline.evaluate.run import run_evaluate
    from bae.stores import ActivationStore

    store = config.need("store")
    if recorded_harvest(ActivationStore.open(store)) is None:
        print(f"evaluate: skipped, store {store} records no harvest (no LLM and documents to splice into)")
        return [{} for _ in checkpoints]
    cfg = EvaluateConfig(
        store=store,
        checkpoints=checkpoints,
        layer=config.layer,
        out=str(Path(config.out) / "evaluate"),
        device=config.device,
    )
    rows = {r["checkpoint"]: r for r in run_evaluate(cfg, show_progress, quiet=True).rows if r["checkpoint"]}
    return [{new: rows[c][old] for old, new in EVALUATE_COLUMNS.items()} for c in checkpoints]


def run_compare(
    config: FeaturesConfig, interpret: bool = False, show_progress: bool = True, evaluate: bool = True
) -> list[dict]:
    """Compare ``config.checkpoints`` over ``config.store``; ``interpret`` also runs ComSem on each,
    ``evaluate`` splices each into the LLM (``bae evaluate``)."""
    checkpoints = config.need("checkpoints")
    if len(checkpoints) < 2:
        raise BaeError(f"compare needs at least two checkpoints, got {len(checkpoints)}")
    out = Path(config.out)
    rows = [
        compare_row(name, config.for_checkpoint(c, out / name), interpret, show_progress)
        for name, c in zip(checkpoint_names(checkpoints), checkpoints)
    ]
    if evaluate:
        for row, columns in zip(rows, evaluate_columns(config, checkpoints, show_progress)):
            row.update({name: columns.get(name) for name in EVALUATE_COLUMNS.values()})
    atomic_write_text(out / "compare.csv", table_csv(rows))
    plot_compare(rows, config.dense_thresholds, out / "compare.png")
    atomic_write_json(out / "compare.json", {"config": config.model_dump(mode="json"), "rows": rows})
    print(format_table(rows))
    print_summary(
        f"bae features compare -> {out}", {"table": out / "compare.csv", "plot": out / "compare.png"}
    )
    return rows
