"""The figure of ``bae evaluate``: CE loss recovered against FVU, one point per checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bae.common.atomic_files import atomic_savefig


def plot_recovered(rows: list[dict[str, Any]], path: Path) -> Path:
    """CE recovered (with its bootstrap interval) vs FVU per checkpoint, one colour per architecture;
    the mean ablation of each layer as a dotted line (zero ablation is 0, the clean model 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [r for r in rows if r["fvu"] is not None and r["ce_recovered"] is not None]
    kinds = sorted({r["kind"] for r in points})
    colours = {k: f"C{i}" for i, k in enumerate(kinds)}
    for row in points:
        low, high = row["ce_recovered_low"], row["ce_recovered_high"]
        spread = [[row["ce_recovered"] - low], [high - row["ce_recovered"]]] if low is not None else None
        ax.errorbar(
            row["fvu"], row["ce_recovered"], yerr=spread, fmt="o", color=colours[row["kind"]], capsize=3
        )
        ax.annotate(
            f"{row['name']} (L{row['layer']})",
            (row["fvu"], row["ce_recovered"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    for kind, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=kind)
    for row in rows:
        if row["kind"] == "mean ablation" and row["ce_recovered"] is not None:
            ax.axhline(
                row["ce_recovered"],
                color="gray",
                linestyle=":",
                linewidth=1,
                label=f"mean ablation, layer {row['layer']}",
            )
    ax.axhline(1.0, color="k", linewidth=0.6)
    ax.set_xlabel("FVU (raw space, typical rows)")
    ax.set_ylabel("CE loss recovered (vs zero ablation)")
    ax.set_title(
        "what a reconstruction costs the model" if points else "no checkpoint with a CE loss to plot"
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
