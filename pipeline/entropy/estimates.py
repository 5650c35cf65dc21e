"""Entropy estimates from per-group counts (docs/method.md).

Per group of n rows: Σ_j H_b(p̂_j) (``entropy_bits``, the paper's Ĥ, an upper bound on the code's
entropy up to sampling bias) beside the log2 n ceiling; the number of distinct whole codes and their
plug-in entropy (``joint_plugin_bits``, biased low, ≤ log2 n); a bias-corrected joint estimate with
its interval (``joint_bits``, NSB with an envelope; NaN without coincidences); the Chow–Liu tree
bound (``upper_bits``); the rows outside the checkpoint's typical radius (``atypical_rows``); a
verdict saying which of these the data resolve (``atypical`` where most rows were never trained
on); optional Poisson-bootstrap intervals over documents for Σ H_b, the plug-in and the joint
estimate.
"""

from __future__ import annotations

import warnings

import numpy as np

from bae.common.stats import binary_entropy
from bae.pipeline.entropy.bounds import chow_liu_bound
from bae.pipeline.entropy.counts import GroupCounts
from bae.pipeline.entropy.joint import JointEstimate, joint_estimate, plugin_entropy
from bae.pipeline.entropy.verdict import verdict


def set_entropy(ones: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Σ_j H_b(ones_j / rows): [..., G, bits] and [..., G] -> [..., G] (NaN where rows = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = ones / rows[..., None]
    h = binary_entropy(np.nan_to_num(p)).sum(-1)
    return np.where(rows > 0, h, np.nan)


def bootstrap_interval(
    replicates: np.ndarray, estimate: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis (replicates), shifted by the bootstrap bias
    (estimate − mean of the replicates), NaN where a group has no finite value.

    Resampling documents with replacement duplicates rows, which lowers every entropy estimate:
    the plain percentile interval of a plug-in at its ceiling lay wholly below the estimate
    (11.02 bits with [10.40, 10.48]). Shifted, the interval describes the estimate's spread around
    the estimate itself."""
    tail = 50.0 * (1.0 - confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups: NaN, as intended
        low, high = np.nanpercentile(replicates, [tail, 100.0 - tail], axis=0)
        bias = estimate - np.nanmean(replicates, axis=0)
    return low + bias, high + bias


def joint_columns(counts: GroupCounts, log2_alphabet: float) -> dict[str, np.ndarray]:
    """Distinct codes, coverage, plug-in and bias-corrected joint entropy per group."""
    assert counts.codes is not None
    g = len(counts.keys)
    cols = {name: np.full(g, np.nan) for name in ("joint_plugin_bits", "coverage", "joint_bits", "joint_low")}
    cols["joint_high"] = np.full(g, np.nan)
    cols["distinct_codes"] = np.zeros(g, np.int64)
    cols["singletons"] = np.zeros(g, np.int64)
    for i, part in enumerate(counts.codes.group_slices(counts.keys)):
        mults = counts.codes.count[part]
        if len(mults) == 0:
            continue
        est = joint_estimate(mults, log2_alphabet)
        cols["distinct_codes"][i], cols["singletons"][i] = len(mults), int((mults == 1).sum())
        cols["joint_plugin_bits"][i] = plugin_entropy(mults)
        cols["coverage"][i] = 1.0 - cols["singletons"][i] / counts.rows[i]
        cols["joint_bits"][i], cols["joint_low"][i], cols["joint_high"][i] = est.bits, est.low, est.high
    return cols


def joint_bootstrap(counts: GroupCounts, log2_alphabet: float, resolved: np.ndarray) -> np.ndarray:
    """[B, G, 2]: plug-in and joint estimate per bootstrap replicate (joint only where resolved)."""
    assert counts.codes is not None and counts.codes.boot is not None
    boot = counts.codes.boot
    out = np.full((boot.shape[1], len(counts.keys), 2), np.nan)
    for i, part in enumerate(counts.codes.group_slices(counts.keys)):
        for b in range(boot.shape[1]):
            mults = boot[part, b]
            mults = mults[mults > 0]
            if len(mults) == 0:
                continue
            out[b, i, 0] = plugin_entropy(mults)
            if resolved[i]:
                out[b, i, 1] = joint_estimate(mults, log2_alphabet).bits
    return out


def upper_bounds(counts: GroupCounts, pair_bits: tuple[int, ...], marginal: np.ndarray) -> np.ndarray:
    """The Chow–Liu bound per group: Σ H_b over all bits minus the tree MI over the paired bits."""
    assert counts.pairs is not None
    chosen = list(pair_bits)
    out = np.empty(len(counts.keys))
    for i in range(len(counts.keys)):
        n = int(counts.rows[i])
        out[i], _ = chow_liu_bound(n, counts.ones[i, chosen], counts.pairs[i], float(marginal[i]))
    return out


def estimate_columns(
    counts: GroupCounts, confidence: float, pair_bits: tuple[int, ...] = ()
) -> dict[str, np.ndarray]:
    """Every column of the entropy table for these counts (see the module docstring)."""
    n_bits = counts.ones.shape[1]
    atypical = counts.atypical if counts.atypical is not None else np.zeros(len(counts.keys), np.int64)
    marginal = set_entropy(counts.ones, counts.rows)
    varying = ((counts.ones > 0) & (counts.ones < counts.rows[:, None])).sum(1)
    columns: dict[str, np.ndarray] = {
        "n": counts.rows,
        "entropy_bits": marginal,
        "ceiling_bits": np.log2(counts.rows),
        "varying_bits": varying,
        "code_bits": np.full(len(counts.keys), n_bits),
        "atypical_rows": atypical,
    }
    if counts.boot_rows is not None and counts.boot_ones is not None:
        columns["ci_low"], columns["ci_high"] = bootstrap_interval(
            set_entropy(counts.boot_ones, counts.boot_rows), marginal, confidence
        )
    if counts.pairs is not None:
        columns["upper_bits"] = upper_bounds(counts, pair_bits, marginal)
    if counts.codes is not None:
        columns.update(joint_columns(counts, float(n_bits)))
    columns["verdict"] = verdicts(columns)
    if counts.codes is not None and counts.codes.boot is not None:
        reps = joint_bootstrap(counts, float(n_bits), columns["verdict"] == "resolved")
        columns["joint_plugin_ci_low"], columns["joint_plugin_ci_high"] = bootstrap_interval(
            reps[..., 0], columns["joint_plugin_bits"], confidence
        )
        columns["joint_ci_low"], columns["joint_ci_high"] = bootstrap_interval(
            reps[..., 1], columns["joint_bits"], confidence
        )
    return columns


def verdicts(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The verdict of every group from its columns."""
    out = []
    upper = columns.get("upper_bits", columns["entropy_bits"])
    for i, n in enumerate(columns["n"]):
        estimate = distinct = f1 = None
        if "joint_bits" in columns:
            distinct, f1 = int(columns["distinct_codes"][i]), int(columns["singletons"][i])
            estimate = JointEstimate(
                float(columns["joint_bits"][i]),
                float(columns["joint_low"][i]),
                float(columns["joint_high"][i]),
                "",
            )
        varying, atypical = int(columns["varying_bits"][i]), int(columns["atypical_rows"][i])
        out.append(verdict(int(n), distinct, f1, varying, estimate, float(upper[i]), atypical_rows=atypical))
    return np.array(out, dtype=object)
