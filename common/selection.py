"""Which rows of a store a stage uses: one positions syntax and one ``RowSelection`` for every stage.

Positions are written ``all``, ``last`` (harvest only: the last token of each document) or a list
of integers and ranges, ``0-63,80``; a list of integers is accepted too (config files).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from bae.common.configs import StrictModel
from bae.common.errors import BaeError

PositionChoice = Literal["all", "last"] | list[int]
POSITIONS_HELP = "token positions: all, or integers and ranges, e.g. 0-63,80"


def parse_positions(value: Any, allow_last: bool = True) -> PositionChoice:
    """``"all"``, ``"last"``, ``"0-63,80"`` or a list of ints -> ``"all"``/``"last"``/sorted unique ints."""
    if value is None:
        return "all"
    if isinstance(value, str):
        text = value.replace(" ", "").lower()
        if text == "all" or (text == "last" and allow_last):
            return text  # type: ignore[return-value]
        value = _ranges(value, text, allow_last)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise BaeError(f"positions {value!r}: {_expected(allow_last)}")
    try:
        items = sorted({int(p) for p in value})
    except (TypeError, ValueError):
        raise BaeError(f"positions {value!r}: {_expected(allow_last)}") from None
    if not items or items[0] < 0:
        raise BaeError(f"positions {value!r}: expected non-negative positions")
    return items


def parse_ranges(text: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``: what ``format_ranges`` writes (unit lists in records)."""
    return _ranges(text, text.replace(" ", ""), allow_last=False)


def _expected(allow_last: bool) -> str:
    return f"expected all{', last' if allow_last else ''}, or integers and ranges such as 0-63,80"


def _ranges(original: str, text: str, allow_last: bool) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise BaeError(f"positions {original!r}: {_expected(allow_last)}")
        out.extend(range(int(lo), int(hi if sep else lo) + 1))
    return out


def format_ranges(values: Any) -> str:
    """Sorted integers as ranges, ``[0, 1, 2, 5]`` -> ``"0-2,5"`` (what ``parse_positions`` reads)."""
    items, parts = sorted({int(v) for v in values}), []
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i] != items[i - 1] + 1:
            lo, hi = items[start], items[i - 1]
            parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
            start = i
    return ",".join(parts)


class RowSelection(StrictModel):
    """The rows a stage reads: valid rows only or all, which positions, and how documents are split
    into train and validation (a hash of the document id; the same split in every stage)."""

    valid_only: bool = Field(default=True, description="skip padding, BOS and special-token rows")
    positions: Literal["all"] | list[int] = Field(default="all", description=POSITIONS_HELP)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="documents held out for validation")
    split_seed: int = Field(default=0, ge=0, description="seed of the train/validation split by document")
    allow_partial: bool = Field(
        default=False,
        description="read a store whose harvest or import is unfinished (its complete units only; "
        "every output records which units it used)",
    )

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, value: Any) -> Any:
        try:
            return parse_positions(value, allow_last=False)
        except BaeError as exc:
            raise ValueError(str(exc)) from None

    @property
    def position_list(self) -> list[int] | None:
        """The selected positions, or None for all."""
        return None if self.positions == "all" else list(self.positions)


class SplitSelection(RowSelection):
    """A row selection for the analysis stages, which may read one side of the split only."""

    split: Literal["train", "val"] | None = Field(
        default=None, description="only one split of the documents [all]"
    )
