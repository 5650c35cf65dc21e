"""The scan every analysis pass over a store shares (``bae entropy``, ``bae features``): the rows
and checkpoint it reads, and a dask map-reduce over store units.

A pass is ``unit -> partial result`` (run by dask on local threads or a distributed cluster, with the
store and model opened once per worker) folded with an associative ``merge``; partial results are
small (per-group or per-feature arrays), so memory is bounded by one batch of ``batch_rows`` rows.

The model computes on the device a pass names (``--device``, resolved where the pass runs: a dask
worker started with one GPU resolves ``auto`` to its own); rows go there one batch at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import dask.bag as db
import dask.threaded
import numpy as np
import torch
from dask.callbacks import Callback

from bae.common.console import progress
from bae.common.devices import resolve_device, to_device
from bae.common.errors import BaeError
from bae.stores import ActivationStore, RowFilter, iter_unit_rows
from bae.trainer import Autoencoder, load_autoencoder

if TYPE_CHECKING:
    from distributed import Future

T = TypeVar("T")


@functools.lru_cache(maxsize=8)
def cached_store(url: str) -> ActivationStore:
    """A store opened once per process (dask workers reuse it across units); a store a dask worker
    cannot see is named with the worker."""
    try:
        return ActivationStore.open(url)
    except BaeError as exc:
        worker = dask_worker_address()
        if worker is None or "not found" not in str(exc):
            raise
        raise BaeError(
            f"store {url}: not found on dask worker {worker}; workers need the store at the same path "
            "(a shared file system) or a URL they can reach"
        ) from None


def dask_worker_address() -> str | None:
    """The address of the dask worker running this code, or None outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


@functools.lru_cache(maxsize=4)
def _loaded_model(path: str, device: torch.device) -> Autoencoder:
    return load_autoencoder(path, device)


def cached_model(path: str, device: str = "cpu") -> Autoencoder:
    """An autoencoder loaded once per process and device (``--device`` spelling, resolved here), in
    eval mode."""
    return _loaded_model(path, resolve_device(device))


@dataclass(frozen=True)
class ScanSpec:
    """Which rows of which store a pass reads, and the checkpoint that encodes them (picklable)."""

    store: str
    checkpoint: str
    layer: int
    row_filter: RowFilter
    units: tuple[int, ...]
    batch_rows: int
    device: str = "auto"  # how the user spelled it: each process resolves it for itself

    def open(self) -> tuple[ActivationStore, Autoencoder]:
        """The store, and the checkpoint on this process's device."""
        return cached_store(self.store), cached_model(self.checkpoint, self.device)

    def batches(self, unit: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Float32 rows of one unit passing the filter, ``batch_rows`` at a time on the model's device,
        with their row indices (host)."""
        store, model = self.open()
        device = model.encoder.weight.device
        for _, x, rows in iter_unit_rows(store, self.layer, self.row_filter, [unit]):
            for a in range(0, len(x), self.batch_rows):
                part = slice(a, a + self.batch_rows)
                yield to_device(torch.from_numpy(x[part]), device), rows["row"][part]


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
            return cast("Future", client.compute(folded)).result()  # one collection in: one future out
    with _TaskProgress(desc, show_progress):
        # dask's threaded scheduler passed as a function: named "threads", dask imports distributed
        return folded.compute(scheduler=dask.threaded.get)
