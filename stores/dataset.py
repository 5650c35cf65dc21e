"""One layer of a store as a torch ``IterableDataset`` of batches, for a ``DataLoader``.

An iteration is one epoch of ``StoreSampler.iter_epoch``: its units are split into disjoint shares,
one per (torch.distributed rank, DataLoader worker), so every eligible row is read once per epoch by
exactly one worker of one rank. The order is fixed by (seed, epoch, ranks × workers); call
``set_epoch`` before each epoch, as with ``DistributedSampler``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from bae.stores.activation_store import ActivationStore
from bae.stores.sampler import StoreSampler


class StoreDataset(IterableDataset[torch.Tensor]):
    """Float32 batches ``[≤ batch_size, d]`` of one layer, for ``DataLoader(ds, batch_size=None)``.

    ``rank``/``world_size`` default to torch.distributed's when a process group is initialized. With
    one rank and no workers an epoch is ``StoreSampler(...).iter_epoch(epoch)``: the rows of the
    sampler's epoch in its order. Shares hold whole units, so ranks may get a batch more or fewer
    than each other when units hold different numbers of eligible rows.
    """

    def __init__(
        self,
        store: ActivationStore | str,
        layer: int,
        batch_size: int,
        drop_last: bool = False,
        **options: Any,
    ):
        """``options``: ``StoreSampler``'s keyword arguments (seed, positions, split, buffer_rows, ...)."""
        if dist.is_available() and dist.is_initialized():
            options.setdefault("rank", dist.get_rank())
            options.setdefault("world_size", dist.get_world_size())
        store = ActivationStore.open(store) if isinstance(store, str) else store
        self.sampler = StoreSampler(store, layer, batch_size, **options)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (workers copy the dataset when an iteration starts)."""
        self.epoch = epoch

    def count_rows(self) -> int:
        """Eligible rows in one epoch, over all ranks."""
        return self.sampler.count_rows()

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        worker_id, workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        share = self.sampler.rank * workers + worker_id
        shares = self.sampler.world_size * workers
        return self.sampler.iter_epoch(self.epoch, share, shares, self.drop_last)
