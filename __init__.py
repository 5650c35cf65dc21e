"""bae: cache LLM hidden states, train Binary Autoencoders on them, measure feature-set entropy.

The Python API (docs/api.md)::

    from bae import ActivationStore, StoreDataset, load_checkpoint, set_entropy

Names load on first use, so ``import bae`` stays cheap (no torch, zarr or dask until needed).
"""

from __future__ import annotations

import importlib
import os

# libgomp's default (ACTIVE) keeps torch's OpenMP threads spinning after each parallel region, taking
# the cores from the popcount kernels a training step runs right after torch's products (measured at
# 2 threads: the covariance backward 22.6 -> 14.4 ms, bae train 2202 -> 2912 rows/s). Read when torch
# loads, so it takes effect when bae is imported first (the command line); a user's choice is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # the real names for type checkers
    from bae.pipeline.entropy.in_memory import SetEntropy, set_entropy
    from bae.stores.activation_store import ActivationStore
    from bae.stores.dataset import StoreDataset
    from bae.stores.sampler import StoreSampler
    from bae.trainer.models import Autoencoder
    from bae.trainer.models import load_autoencoder as load_checkpoint

__version__ = "0.1.0"

_LAZY = {  # public name -> (module, attribute)
    "ActivationStore": ("bae.stores.activation_store", "ActivationStore"),
    "StoreSampler": ("bae.stores.sampler", "StoreSampler"),
    "StoreDataset": ("bae.stores.dataset", "StoreDataset"),
    "Autoencoder": ("bae.trainer.models", "Autoencoder"),
    "load_checkpoint": ("bae.trainer.models", "load_autoencoder"),
    "set_entropy": ("bae.pipeline.entropy.in_memory", "set_entropy"),
    "SetEntropy": ("bae.pipeline.entropy.in_memory", "SetEntropy"),
}
__all__ = [
    "ActivationStore",
    "Autoencoder",
    "SetEntropy",
    "StoreDataset",
    "StoreSampler",
    "load_checkpoint",
    "set_entropy",
]


def __getattr__(name: str) -> object:
    """Import a public name's module the first time the name is used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'bae' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
