"""Make a store from activations made elsewhere: a .npy, a .safetensors tensor or a Zarr array."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from pydantic import Field

from bae.common.command import cli
from bae.common.configs import StrictModel
from bae.common.console import print_summary, progress
from bae.common.errors import BaeError
from bae.stores.activation_store import ActivationStore
from bae.stores.layout import LogicalDtype, StoreLayout


class StoreRef(StrictModel):
    """``bae store info/verify``: which store."""

    store: str = Field(
        description="store path or fsspec URL (s3://, gs://, memory://)", json_schema_extra=cli(argument=True)
    )


class ImportConfig(StrictModel):
    """``bae store import``: where the activations come from and how they are stored."""

    src: str = Field(
        description="a .npy file, a .safetensors file, or a Zarr array of shape [N, d]",
        json_schema_extra=cli(argument=True),
    )
    out: str = Field(description="store to create (path or fsspec URL)", json_schema_extra=cli("-o"))
    layer: int = Field(default=0, ge=0, description="layer index recorded for these activations")
    tensor: str | None = Field(default=None, description="tensor name inside a .safetensors file")
    dtype: LogicalDtype = Field(default="float16", description="storage dtype")
    unit_rows: int = Field(default=4096, ge=1, description="rows per unit (chunk)")
    overflow: Literal["error", "clamp"] = Field(
        default="error", description="values beyond the storage range"
    )
    compressor: dict[str, Any] | None = Field(
        default=None, description="numcodecs compressor, e.g. {name: zstd}"
    )


class _Source:
    """Row-range access to a 2-D source array, whatever its container."""

    def __init__(self, cfg: ImportConfig):
        path = cfg.src
        if not os.path.exists(path):
            raise BaeError(f"import source {path}: not found")
        self._st = None
        if path.endswith(".npy"):
            try:
                self.array: Any = np.load(path, mmap_mode="r")
            except ValueError as exc:
                raise BaeError(f"import source {path}: not a readable .npy file ({exc})") from exc
            self.shape, self.dtype = self.array.shape, str(self.array.dtype)
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            self._st = safe_open(path, framework="pt")
            names = list(self._st.keys())
            name = cfg.tensor or (names[0] if len(names) == 1 else None)
            if name is None or name not in names:
                raise BaeError(
                    f"import source {path}: name the tensor with --tensor; it holds {', '.join(names)}"
                )
            self.array = self._st.get_slice(name)
            self.shape, self.dtype = tuple(self.array.get_shape()), str(self.array.get_dtype())
        elif Path(path, "zarr.json").is_file() or Path(path, ".zarray").is_file():
            try:
                self.array = zarr.open_array(path, mode="r")
            except Exception as exc:
                raise BaeError(f"import source {path}: not a Zarr array ({exc})") from exc
            self.shape, self.dtype = self.array.shape, str(self.array.dtype)
        else:
            raise BaeError(f"import source {path}: expected a .npy, a .safetensors file or a Zarr array")
        if len(self.shape) != 2 or self.shape[0] == 0 or self.shape[1] == 0:
            raise BaeError(f"import source {path}: array shape {tuple(self.shape)}, expected [N, d]")
        if not any(k in self.dtype.lower() for k in ("float", "half", "bf16", "f16", "f32", "f64")):
            raise BaeError(f"import source {path}: dtype {self.dtype}, expected a floating-point array")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        block = self.array[start:stop]
        return block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block))


def import_activations(cfg: ImportConfig, show_progress: bool = True) -> ActivationStore:
    """Copy ``cfg.src`` into a store unit by unit; resumable like every writer."""
    src = _Source(cfg)
    n, d = (int(x) for x in src.shape)
    layout = StoreLayout(
        n_rows=n,
        unit_rows=cfg.unit_rows,
        d_model=d,
        layers=[cfg.layer],
        dtype=cfg.dtype,
        overflow=cfg.overflow,
        compressor=cfg.compressor,
    )
    attrs = {
        "config": cfg.model_dump(mode="json", exclude={"out"}),  # where it lives is not part of it
        "model": None,
        "tokenizer_fingerprint": None,
        "corpus_fingerprint": None,
        "source": {"path": os.path.abspath(cfg.src), "shape": [n, d], "dtype": src.dtype},
        "context_length": None,
        "packing_mode": "import",
        "n_docs": n,
    }
    store = ActivationStore.create(cfg.out, layout, attrs)
    todo = np.flatnonzero(~store.done_mask())
    clamped = 0
    pending_rows = sum(stop - start for start, stop in map(store.unit_range, map(int, todo)))
    with progress(n, "import", unit="row", initial=n - pending_rows, disable=not show_progress) as bar:
        for unit in todo:
            start, stop = store.unit_range(int(unit))
            rows = np.arange(start, stop)
            clamped += store.write_unit(
                int(unit),
                {cfg.layer: src.rows(start, stop)},
                token_ids=np.full(len(rows), -1, np.int32),
                doc_ids=rows,
                positions=np.zeros(len(rows), np.int32),
                valid=np.ones(len(rows), bool),
            )
            bar.update(stop - start)
    if show_progress:
        print_summary(
            f"imported {cfg.src} -> {cfg.out}",
            {
                "rows": n,
                "d": d,
                "layer": cfg.layer,
                "dtype": f"{cfg.dtype} (source {src.dtype})",
                "units written": f"{len(todo)} of {store.n_units}",
                "clamped values": clamped,
            },
        )
    return store
