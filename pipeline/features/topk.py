"""Bounded top-k selection with seeded tie-breaking: the core of the top-contexts pass.

Ties between equal scores are broken by a key drawn per (row, column) from a fixed hash, so the
selection does not depend on batching, unit order, which worker saw a row or its device: every
operation here is a torch op that runs where its tensors are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bae.common.hashing import mix64


def _to_int64(value: np.uint64) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return int(np.array(value, np.uint64).view(np.int64))


_MIX = tuple(_to_int64(np.uint64(m)) for m in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` read as uint64."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64_torch(z: torch.Tensor) -> torch.Tensor:
    """``bae.common.hashing.mix64`` on int64 tensors (wrapping arithmetic, the same bits), on any device."""
    z = (z ^ _shift_right(z, 30)) * _MIX[0]
    z = (z ^ _shift_right(z, 27)) * _MIX[1]
    return z ^ _shift_right(z, 31)


def random_keys(rows: torch.Tensor, cols: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """A uniform [0, 1) float64 per (row, col) pair, fixed by (seed, stream) and independent of batching
    and of the device the tensors are on.

    ``rows`` and ``cols`` broadcast against each other (e.g. ``rows[:, None]`` and ``cols[None, :]``).
    """
    base = _to_int64(mix64(np.array([seed * 1_000_003 + stream], dtype=np.uint64))[0])
    z = mix64_torch(mix64_torch(rows.long() ^ base) + cols.long())
    return _shift_right(z, 11).double() / float(1 << 53)  # the top 53 bits, as ``unit_interval``


def select_top(primary: torch.Tensor, key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [G, k'] of the k largest entries of each row of ``primary`` [G, n], ties by larger ``key``.

    Returned in (primary, key) descending order; k' = min(k, n). Entries equal to -inf are never
    preferred over finite ones (callers mark excluded entries with -inf and drop them afterwards).
    """
    kk = min(k, primary.shape[1])
    if kk == 0:
        return torch.empty(primary.shape[0], 0, dtype=torch.int64, device=primary.device)
    threshold = primary.topk(kk, dim=1).values[:, -1:]
    rank = torch.where(primary > threshold, 2.0, torch.where(primary == threshold, key, -1.0))
    index = rank.topk(kk, dim=1).indices
    by_key = torch.argsort(-key.gather(1, index), dim=1, stable=True)
    by_score = torch.argsort(-primary.gather(1, index.gather(1, by_key)), dim=1, stable=True)
    return index.gather(1, by_key.gather(1, by_score))


@dataclass
class TopK:
    """Per group, the k best entries so far by (score, key): their scores, keys, store rows, extras."""

    score: torch.Tensor  # [G, k] float64, -inf where empty
    key: torch.Tensor  # [G, k] float64
    row: torch.Tensor  # [G, k] int64, -1 where empty
    extra: torch.Tensor | None = None  # [G, k, E] int64 payload carried with each entry

    @classmethod
    def empty(cls, groups: int, k: int, extra: int = 0, device: torch.device | None = None) -> TopK:
        return cls(
            torch.full((groups, k), -torch.inf, dtype=torch.float64, device=device),
            torch.zeros(groups, k, dtype=torch.float64, device=device),
            torch.full((groups, k), -1, dtype=torch.int64, device=device),
            torch.full((groups, k, extra), -1, dtype=torch.int64, device=device) if extra else None,
        )

    def cpu(self) -> TopK:
        """This heap in host memory."""
        extra = None if self.extra is None else self.extra.cpu()
        return TopK(self.score.cpu(), self.key.cpu(), self.row.cpu(), extra)

    @property
    def k(self) -> int:
        return self.score.shape[1]

    def offer(
        self, score: torch.Tensor, key: torch.Tensor, row: torch.Tensor, extra: torch.Tensor | None = None
    ) -> TopK:
        """Keep the best k of the current entries and candidates ``[G, n]`` (score -inf = not a candidate)."""
        score = torch.cat([self.score, score.to(torch.float64)], 1)
        key = torch.cat([self.key, key], 1)
        row = torch.cat([self.row, row.expand(score.shape[0], -1) if row.dim() == 2 else row], 1)
        index = select_top(score, key, self.k)
        merged = TopK(score.gather(1, index), key.gather(1, index), row.gather(1, index))
        merged.row[merged.score == -torch.inf] = -1
        if self.extra is not None and extra is not None:
            both = torch.cat([self.extra, extra], 1)
            merged.extra = both.gather(1, index[..., None].expand(-1, -1, both.shape[2]))
        return merged

    def merge(self, other: TopK) -> TopK:
        return self.offer(other.score, other.key, other.row, other.extra)

    def entries(self, group: int) -> list[tuple[int, float]]:
        """(row, score) of one group's kept entries, best first."""
        keep = self.row[group] >= 0
        return list(zip(self.row[group][keep].tolist(), self.score[group][keep].tolist()))
