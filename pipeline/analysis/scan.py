"""What every ``bae features`` pass shares: the store rows and checkpoint it reads, feature codes and
scores, seeded tie-breaking keys, bounded top-k selection, and a dask map-reduce over store units.

A pass is ``unit -> partial result`` (run by dask on local threads or a distributed cluster, with the
store and model opened once per worker) folded with an associative ``merge``; partial results are
small (per-feature arrays), so memory is bounded by one unit's batch of ``batch_rows`` rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import dask
import dask.bag as db
import numpy as np
import torch
from dask.callbacks import Callback

from bae.common.console import progress
from bae.common.errors import BaeError
from bae.pipeline.analysis.checkpoint_match import load_for_store
from bae.pipeline.features.config import FeaturesConfig
from bae.stores import ActivationStore, RowFilter, iter_unit_rows
from bae.trainer import Autoencoder, load_autoencoder

T = TypeVar("T")
_MASK53 = (1 << 53) - 1


@functools.lru_cache(maxsize=8)
def cached_store(url: str) -> ActivationStore:
    """A store opened once per process (dask workers reuse it across units)."""
    return ActivationStore.open(url)


@functools.lru_cache(maxsize=4)
def cached_model(path: str) -> Autoencoder:
    """An autoencoder loaded once per process, on CPU, in eval mode."""
    return load_autoencoder(path)


@dataclass(frozen=True)
class ScanSpec:
    """Which rows of which store a pass reads, and the checkpoint that encodes them (picklable)."""

    store: str
    checkpoint: str
    layer: int
    row_filter: RowFilter
    units: tuple[int, ...]
    batch_rows: int

    def open(self) -> tuple[ActivationStore, Autoencoder]:
        return cached_store(self.store), cached_model(self.checkpoint)

    def batches(self, unit: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Float32 rows of one unit passing the filter, ``batch_rows`` at a time, with their row indices."""
        store, _ = self.open()
        for _, x, rows in iter_unit_rows(store, self.layer, self.row_filter, [unit]):
            for a in range(0, len(x), self.batch_rows):
                yield torch.from_numpy(x[a : a + self.batch_rows]), rows["row"][a : a + self.batch_rows]


def scan_spec(config: FeaturesConfig, checkpoint: str | None = None) -> ScanSpec:
    """Open the store and checkpoint named by ``config`` and check that they belong together."""
    url = config.need("store")
    checkpoint = checkpoint or config.need("checkpoint")
    store = ActivationStore.open(url)
    _, layer = load_for_store(store, checkpoint, config.layer)
    units = [int(u) for u in np.flatnonzero(store.done_mask())]
    if not units:
        raise BaeError(f"store {url} has no completed units")
    if config.max_rows is not None:
        units = [u for u in units if store.unit_range(u)[0] < config.max_rows] or units[:1]
    row_filter = RowFilter(config.valid_only, None, config.split, config.val_fraction, config.split_seed)
    return ScanSpec(url, checkpoint, int(layer), row_filter, tuple(units), config.batch_rows)


@torch.no_grad()
def encode(model: Autoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw states -> (bits bool [n, F], code float [n, F], decoder input).

    ``code`` is what a feature's score is made of: a BAE's 0/1 bits (every bit is a feature, also with
    k bits per decoder input) or an SAE's activations.
    """
    bits, decoder_input = model.codes(model.encoder(model.normalize(model.as_input(x))))
    code = bits if model.architecture == "bae" else decoder_input
    return bits > 0, code.float(), decoder_input


@torch.no_grad()
def reconstruct(model: Autoencoder, decoder_input: torch.Tensor) -> torch.Tensor:
    """Raw-space reconstruction from the decoder input ``encode`` returns."""
    return model.denormalize(model.decoder(decoder_input))


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 (wrapping arithmetic; logical shifts by masking)."""

    def shr(v: torch.Tensor, s: int) -> torch.Tensor:
        return (v >> s) & ((1 << (64 - s)) - 1)

    z = (z ^ shr(z, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    z = (z ^ shr(z, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ shr(z, 31)


def random_keys(rows: torch.Tensor, cols: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """A uniform [0, 1) float64 per (row, col) pair, fixed by (seed, stream) and independent of batching.

    ``rows`` and ``cols`` broadcast against each other (e.g. ``rows[:, None]`` and ``cols[None, :]``).
    """
    base = int(_mix64(torch.tensor([seed * 1_000_003 + stream], dtype=torch.int64))[0])
    z = _mix64(_mix64(rows.to(torch.int64) ^ base) + cols.to(torch.int64))
    return ((z >> 11) & _MASK53).to(torch.float64) / float(1 << 53)


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


class _TaskProgress(Callback):
    """A tqdm bar over the dask tasks of a local computation (one or more per unit)."""

    def __init__(self, desc: str, enabled: bool):
        super().__init__()
        self.bar = progress(None, desc, unit="task", disable=not enabled)

    def _start_state(self, dsk: Any, state: Any) -> None:
        self.bar.reset(total=len(state["ready"]) + len(state["waiting"]) + len(state["running"]))

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
        self.bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        self.bar.close()


def map_reduce_units(
    units: tuple[int, ...],
    partial: Callable[[int], T],
    merge: Callable[[T, T], T],
    scheduler: str | None,
    desc: str,
    show_progress: bool = True,
) -> T:
    """``merge`` of ``partial(unit)`` over all units: dask threads locally, or the cluster at ``scheduler``.

    ``partial`` must be picklable for a cluster (a module-level function or a ``functools.partial``).
    """
    bag = db.from_sequence(list(units), npartitions=len(units)).map(partial)
    folded = bag.reduction(
        lambda parts: functools.reduce(merge, parts),
        lambda parts: functools.reduce(merge, parts),
        split_every=4,
    )
    if scheduler:
        from distributed import Client

        with Client(scheduler) as client:
            return client.compute(folded).result()
    with _TaskProgress(desc, show_progress), dask.config.set(scheduler="threads"):
        return folded.compute()
