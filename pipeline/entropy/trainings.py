"""Several trainings of one BAE (same layer and positions, other seeds) read as one measurement.

A group's entropy depends on the trained code as well as on the rows: on the default job, two
trainings differ by up to 0.07 bits of plug-in and 5 bits of Σ H_b at one position, beyond the
bootstrap intervals over documents. Given K trainings, each column becomes their mean and each
interval the hull of theirs (it covers the documents' sampling and the trainings' spread); the
spread itself is a column. The verdict is the weakest one the trainings support together:
``unstable`` where each resolves the group but their intervals span more than ``max_halfwidth``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bae.common.errors import BaeError
from bae.pipeline.entropy.verdict import VerdictRules

SAME = ("n", "ceiling_bits")
MINIMA = ("ci_low", "joint_low", "joint_plugin_ci_low", "joint_ci_low")
MAXIMA = ("ci_high", "joint_high", "joint_plugin_ci_high", "joint_ci_high", "atypical_rows", "code_bits")
SPREADS = {"entropy_bits": "entropy_spread_bits", "joint_plugin_bits": "plugin_spread_bits"}


def replicate_sets(parts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Parts grouped by (layer, positions): each set of two or more is one model trained K times."""
    sets: dict[tuple[int, tuple[int, ...] | None], list[dict[str, Any]]] = {}
    for part in parts:
        sets.setdefault((part["layer"], part["covers"]), []).append(part)
    return [s for s in sets.values() if len(s) > 1]


def combined_verdict(verdicts: list[str], low: float, high: float, rules: VerdictRules) -> str:
    """The verdict K trainings support together (``low``, ``high``: the hull of their joint intervals)."""
    kinds = set(verdicts)
    if kinds == {"resolved"}:
        return "resolved" if (high - low) / 2.0 <= rules.max_halfwidth else "unstable"
    if len(kinds) == 1:
        return verdicts[0]
    for weakest in ("atypical", "lower_bound"):
        if weakest in kinds:
            return weakest
    return "unstable"


def combine(members: list[dict[str, Any]], rules: VerdictRules = VerdictRules()) -> dict[str, Any]:
    """One part from the parts of K trainings that measured the same groups."""
    keys = members[0]["keys"]
    for m in members[1:]:
        if not np.array_equal(m["keys"], keys) or not np.array_equal(
            m["columns"]["n"], members[0]["columns"]["n"]
        ):
            raise BaeError(
                f"checkpoints {members[0]['checkpoint']} and {m['checkpoint']} cover the same layer and "
                "positions but measured different groups; give them in separate runs"
            )
    stacked = {name: [np.asarray(m["columns"][name]) for m in members] for name in members[0]["columns"]}
    columns: dict[str, np.ndarray] = {}
    for name, values in stacked.items():
        if name == "verdict":
            continue
        if name in SAME:
            columns[name] = values[0]
        elif name in MINIMA:  # NaN only where every training has NaN
            columns[name] = np.fmin.reduce(values, axis=0)
        elif name in MAXIMA:
            columns[name] = np.fmax.reduce(values, axis=0)
        else:
            columns[name] = _mean(np.asarray(values, np.float64))
    for name, spread in SPREADS.items():
        if name in stacked:
            columns[spread] = np.ptp(np.asarray(stacked[name], np.float64), axis=0)
    verdicts = np.asarray(stacked["verdict"]).astype(str)
    low = columns.get("joint_low", np.full(len(keys), np.nan))
    high = columns.get("joint_high", np.full(len(keys), np.nan))
    columns["verdict"] = np.array(
        [combined_verdict(list(verdicts[:, g]), low[g], high[g], rules) for g in range(len(keys))],
        dtype=object,
    )
    fvus = [m["fvu"] for m in members]
    return {
        **members[0],
        "checkpoint": ";".join(m["checkpoint"] for m in members),
        "trainings": len(members),
        "fvu": float(np.mean(fvus)),
        "fvu_range": (min(fvus), max(fvus)),
        "names": short_names([m["checkpoint"] for m in members]),
        "columns": columns,
    }


def _mean(values: np.ndarray) -> np.ndarray:
    """Mean over the trainings, NaN only where every training has NaN."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(0)
    count = finite.sum(0)
    return np.divide(total, count, out=np.full(total.shape, math.nan), where=count > 0)


def short_names(checkpoints: list[str]) -> list[str]:
    """The checkpoints' folder names, with their parent's where those repeat (``bae-layer15/model``)."""
    names = [Path(c).name for c in checkpoints]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(c).parent.name}/{Path(c).name}" for c in checkpoints]
