"""Streaming, shuffled, resumable batches of one layer's rows, with filters and a prefetch thread.

The stream for epoch ``e`` is: the store's done units in a permutation seeded by ``(seed, e)``,
taken ``units_per_window`` at a time; each window's eligible rows are shuffled with a generator
seeded by ``(seed, e, window)``; batches are cut from the concatenation of windows and epochs, so
every eligible row appears exactly once per epoch. The cursor (epoch, window, offset, batch
index) names the first row of the next batch, which is all it takes to resume the identical
sequence.

Memory is sized by the store: a window holds at most ``buffer_rows`` rows and never more units than
the store (or a rank's share of it) has; the float32 windows read ahead are at most ``prefetch`` and
at most ``READ_AHEAD_BYTES`` (always at least one), so ``1 + ahead`` float32 windows are resident,
plus one window of raw chunks in the storage dtype that every window is read into and a
``DECODE_ROWS`` slice being cast. Neither bound changes which rows come in which order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bae.common.errors import BaeError
from bae.common.hashing import splitmix64, unit_interval
from bae.common.selection import RowSelection
from bae.stores.activation_store import ActivationStore
from bae.stores.layout import any_nonfinite, decode_tensor

READ_AHEAD_BYTES = 64 << 20  # float32 windows read ahead: at most this many bytes, or one window
DECODE_ROWS = 4096  # rows gathered and cast to float32 at a time when a window is loaded


def split_mask(doc_ids: np.ndarray, split: str, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Rows whose document falls in ``split`` ("train" or "val"), decided by a hash of the doc id."""
    if split not in ("train", "val"):
        raise BaeError(f"split {split!r}: expected 'train' or 'val'")
    if not 0.0 <= val_fraction <= 1.0:
        raise BaeError(f"val_fraction {val_fraction}: expected a number in [0, 1]")
    with np.errstate(over="ignore"):
        keyed = np.asarray(doc_ids).astype(np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64))
    u = unit_interval(splitmix64(keyed))
    return u < val_fraction if split == "val" else u >= val_fraction


