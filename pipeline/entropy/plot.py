"""The ``bae entropy`` figure: Ĥ per group, a line per layer, the log2 n ceiling dashed.

Numeric groupings (position, a numeric document field, all) give lines against the group value;
a text field gives one point per value on a categorical axis; ``document`` and ``token`` (many groups
with arbitrary ids) give a histogram of Ĥ per layer instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bae.common.atomic_files import atomic_savefig

HISTOGRAM_GROUPINGS = ("document", "token")


def draw_series(ax: Any, x: np.ndarray, s: dict[str, Any], color: str) -> None:
    """One layer: Σ H_b (dotted, an upper bound), the joint estimate with its interval (solid), the
    log2 n ceiling (dashed), groups that only give a lower bound as hollow markers (with the
    plug-in's bootstrap interval when there is one), groups whose trainings resolve them at readings
    too far apart as hollow squares with their hull, groups of rows the BAE was not trained on as
    grey crosses, and the null groups' joint range as a band."""
    order = np.argsort(x, kind="stable")
    x = x[order]
    marker = "o" if len(x) <= 48 else None
    label = s["label"]
    atypical = (s["verdict"][order] == "atypical").astype(bool)
    sum_hb = np.where(atypical, np.nan, s["entropy_bits"][order])  # no line through a group not read
    ax.plot(x, sum_hb, color=color, linestyle=":", label=f"{label} Σ H_b (upper bound)")
    ax.plot(x, s["ceiling_bits"][order], color=color, linestyle="--", alpha=0.6, label=f"{label} log2 n")
    if "ci_low" in s:
        ax.fill_between(x, s["ci_low"][order], s["ci_high"][order], color=color, alpha=0.1)
    if atypical.any():
        shown = s["joint_plugin_bits"] if "joint_plugin_bits" in s else s["entropy_bits"]
        ax.plot(
            x[atypical],
            shown[order][atypical],
            linestyle="none",
            marker="X",
            markersize=9,
            color="0.35",
            label=f"{label} rows outside training (code not fitted: no reading)",
        )
    if "joint_bits" not in s:
        return
    resolved = (s["verdict"][order] == "resolved").astype(bool)
    if resolved.any():  # no legend entry for a line that is not drawn
        joint = np.where(resolved, s["joint_bits"][order], np.nan)
        ax.plot(x, joint, color=color, marker=marker, label=f"{label} joint H (resolved)")
        low, high = s["joint_low"][order], s["joint_high"][order]
        ax.fill_between(x, low, high, where=resolved, color=color, alpha=0.25)
    unstable = (s["verdict"][order] == "unstable").astype(bool)
    if unstable.any():  # each training resolved it, at readings further apart than an interval
        joint = s["joint_bits"][order][unstable]
        spread = np.nan_to_num(
            np.clip(
                [joint - s["joint_low"][order][unstable], s["joint_high"][order][unstable] - joint], 0, None
            )
        )
        ax.errorbar(
            x[unstable],
            joint,
            yerr=spread,
            fmt="s",
            markerfacecolor="none",
            color=color,
            capsize=2,
            label=f"{label} joint H, trainings disagree",
        )
    lower = (s["verdict"][order] == "lower_bound").astype(bool)
    if lower.any():
        plugin = s["joint_plugin_bits"][order][lower]
        ax.plot(
            x[lower],
            plugin,
            linestyle="none",
            marker="^",
            markerfacecolor="none",
            color=color,
            label=f"{label} ≥ plug-in (undersampled)",
        )
        if "joint_plugin_ci_low" in s:  # the bootstrap interval of the plug-in itself
            low, high = s["joint_plugin_ci_low"][order][lower], s["joint_plugin_ci_high"][order][lower]
            spread = np.nan_to_num(np.clip([plugin - low, high - plugin], 0, None))
            ax.errorbar(x[lower], plugin, yerr=spread, fmt="none", color=color, capsize=2, linewidth=0.8)
    null = s.get("null", {})
    if len(null.get("n", [])):
        resolved = (null["verdict"].astype(str) == "resolved").all()
        value = null["joint_bits"] if resolved else null["joint_plugin_bits"]
        what = "joint H" if resolved else "plug-in"
        ax.axhspan(
            np.nanmin(value),
            np.nanmax(value),
            color=color,
            alpha=0.08,
            label=f"{label} random groups ({what})",
        )


def plot_entropy(series: list[dict[str, Any]], group_by: str, path: Path) -> Path:
    """Write the figure; each series holds ``label``, ``x`` (group values) and the table's columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if group_by in HISTOGRAM_GROUPINGS:
        for s in series:
            ax.hist(s["entropy_bits"], bins=40, alpha=0.6, label=s["label"])
        ax.set_xlabel(f"Ĥ per {group_by} (bits)")
        ax.set_ylabel(f"{group_by}s")
    else:
        values = [v for s in series for v in s["x"]]
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in values)
        ticks = sorted(set(map(str, values))) if not numeric else None
        for i, s in enumerate(series):
            if ticks is None:
                x = np.asarray(s["x"], np.float64)
            else:
                x = np.array([ticks.index(str(v)) for v in s["x"]])
            draw_series(ax, x, s, f"C{i % 10}")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks, rotation=30 if len(ticks) > 8 else 0)
        ax.set_xlabel(group_by)
        ax.set_ylabel("entropy of the code (bits)")
        upper = max(float(np.nanmax(s["entropy_bits"], initial=0)) for s in series)
        ceiling = max(float(np.nanmax(s["ceiling_bits"], initial=1)) for s in series)
        if upper > 4 * ceiling:  # Σ H_b far above what the groups can resolve: show both scales
            ax.set_yscale("symlog", linthresh=max(ceiling, 1.0))
    ax.set_title(f"BAE feature-set entropy per {group_by}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
