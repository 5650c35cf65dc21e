"""Firing frequency of every feature over a store: dense and dead counts, BAE oriented frequency,
a log-scale histogram, and a per-feature JSON/CSV table (docs/method.md).

One dask pass over the store gathers, per feature, how many rows fire it and the sum and sum of
squares of its code (SAE activations, for z-scoring), plus the reconstruction error for FVU.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bae.common.atomic_files import atomic_savefig, atomic_write_json, atomic_write_text, read_json
from bae.common.console import human_count, print_summary
from bae.common.errors import BaeError
from bae.common.selection import format_ranges
from bae.common.stats import fvu_from_sums
from bae.pipeline.analysis.scan import ScanSpec, cached_store, map_reduce_units
from bae.pipeline.features.config import FeaturesConfig, check_recorded
from bae.pipeline.features.spec import output_dir, scan_spec

FREQUENCY_JSON = "frequency.json"
DEAD_MIN_ROWS = 1_000_000


@dataclass
class FeatureStats:
    """Sums over rows: firing counts and code moments per feature, reconstruction error, input moments."""

    rows: int
    counts: np.ndarray  # int64 [F]
    code_sum: np.ndarray  # float64 [F]
    code_sq: np.ndarray  # float64 [F]
    sse: float  # reconstruction error and input moments over the typical rows only
    x_sum: np.ndarray  # float64 [d]
    x_sq: np.ndarray  # float64 [d]
    typical_rows: int

    def merge(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(
            self.rows + other.rows,
            self.counts + other.counts,
            self.code_sum + other.code_sum,
            self.code_sq + other.code_sq,
            self.sse + other.sse,
            self.x_sum + other.x_sum,
            self.x_sq + other.x_sq,
            self.typical_rows + other.typical_rows,
        )

    @property
    def frequency(self) -> np.ndarray:
        return self.counts / max(self.rows, 1)

    @property
    def fvu(self) -> float:
        """The project's FVU (``bae.common.stats.FVU_DEFINITION``): raw space, typical rows."""
        return fvu_from_sums(self.sse, self.x_sum, self.x_sq, self.typical_rows)

    @property
    def mean_l0(self) -> float:
        return float(self.counts.sum()) / max(self.rows, 1)

    def code_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and standard deviation of the code (std 1 where it is 0)."""
        n = max(self.rows, 1)
        mean = self.code_sum / n
        std = np.sqrt(np.maximum(self.code_sq / n - mean**2, 0.0))
        return mean, np.where(std > 1e-12, std, 1.0)


def stats_partial(spec: ScanSpec, unit: int) -> FeatureStats:
    """FeatureStats of one store unit, summed on the model's device; only the sums leave it."""
    _, model = spec.open()
    f, d = model.n_bits, model.config.d_model
    stats = FeatureStats(0, np.zeros(f, np.int64), np.zeros(f), np.zeros(f), 0.0, np.zeros(d), np.zeros(d), 0)
    sums: list[torch.Tensor] = []
    for x, _ in spec.batches(unit):
        seen = model.analyse(x)
        code = seen.code.double()
        err = (x - model.reconstruct(seen.decoder_input)).double()
        xd = x.double()
        keep = model.typical_raw(x)
        if keep is not None:
            err, xd = err[keep], xd[keep]
        batch = [seen.bits.sum(0), code.sum(0), code.pow(2).sum(0), err.pow(2).sum()]
        batch += [xd.sum(0), xd.pow(2).sum(0)]
        sums = batch if not sums else [a + b for a, b in zip(sums, batch)]
        stats.rows, stats.typical_rows = stats.rows + len(x), stats.typical_rows + len(xd)
    if sums:
        counts, code_sum, code_sq, sse, x_sum, x_sq = (t.cpu().numpy() for t in sums)
        typical = stats.typical_rows
        stats = FeatureStats(stats.rows, counts, code_sum, code_sq, float(sse), x_sum, x_sq, typical)
    return stats


def compute_stats(spec: ScanSpec, scheduler: str | None, show_progress: bool = True) -> FeatureStats:
    stats = map_reduce_units(
        spec.units,
        functools.partial(stats_partial, spec),
        FeatureStats.merge,
        scheduler,
        "features: frequencies",
        show_progress,
    )
    if stats.rows == 0:
        raise BaeError(f"store {spec.store} layer {spec.layer}: no rows pass the filters")
    return stats


