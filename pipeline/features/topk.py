"""Bounded top-k selection with seeded tie-breaking: the core of the top-contexts pass.

Ties between equal scores are broken by a key drawn per (row, column) from a fixed hash, so the
selection does not depend on batching, unit order or which worker saw a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bae.common.hashing import mix64, unit_interval


def random_keys(rows: torch.Tensor, cols: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """A uniform [0, 1) float64 per (row, col) pair, fixed by (seed, stream) and independent of batching.

    ``rows`` and ``cols`` broadcast against each other (e.g. ``rows[:, None]`` and ``cols[None, :]``).
    """
    base = mix64(np.array([seed * 1_000_003 + stream], dtype=np.uint64))
    with np.errstate(over="ignore"):
        z = mix64(mix64(rows.numpy().astype(np.uint64) ^ base) + cols.numpy().astype(np.uint64))
    return torch.from_numpy(unit_interval(z))


def select_top(primary: torch.Tensor, key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [G, k'] of the k largest entries of each row of ``primary`` [G, n], ties by larger ``key``.

    Returned in (primary, key) descending order; k' = min(k, n). Entries equal to -inf are never
    preferred over finite ones (callers mark excluded entries with -inf and drop them afterwards).
    """
    kk = min(k, primary.shape[1])
    if kk == 0:
        return torch.empty(primary.shape[0], 0, dtype=torch.int64)
    threshold = primary.topk(kk, dim=1).values[:, -1:]
    rank = torch.where(primary > threshold, 2.0, torch.where(primary == threshold, key, -1.0))
    index = rank.topk(kk, dim=1).indices
    p, q = primary.gather(1, index), key.gather(1, index)
    order = np.lexsort((-q.numpy(), -p.numpy()), axis=-1)
    return index.gather(1, torch.from_numpy(order))


@dataclass
class TopK:
    """Per group, the k best entries so far by (score, key): their scores, keys, store rows, extras."""

    score: torch.Tensor  # [G, k] float64, -inf where empty
    key: torch.Tensor  # [G, k] float64
    row: torch.Tensor  # [G, k] int64, -1 where empty
    extra: torch.Tensor | None = None  # [G, k, E] int64 payload carried with each entry

    @classmethod
    def empty(cls, groups: int, k: int, extra: int = 0) -> TopK:
        return cls(
            torch.full((groups, k), -torch.inf, dtype=torch.float64),
            torch.zeros(groups, k, dtype=torch.float64),
            torch.full((groups, k), -1, dtype=torch.int64),
            torch.full((groups, k, extra), -1, dtype=torch.int64) if extra else None,
        )

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
