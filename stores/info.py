"""The one-screen description of a store that ``bae store info`` prints."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from bae.common.console import human_bytes, human_count
from bae.stores.activation_store import ActivationStore
from bae.stores.sites import site_lines
from bae.stores.verify import bytes_on_disk


def store_summary(store: ActivationStore) -> dict[str, Any]:
    """Config summary, model, layers, dtype, rows (valid/total), units, bytes on disk and per token."""
    meta = store.meta
    done = store.done_mask()
    valid_rows = int(store.dask_rows("valid").astype(np.int64).sum().compute()) if done.any() else 0
    rows_done = sum(
        np.subtract(*cast(tuple[int, int], store.unit_range(int(u))[::-1])) for u in np.flatnonzero(done)
    )
    on_disk = bytes_on_disk(store.url)
    model = meta.get("model") or {}
    version = model.get("revision") or (f"weights {model['weights'][:12]}" if model.get("weights") else None)
    dtype = meta["dtype"]
    return {
        "store": store.url,
        "model": (f"{model['id']} @ {version}" if version else model.get("id")) if model else "(imported)",
        **({"source": describe_source(meta["source"])} if isinstance(meta.get("source"), dict) else {}),
        "layers": ", ".join(map(str, store.layers)),
        **({"hook sites": site_lines(meta["sites"])} if meta.get("sites") else {}),
        "d_model": store.d_model,
        "dtype": f"{dtype['logical']} (stored as {dtype['physical']})",
        "compressor": store.layout.compressor or "none",
        "mode": f"{meta.get('packing_mode')}, context {meta.get('context_length')}",
        "documents": meta.get("n_docs"),
        "rows": f"{human_count(valid_rows)} valid / {human_count(rows_done)} written / "
        f"{human_count(store.n_rows)} planned",
        "units": f"{int(done.sum())} done / {store.n_units} planned ({store.unit_rows} rows each)",
        "clamped values": int(store.clamped_counts().sum()),
        "bytes on disk": human_bytes(on_disk),
        "bytes per token": f"{on_disk / max(rows_done, 1):.0f} "
        f"(layout: {store.layout.bytes_per_row} uncompressed)",
        "config": ", ".join(f"{k}={v}" for k, v in (meta.get("config") or {}).items() if v is not None),
    }


def describe_source(source: dict[str, Any]) -> str:
    """Where an imported store's rows came from: format, path, shape, dtype, tensor and hook."""
    named = [f"{key} {source[key]}" for key in ("tensor", "hook", "token_ids") if source.get(key)]
    shape = "x".join(map(str, source.get("shape") or []))
    head = f"{source.get('format', 'array')} {source.get('path')} [{shape}] {source.get('dtype')}"
    return ", ".join([head, *named])
