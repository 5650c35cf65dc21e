"""The Zarr activation store: format, writer, reader, sampler, verification, import."""

from bae.stores.activation_store import ActivationStore
from bae.stores.layout import SCHEMA_VERSION, StoreLayout
from bae.stores.sampler import RowFilter, StoreSampler, iter_unit_rows, split_mask

__all__ = [
    "SCHEMA_VERSION",
    "ActivationStore",
    "RowFilter",
    "StoreLayout",
    "StoreSampler",
    "iter_unit_rows",
    "split_mask",
]