@dataclass(frozen=True)
class RowFilter:
    """Which rows count: valid only, a set of positions, one split of the documents."""

    valid_only: bool = True
    positions: frozenset[int] | None = None
    split: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0

    @classmethod
    def of(cls, selection: RowSelection, split: str | None = None) -> RowFilter:
        """The filter of a stage's row selection, on one side of its split (None: both)."""
        positions = selection.position_list
        return cls(
            selection.valid_only,
            None if positions is None else frozenset(positions),
            split,
            selection.val_fraction,
            selection.split_seed,
        )

    def mask(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        keep = rows["valid"].astype(bool) if self.valid_only else np.ones(len(rows["valid"]), bool)
        if self.positions is not None:
            keep &= np.isin(rows["positions"], np.fromiter(self.positions, dtype=np.int64))
        if self.split is not None:
            keep &= split_mask(rows["doc_ids"], self.split, self.val_fraction, self.split_seed)
        return keep


def unit_row_arrays(
    store: ActivationStore, row_filter: RowFilter, unit: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(mask of one unit's rows that pass the filter, their row arrays plus ``row``, the store index)."""
    rows = store.read_unit_rows(unit)
    keep = row_filter.mask(rows)
    kept = {k: v[keep] for k, v in rows.items()}
    kept["row"] = store.unit_range(unit)[0] + np.flatnonzero(keep)
    return keep, kept


def read_unit(
    store: ActivationStore, layer: int, row_filter: RowFilter, unit: int
) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """One unit's rows that pass the filter, still in the storage dtype, and their row arrays."""
    keep, rows = unit_row_arrays(store, row_filter, unit)
    if not keep.any():
        return None
    raw = store.read_unit_layer(layer, unit)
    return (raw if keep.all() else raw[keep]), rows


def check_finite(store: ActivationStore, layer: int, x: torch.Tensor, row_index: np.ndarray) -> None:
    """Stop with the store row of the first NaN/inf in ``x`` (rows ``row_index`` of the store)."""
    if any_nonfinite(x):
        bad = int(row_index[int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])])
        unit = bad // store.unit_rows
        start, stop = store.unit_range(unit)
        raise BaeError(
            f"store {store.url} layer {layer}: NaN/inf in unit {unit} (rows {start}..{stop}, "
            f"first at row {bad}); run `bae store verify {store.url}`"
        )


def iter_unit_rows(
    store: ActivationStore, layer: int, row_filter: RowFilter, units: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
    """In store order: (unit, float32 rows that pass the filter, their row arrays), done units only.

    The row arrays include ``row``, each kept row's index in the store.
    """
    for unit in np.flatnonzero(store.done_mask()) if units is None else units:
        got = read_unit(store, layer, row_filter, int(unit))
        if got is not None:
            x = decode_tensor(got[0], store.layout.dtype)
            check_finite(store, layer, x, got[1]["row"])
            yield int(unit), x.numpy(), got[1]


class StoreSampler:
    """Infinite, seeded, resumable stream of float32 batches ``[batch_size, d]`` from one layer of
    ``units`` (default: every complete unit)."""

    def __init__(
        self,
        store: ActivationStore,
        layer: int,
        batch_size: int,
        seed: int = 0,
        buffer_rows: int = 1 << 16,
        valid_only: bool = True,
        positions: Iterable[int] | None = None,
        split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        units: Iterable[int] | None = None,
    ):
        store._layer_array(layer)  # a clear error if the layer is absent
        if batch_size < 1:
            raise BaeError(f"batch_size {batch_size}: expected >= 1")
        if not 0 <= rank < world_size:
            raise BaeError(f"rank {rank} out of range for world size {world_size}")
        self.store, self.layer, self.batch_size, self.seed = store, layer, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.filter = RowFilter(
            valid_only,
            None if positions is None else frozenset(int(p) for p in positions),
            split,
            val_fraction,
            split_seed,
        )
        self.units = np.flatnonzero(store.done_mask()) if units is None else np.asarray(list(units))
        if len(self.units) == 0:
            raise BaeError(f"store {store.url} has no completed units to read")
        # a window never holds more units than the store has: the same windows, sized by the store
        self.units_per_window = max(1, min(buffer_rows // store.unit_rows, len(self.units)))
        self.n_windows = -(-len(self.units) // self.units_per_window)
        window_bytes = self.units_per_window * store.unit_rows * store.d_model * 4
        self.prefetch = max(1, min(prefetch, READ_AHEAD_BYTES // window_bytes))
        self._cursor = {"epoch": 0, "window": 0, "offset": 0, "batch": 0}
        self._n_rows: int | None = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The cursor: where the next batch starts. JSON-serializable."""
        return {**self._cursor, "seed": self.seed, "n_units": len(self.units)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("n_units") != len(self.units):
            raise BaeError(
                "sampler state does not match this store/seed "
                f"(state seed {state.get('seed')}, units {state.get('n_units')}; "
                f"now seed {self.seed}, units {len(self.units)})"
            )
        self._cursor = {k: int(state[k]) for k in ("epoch", "window", "offset", "batch")}

    @property
    def epoch(self) -> int:
        return self._cursor["epoch"]

    def count_rows(self) -> int:
        """Eligible rows (after filters) in one epoch."""
        if self._n_rows is None:
            total = 0
            for unit in self.units:
                total += int(self.filter.mask(self.store.read_unit_rows(int(unit))).sum())
            self._n_rows = total
        return self._n_rows

    # ------------------------------------------------------------------ stream

    def share_units(self, epoch: int, share: int = 0, shares: int = 1) -> np.ndarray:
        """Epoch ``epoch``'s unit permutation, every ``shares``-th unit from ``share`` on: ``shares``
        disjoint shares that together hold every unit once (one share: the whole permutation)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.units)[share::shares]

    def _window_units(self, epoch: int, window: int, share: int = 0, shares: int = 1) -> np.ndarray:
        units = self.share_units(epoch, share, shares)
        return np.sort(units[window * self.units_per_window : (window + 1) * self.units_per_window])

    def _window_buffer(self, shares: int = 1) -> np.ndarray:
        """Room for one window of raw chunks of one of ``shares`` shares of the units:
        [units_per_window (at most the share's units), unit_rows, d], storage dtype."""
        slots = min(self.units_per_window, -(-len(self.units) // shares))
        shape = (slots, self.store.unit_rows, self.store.d_model)
        return np.empty(shape, dtype=self.store.layout.physical_dtype)

    def _load_window(
        self, epoch: int, window: int, buffer: np.ndarray, share: int = 0, shares: int = 1
    ) -> torch.Tensor:
        """A window's eligible rows, shuffled, as float32.

        Each unit is read straight into its slot of ``buffer`` ([units_per_window, unit_rows, d],
        storage dtype); a gather then applies the filter and the shuffle and the cast follows,
        ``DECODE_ROWS`` rows at a time into the float32 window (no raw copy of the whole window).
        """
        unit_rows = self.store.unit_rows
        slots, row_index = [], []
        for i, unit in enumerate(self._window_units(epoch, window, share, shares)):
            keep = np.flatnonzero(self.filter.mask(self.store.read_unit_rows(int(unit))))
            if len(keep):
                self.store.read_unit_layer(self.layer, int(unit), buffer[i])
                slots.append(i * unit_rows + keep)
                row_index.append(self.store.unit_range(int(unit))[0] + keep)
        if not slots:
            return torch.empty(0, self.store.d_model)
        gather = np.concatenate(slots)
        order = np.random.default_rng([self.seed, epoch, window]).permutation(len(gather))
        flat = torch.from_numpy(buffer.reshape(-1, self.store.d_model))
        index = torch.from_numpy(gather[order])
        x = torch.empty(len(index), self.store.d_model)
        for a in range(0, len(index), DECODE_ROWS):
            raw = flat.index_select(0, index[a : a + DECODE_ROWS]).numpy()
            x[a : a + DECODE_ROWS] = decode_tensor(raw, self.store.layout.dtype)
        check_finite(self.store, self.layer, x, np.concatenate(row_index)[order])
        return x

    def _epoch_windows(
        self, epoch: int, stop: threading.Event, first: int = 0, share: int = 0, shares: int = 1
    ) -> Iterator[torch.Tensor]:
        """One epoch's windows of one share, from window ``first`` on, until ``stop`` is set."""
        n_windows = -(-len(self.units[share::shares]) // self.units_per_window)  # no permutation needed
        buffer = self._window_buffer(shares)  # reused by every window
        for window in range(first, n_windows):
            if stop.is_set():
                return
            yield self._load_window(epoch, window, buffer, share, shares)

    def _windows(
        self, epoch: int, first: int, stop: threading.Event
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(epoch, window, rows) from window ``first`` of ``epoch`` on, across epochs."""
        while not stop.is_set():
            rows_this_epoch = 0
            for window, x in enumerate(self._epoch_windows(epoch, stop, first), start=first):
                rows_this_epoch += len(x)
                yield epoch, window, x
            if rows_this_epoch == 0:
                raise BaeError(f"store {self.store.url} layer {self.layer}: no rows pass the filters")
            epoch, first = epoch + 1, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches from the cursor on, forever; this rank's share when world_size > 1."""
        stop = threading.Event()
        windows = _Prefetcher(
            self._windows(self._cursor["epoch"], self._cursor["window"], stop), self.prefetch, stop
        )
        pending: list[torch.Tensor] = []
        have = 0
        skip = self._cursor["offset"]
        try:
            for epoch, window, x in windows:
                offset = skip
                skip = 0
                while offset < len(x):
                    take = min(self.batch_size - have, len(x) - offset)
                    pending.append(x[offset : offset + take])
                    have += take
                    offset += take
                    if have == self.batch_size:
                        batch_index = self._cursor["batch"]
                        nxt = (epoch, window, offset) if offset < len(x) else (epoch, window + 1, 0)
                        if nxt[1] >= self.n_windows:
                            nxt = (epoch + 1, 0, 0)
                        self._cursor = {
                            "epoch": nxt[0],
                            "window": nxt[1],
                            "offset": nxt[2],
                            "batch": batch_index + 1,
                        }
                        batch = pending[0] if len(pending) == 1 else torch.cat(pending)
                        pending, have = [], 0
                        if batch_index % self.world_size == self.rank:
                            yield batch
        finally:
            stop.set()
            windows.close()

    def iter_epoch(
        self, epoch: int, share: int = 0, shares: int = 1, drop_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """Epoch ``epoch`` alone, as float32 batches, from one of ``shares`` disjoint shares of its
        units (``share_units``); the last batch is short unless ``drop_last``. The cursor is untouched.

        Every eligible row of the share comes once; with one share these are the rows of the
        sampler's own epoch in the same order, cut into the same batches when the epoch starts on a
        batch boundary (epoch 0 always; every epoch when its rows are a multiple of batch_size)."""
        stop = threading.Event()
        windows = _Prefetcher(self._epoch_windows(epoch, stop, 0, share, shares), self.prefetch, stop)
        try:
            yield from rebatch(windows, self.batch_size, drop_last)
        finally:
            stop.set()
            windows.close()

    def iter_epoch_once(self) -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
        """One pass over the eligible rows in store order, unit by unit: (x, row arrays)."""
        for _, x, rows in iter_unit_rows(self.store, self.layer, self.filter, self.units):
            yield torch.from_numpy(x), rows


def rebatch(chunks: Iterable[torch.Tensor], batch_size: int, drop_last: bool) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``batch_size`` rows cut across ``chunks``; a short last one unless
    ``drop_last``."""
    pending: list[torch.Tensor] = []
    have = 0
    for x in chunks:
        offset = 0
        while offset < len(x):
            take = min(batch_size - have, len(x) - offset)
            pending.append(x[offset : offset + take])
            have, offset = have + take, offset + take
            if have == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, have = [], 0
    if pending and not drop_last:
        yield torch.cat(pending)


class _Prefetcher:
    """Runs a generator in a background thread, ``depth`` items ahead; re-raises its errors.

    At most ``depth`` items exist besides the one the consumer took last: the thread starts an item
    only when fewer than ``depth`` are made and not yet taken (queued, or being made)."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int, stop: threading.Event):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._room = threading.Semaphore(depth)  # items that may be made before the consumer takes one
        self._stop = stop
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            while self._wait_for_room():
                item = next(source, self._END)
                if not self._put(item) or item is self._END:
                    return
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def _wait_for_room(self) -> bool:
        """Block until another item may be made; False if the consumer stopped first."""
        while not self._stop.is_set():
            if self._room.acquire(timeout=0.1):
                return True
        return False

    def _put(self, item: Any) -> bool:
        """Queue ``item`` once there is room; False if the consumer stopped first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            self._room.release()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
