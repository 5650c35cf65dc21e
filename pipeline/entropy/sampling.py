"""Groups of equal size, and null groups drawn at random from the whole selection.

``--equal-n N`` keeps, in every group, the N rows with the smallest seeded hash of their store row
index: a uniform sample without replacement, the same in any unit order or on any worker. Null
groups partition the selection at random (a second hash) into parts of n + 4√n rows on average,
each then cut to exactly n rows the same way (a part short of n rows, rare, is dropped); their
estimates show what a group of that size reads when the grouping means nothing. Both need one pass
over the row arrays (no hidden states) first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from bae.common.errors import BaeError
from bae.common.hashing import salt, splitmix64, unit_interval
from bae.pipeline.analysis.scan import cached_store, map_reduce_units
from bae.stores import RowFilter
from bae.stores.sampler import unit_row_arrays

NULL_STREAM, ORDER_STREAM = "null", "order"


def row_uniform(rows: np.ndarray, seed: int, stream: str) -> np.ndarray:
    """A uniform [0, 1) float per store row index, fixed by (seed, stream)."""
    with np.errstate(over="ignore"):
        return unit_interval(splitmix64(rows.astype(np.uint64) ^ salt(seed, stream)))


def null_keys(rows: np.ndarray, seed: int, partitions: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(which rows fall in one of the first ``groups`` of ``partitions`` random parts, their keys −1−j)."""
    part = np.floor(row_uniform(rows, seed, NULL_STREAM) * partitions).astype(np.int64)
    inside = part < groups
    return inside, -1 - part[inside]


@dataclass(frozen=True)
class RowSample:
    """Which rows of a group count: those whose order hash is at most the group's threshold (a group
    without a threshold keeps every row), plus the rows of the null groups (negative keys)."""

    seed: int
    thresholds: tuple[tuple[int, float], ...] = ()
    null_partitions: int = 0
    null_groups: int = 0

    def limits(self, keys: np.ndarray, default: float) -> np.ndarray:
        """Each key's threshold (``default`` where it has none)."""
        if not self.thresholds:
            return np.full(len(keys), default)
        table = np.array(self.thresholds)
        at = np.minimum(np.searchsorted(table[:, 0], keys), len(table) - 1)
        return np.where(table[at, 0] == keys, table[at, 1], default)

    def select(self, keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into the batch, their group keys): kept real rows, then null-group rows."""
        order = row_uniform(rows, self.seed, ORDER_STREAM)
        keep = order <= self.limits(keys, np.inf)
        index, out_keys = [np.flatnonzero(keep)], [keys[keep]]
        if self.null_groups:
            inside, nkeys = null_keys(rows, self.seed, self.null_partitions, self.null_groups)
            chosen = order[inside] <= self.limits(nkeys, -1.0)
            index.append(np.flatnonzero(inside)[chosen])
            out_keys.append(nkeys[chosen])
        return np.concatenate(index), np.concatenate(out_keys)


@dataclass(frozen=True)
class SamplePlan:
    """What the sampling pre-passes read: which rows, grouped how (picklable)."""

    store: str
    row_filter: RowFilter
    group_key: object
    units: tuple[int, ...]
    seed: int


def _sizes(plan: SamplePlan, unit: int) -> dict[int, int]:
    _, rows = unit_row_arrays(cached_store(plan.store), plan.row_filter, unit)
    keys, counts = np.unique(plan.group_key(rows), return_counts=True)  # type: ignore[operator]
    return dict(zip(keys.tolist(), counts.tolist()))


def _add(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def _smallest(
    plan: SamplePlan, n: int, null: tuple[int, int], real: bool, unit: int
) -> dict[int, np.ndarray]:
    """Per group key, the ``n`` smallest order hashes of the unit's rows (real and/or null groups)."""
    _, rows = unit_row_arrays(cached_store(plan.store), plan.row_filter, unit)
    order = row_uniform(rows["row"], plan.seed, ORDER_STREAM)
    keys = plan.group_key(rows) if real else np.zeros(0, np.int64)  # type: ignore[operator]
    values = order if real else np.zeros(0)
    if null[1]:
        inside, nkeys = null_keys(rows["row"], plan.seed, *null)
        keys, values = np.concatenate([keys, nkeys]), np.concatenate([values, order[inside]])
    return {int(k): np.sort(values[keys == k])[:n] for k in np.unique(keys)}


def _keep_smallest(n: int, a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {
        k: np.sort(np.concatenate([a.get(k, np.zeros(0)), b.get(k, np.zeros(0))]))[:n]
        for k in a.keys() | b.keys()
    }


def plan_sample(
    plan: SamplePlan, equal_n: int | None, null_groups: int, scheduler: str | None, show_progress: bool
) -> tuple[RowSample, dict[int, int]]:
    """The row sample of ``--equal-n`` and the null groups, and every real group's full size."""
    sizes = map_reduce_units(
        plan.units, functools.partial(_sizes, plan), _add, scheduler, "entropy: group sizes", show_progress
    )
    if not sizes:
        return RowSample(plan.seed), sizes
    n = equal_n or int(np.median(list(sizes.values())))
    if equal_n is not None:
        small = sorted((k, v) for k, v in sizes.items() if v < equal_n)
        if small:
            shown = ", ".join(f"{k} ({v} rows)" for k, v in small[:5]) + (" ..." if len(small) > 5 else "")
            raise BaeError(
                f"--equal-n {equal_n} exceeds the size of {len(small)} group(s): {shown}; choose at most "
                f"{min(v for _, v in small)} or leave those groups out (e.g. with --positions)"
            )
    # parts of expected size n + 4√n: each holds at least n rows but with probability ~3e-5
    partitions = sum(sizes.values()) // max(int(np.ceil(n + 4 * np.sqrt(n))), 1)
    null = (partitions, min(null_groups, partitions) if n >= 2 else 0)
    if equal_n is None and not null[1]:
        return RowSample(plan.seed), sizes
    part = functools.partial(_smallest, plan, n, null, equal_n is not None)
    merge = functools.partial(_keep_smallest, n)
    smallest = map_reduce_units(plan.units, part, merge, scheduler, "entropy: sampling", show_progress)
    # a group keeps its n smallest hashes; a null part with fewer than n rows is dropped (threshold −1)
    thresholds = tuple(sorted((k, float(v[n - 1]) if len(v) >= n else -1.0) for k, v in smallest.items()))
    return RowSample(plan.seed, thresholds, *null), sizes
