"""Whole codes, counted per group at any code width: a 128-bit hash per packed code row, and a
mergeable table of (group, code hash) -> count (and its Poisson-bootstrap counts).

Two different codes share a hash with probability ~2^-128 per pair, so distinct-code counts and the
plug-in entropy are exact for any store that fits on a disk. Partial tables from chunks or dask
workers merge exactly (associative and commutative). Memory: 24 bytes per distinct (group, code)
entry, plus 4 bytes per bootstrap replicate; a table refuses to grow past ``max_distinct`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bae.common.errors import BaeError

# Two lanes, each an iterated bijective xor-shift-multiply mix over 64-bit words of the packed row:
# lane 0 with SplitMix64's finalizer constants, lane 1 with MurmurHash3's fmix64 constants.
_LANES = (
    (
        np.uint64(0x9E3779B97F4A7C15),
        (30, 27, 31),
        (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)),
    ),
    (
        np.uint64(0xC2B2AE3D27D4EB4F),
        (33, 33, 33),
        (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)),
    ),
)
_BLOCK_ROWS = 16384
DEFAULT_MAX_DISTINCT = 1 << 25


def _mix(
    h: np.ndarray, tmp: np.ndarray, shifts: tuple[int, int, int], mults: tuple[np.uint64, np.uint64]
) -> None:
    """A bijective 64-bit finalizer, in place."""
    s0, s1, s2 = (np.uint64(s) for s in shifts)
    np.right_shift(h, s0, out=tmp)
    h ^= tmp
    h *= mults[0]
    np.right_shift(h, s1, out=tmp)
    h ^= tmp
    h *= mults[1]
    np.right_shift(h, s2, out=tmp)
    h ^= tmp


def code_hashes(packed: np.ndarray) -> np.ndarray:
    """uint64 [n, 2]: a 128-bit hash of each row of ``packed`` (uint8 [n, B], ``np.packbits`` of bool
    codes along axis 1); equal rows hash equally in any process, on any platform."""
    n, nbytes = packed.shape
    n_words = max(1, -(-nbytes // 8))
    out = np.empty((n, 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, n, _BLOCK_ROWS):
            block = packed[start : start + _BLOCK_ROWS]
            m = block.shape[0]
            buf = np.zeros((m, n_words * 8), dtype=np.uint8)
            buf[:, :nbytes] = block
            words = np.ascontiguousarray(buf.view("<u8").T)  # [n_words, m]
            tmp = np.empty(m, dtype=np.uint64)
            for lane, (seed, shifts, mults) in enumerate(_LANES):
                h = np.full(m, seed ^ np.uint64(nbytes) * mults[0], dtype=np.uint64)
                for word in words:
                    h ^= word
                    _mix(h, tmp, shifts, mults)
                out[start : start + m, lane] = h
    return out


@dataclass
class CodeTable:
    """Sorted unique (group key, code hash) entries with their row counts and, optionally, their
    Poisson-bootstrap counts ``boot`` [P, B] (rows weighted by their document's replicate weight)."""

    group: np.ndarray  # int64 [P]
    hashes: np.ndarray  # uint64 [P, 2]
    count: np.ndarray  # int64 [P]
    boot: np.ndarray | None = None  # int32 [P, B]

    @classmethod
    def of_rows(cls, group: np.ndarray, hashes: np.ndarray, weights: np.ndarray | None) -> CodeTable:
        """One entry per row (``weights``: int [B, n] bootstrap weights, or None), reduced."""
        boot = None if weights is None else np.ascontiguousarray(weights.T, dtype=np.int32)
        return cls(group.astype(np.int64), hashes, np.ones(len(group), np.int64), boot).reduced()

    def reduced(self) -> CodeTable:
        """Entries sorted by (group, hash), equal keys summed."""
        if len(self.group) == 0:
            return self
        order = np.lexsort((self.hashes[:, 1], self.hashes[:, 0], self.group))
        g, h = self.group[order], self.hashes[order]
        new = np.ones(len(g), dtype=bool)
        new[1:] = (g[1:] != g[:-1]) | (h[1:, 0] != h[:-1, 0]) | (h[1:, 1] != h[:-1, 1])
        starts = np.flatnonzero(new)
        boot = None if self.boot is None else np.add.reduceat(self.boot[order], starts, 0, np.int32)
        return CodeTable(g[starts], h[starts], np.add.reduceat(self.count[order], starts), boot)

    def merge(self, other: CodeTable, max_distinct: int = DEFAULT_MAX_DISTINCT) -> CodeTable:
        """Both tables' counts together; refuses to hold more than ``max_distinct`` entries."""
        boot = None
        if self.boot is not None and other.boot is not None:
            boot = np.concatenate([self.boot, other.boot])
        both = CodeTable(
            np.concatenate([self.group, other.group]),
            np.concatenate([self.hashes, other.hashes]),
            np.concatenate([self.count, other.count]),
            boot,
        ).reduced()
        if len(both.group) > max_distinct:
            raise BaeError(
                f"more than {max_distinct} distinct (group, code) pairs: too many to count whole codes in "
                "memory; subsample with --equal-n, select fewer rows, or pass --no-joint for the bounds only"
            )
        return both

    def group_slices(self, keys: np.ndarray) -> list[slice]:
        """The entries of each group key in ``keys``, as slices."""
        lo, hi = np.searchsorted(self.group, keys), np.searchsorted(self.group, keys, side="right")
        return [slice(int(a), int(b)) for a, b in zip(lo, hi)]

    def arrays(self) -> dict[str, np.ndarray]:
        """For saving; ``CodeTable.from_arrays`` is the inverse."""
        out = {"code_group": self.group, "code_hashes": self.hashes, "code_count": self.count}
        return out if self.boot is None else {**out, "code_boot": self.boot}

    @classmethod
    def from_arrays(cls, data: dict[str, np.ndarray]) -> CodeTable:
        return cls(
            data["code_group"].astype(np.int64),
            data["code_hashes"].astype(np.uint64),
            data["code_count"].astype(np.int64),
            data["code_boot"].astype(np.int32) if "code_boot" in data else None,
        )