def summarize(freq: np.ndarray, rows: int, architecture: str, thresholds: list[float]) -> dict[str, Any]:
    """Dense counts per threshold, dead count, and for a BAE the same on the oriented frequency."""
    summary: dict[str, Any] = {"rows": rows, "features": len(freq), "architecture": architecture}
    for t in thresholds:
        summary[f"dense>{t:g}"] = int((freq > t).sum())
    summary["dead"] = int((freq == 0).sum())
    summary["dead_reliable"] = rows >= DEAD_MIN_ROWS
    if architecture == "bae":
        oriented = np.minimum(freq, 1 - freq)
        for t in thresholds:
            if t < 0.5:
                summary[f"oriented_dense>{t:g}"] = int((oriented > t).sum())
        summary["always_on"] = int((freq == 1).sum())
        summary["constant"] = int((oriented == 0).sum())
    return summary


def frequency_csv(freq: np.ndarray, architecture: str, counts: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    oriented = architecture == "bae"
    writer.writerow(["feature", "count", "frequency", *(["oriented_frequency"] if oriented else [])])
    for j, (c, f) in enumerate(zip(counts.tolist(), freq.tolist())):
        writer.writerow([j, c, f"{f:.8g}", *([f"{min(f, 1 - f):.8g}"] if oriented else [])])
    return buffer.getvalue()


def plot_histogram(
    freq: np.ndarray, architecture: str, summary: dict[str, Any], path: Path, title: str = ""
) -> None:
    """Histogram of log10 firing frequency (dead features noted in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    floor = 1.0 / max(summary["rows"], 2)
    bins = np.linspace(math.log10(floor), 0, 61)
    series = [("frequency", freq)]
    if architecture == "bae":
        series.append(("oriented min(f, 1-f)", np.minimum(freq, 1 - freq)))
    for label, values in series:
        live = values[values > 0]
        # matplotlib's stub wants a Sequence for bins; it takes any array-like
        ax.hist(np.log10(live), bins=bins, alpha=0.6, label=f"{label} ({len(values) - len(live)} at 0)")  # pyright: ignore[reportArgumentType]
    for t in summary_thresholds(summary):
        ax.axvline(math.log10(t), color="k", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(
        title or f"{architecture}: {summary['features']} features over {human_count(summary['rows'])} rows"
    )
    ax.legend()
    atomic_savefig(fig, path)
    plt.close(fig)


def summary_thresholds(summary: dict[str, Any]) -> list[float]:
    return [float(k.split(">")[1]) for k in summary if k.startswith("dense>")]


@dataclass
class FrequencyResult:
    summary: dict[str, Any]
    frequency: np.ndarray
    fvu: float
    mean_l0: float
    code_mean: np.ndarray
    code_std: np.ndarray


def run_frequency(
    config: FeaturesConfig, show_progress: bool = True, spec: ScanSpec | None = None, quiet: bool = False
) -> FrequencyResult:
    """``bae features frequency``: reuse ``<out>/frequency.json`` if made with these options, else compute."""
    out = output_dir(config)
    path = out / FREQUENCY_JSON
    recorded = read_json(path)
    spec = spec or scan_spec(config)
    units = f"{format_ranges(spec.units)} of {cached_store(spec.store).n_units}"
    reusable = check_recorded(
        f"frequency output {path}", recorded and recorded["config"], config, "frequency"
    )
    if reusable and recorded is not None and recorded["summary"].get("units") == units:
        result = FrequencyResult(
            recorded["summary"],
            np.asarray(recorded["frequency"]),
            recorded["fvu"],
            recorded["mean_l0"],
            np.asarray(recorded["code_mean"]),
            np.asarray(recorded["code_std"]),
        )
    else:
        _, model = spec.open()
        stats = compute_stats(spec, config.scheduler, show_progress)
        freq = stats.frequency
        summary = summarize(freq, stats.rows, model.architecture, config.dense_thresholds)
        summary.update(
            fvu=stats.fvu, atypical_rows=stats.rows - stats.typical_rows, mean_l0=stats.mean_l0, units=units
        )
        mean, std = stats.code_mean_std()
        result = FrequencyResult(summary, freq, stats.fvu, stats.mean_l0, mean, std)
        plot_histogram(freq, model.architecture, summary, out / "frequency_hist.png")
        atomic_write_text(out / "frequency.csv", frequency_csv(freq, model.architecture, stats.counts))
        atomic_write_json(
            path,
            {
                "config": config.stage_config("frequency"),
                "summary": summary,
                "fvu": stats.fvu,
                "mean_l0": stats.mean_l0,
                "counts": stats.counts.tolist(),
                "frequency": freq.tolist(),
                "code_mean": mean.tolist(),
                "code_std": std.tolist(),
            },
        )  # written last: its presence means the stage is complete
    if not quiet:
        rows = {k: v for k, v in result.summary.items() if k not in ("dead_reliable",)}
        if not result.summary["dead_reliable"]:
            rows["dead"] = f"{rows['dead']} (over fewer than {human_count(DEAD_MIN_ROWS)} rows)"
        print_summary(f"bae features frequency -> {out}", rows)
    return result
