"""The deterministic harvest plan: windows packed whole into units, units cut into forward batches.

A unit's values do not depend on which other units are done or which process computes them, so a
resumed or multi-process harvest writes exactly what one uninterrupted process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from bae.common.errors import BaeError
from bae.pipeline.harvest.windows import Window


@dataclass
class UnitPlan:
    """Units of whole windows: ``units[u]`` lists window indices; rows are concatenated kept rows."""

    windows: list[Window]
    unit_rows: int
    units: list[list[int]]

    @property
    def n_rows(self) -> int:
        return (len(self.units) - 1) * self.unit_rows + sum(self.windows[i].n_rows for i in self.units[-1])

    def unit_tokens(self, unit: int) -> int:
        return sum(len(self.windows[i].input_ids) for i in self.units[unit])

    def unit_windows(self, unit: int) -> list[Window]:
        return [self.windows[i] for i in self.units[unit]]


def plan_units(windows: list[Window], unit_rows: int) -> UnitPlan:
    """Pack windows in order into units of at most ``unit_rows`` rows, never splitting a window."""
    widest = max(w.n_rows for w in windows)
    if widest > unit_rows:
        raise BaeError(
            f"unit_rows {unit_rows} is smaller than a window's {widest} rows; use at least {widest}"
        )
    units: list[list[int]] = [[]]
    used = 0
    for i, win in enumerate(windows):
        if used + win.n_rows > unit_rows:
            units.append([])
            used = 0
        units[-1].append(i)
        used += win.n_rows
    return UnitPlan(windows, unit_rows, units)


def forward_batches(windows: list[Window], batch_tokens: int) -> Iterator[list[Window]]:
    """Consecutive windows grouped so that ``count x longest`` stays within ``batch_tokens``."""
    batch: list[Window] = []
    longest = 0
    for win in windows:
        length = len(win.input_ids)
        if batch and (len(batch) + 1) * max(longest, length) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(win)
        longest = max(longest, length)
    if batch:
        yield batch
