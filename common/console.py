"""Progress bars with throughput and ETA, and the one-screen summaries that end each stage."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any, cast

from tqdm.auto import tqdm


def progress(total: float | None, desc: str, unit: str = "it", initial: float = 0, **kwargs: Any) -> tqdm:
    """A progress bar on stderr showing rate and ETA; quiet when ``disable=True`` is passed.

    Redrawn every half second on a terminal, every 30 s in a log file (cluster jobs, CI).
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        unit_scale=True,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,
        file=sys.stderr,
        **kwargs,
    )


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def format_summary(title: str, rows: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """A titled block of aligned ``key  value`` lines."""
    items = cast(list[tuple[str, Any]], list(rows.items() if isinstance(rows, Mapping) else rows))
    width = max((len(k) for k, _ in items), default=0)
    lines = [title] + [f"  {k.ljust(width)}  {v}" for k, v in items]
    return "\n".join(lines)


def print_summary(title: str, rows: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
    """Print a summary block to stdout."""
    print(format_summary(title, rows), flush=True)


def format_table(rows: list[dict[str, Any]]) -> str:
    """An aligned text table of dict rows (columns in first-seen order, None shown as ``-``)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(c) for c in columns]] + [
        ["-" if r.get(c) is None else str(r.get(c, "")) for c in columns] for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells)
