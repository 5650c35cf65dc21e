"""Activations made elsewhere, read a slice at a time: .npy, .safetensors, .pt, Zarr, SAELens caches.

Every source is seen as ``[items, seq, d]`` activations (an ``[N, d]`` array is N items of one
position) plus, where it holds them, token ids ``[items, seq]``. Nothing is read whole: .npy and .pt
files are memory-mapped, .safetensors and Zarr arrays are sliced, a SAELens cache (an HF ``datasets``
directory of Arrow files) is memory-mapped by ``datasets`` and read a slice of rows at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from bae.common.errors import BaeError, first_line

TOKEN_COLUMN = "token_ids"  # the column SAELens' CacheActivationsRunner writes token ids to
_FLOAT_KINDS = ("float", "half", "bf16", "f16", "f32", "f64")


def _as_tensor(block: Any) -> torch.Tensor:
    return block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block))


def _as_numpy(block: Any) -> np.ndarray:
    return block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)


def _dtype_name(array: Any) -> str:
    if hasattr(array, "get_dtype"):  # a safetensors slice
        return str(array.get_dtype())
    return str(array.dtype).removeprefix("torch.")


def _shape(array: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in (array.get_shape() if hasattr(array, "get_shape") else array.shape))


class Container:
    """The named arrays of one file or group: a .npy (one array), .safetensors, .pt (a tensor or a
    dict of tensors, loaded with ``weights_only=True``), or a Zarr array or group."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise BaeError(f"import source {path}: not found")
        self.arrays: dict[str, Any]  # "" names the one array of a single-array container
        if path.endswith(".npy"):
            self.kind = "npy"
            try:
                self.arrays = {"": np.load(path, mmap_mode="r")}
            except ValueError as exc:
                raise BaeError(f"import source {path}: not a readable .npy file ({exc})") from exc
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            self.kind = "safetensors"
            try:
                opened = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise BaeError(
                    f"import source {path}: not a readable .safetensors file ({first_line(exc)})"
                ) from None
            self.arrays = {name: opened.get_slice(name) for name in opened.keys()}  # noqa: SIM118
        elif path.endswith(".pt") or path.endswith(".pth"):
            self.kind = "pt"
            self.arrays = _load_pt(path)
        elif any(Path(path, meta).is_file() for meta in ("zarr.json", ".zarray", ".zgroup")):
            self.kind = "zarr"
            try:
                opened = zarr.open(path, mode="r")
            except Exception as exc:  # zarr raises several types for unreadable metadata
                raise BaeError(
                    f"import source {path}: not a readable Zarr array or group ({first_line(exc)})"
                ) from None
            if isinstance(opened, zarr.Array):
                self.arrays = {"": opened}
            else:
                self.arrays = {name: array for name, array in opened.arrays()}
        else:
            raise BaeError(
                f"import source {path}: expected a .npy, .safetensors or .pt file, a Zarr array or group, "
                "or a SAELens activation cache directory"
            )

    def get(self, name: str | None, what: str) -> Any:
        """The array called ``name`` (None: the only one); ``what`` names it in errors."""
        names = list(self.arrays)
        if name is None:
            if len(names) == 1:
                return self.arrays[names[0]]
            if not names:
                raise BaeError(f"{what} {self.path}: holds no arrays")
            raise BaeError(f"{what} {self.path}: name the array to use; it holds {', '.join(names)}")
        if name not in self.arrays:
            holds = "a single unnamed array" if names == [""] else ", ".join(names) or "no arrays"
            raise BaeError(f"{what} {self.path}: no array {name!r}; it holds {holds}")
        return self.arrays[name]


def _load_pt(path: str) -> dict[str, Any]:
    """A .pt file's tensors, memory-mapped where the file allows it; pickled objects are refused."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # a legacy (non-zip) file cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for anything but tensors, others for damage
        raise BaeError(
            f"import source {path}: torch.load(weights_only=True) cannot load it ({first_line(exc)}); "
            "save a tensor or a dict of tensors with torch.save"
        ) from None
    if isinstance(loaded, torch.Tensor):
        return {"": loaded}
    if isinstance(loaded, dict):
        return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    raise BaeError(
        f"import source {path}: holds a {type(loaded).__name__}, expected a tensor or a dict of tensors"
    )


def side_array(spec: str, main: Container | None, what: str) -> Any:
    """A token-id, mask, length or document-id array: a file (``FILE`` or ``FILE:NAME``), else a name
    inside the source's own file or group."""
    if os.path.exists(spec):
        return Container(spec).get(None, what)
    path, _, name = spec.rpartition(":")
    if path and os.path.exists(path):
        return Container(path).get(name, what)
    if main is None:
        raise BaeError(f"{what} {spec!r}: not a file, and the source holds no named arrays")
    if list(main.arrays) == [""]:
        raise BaeError(f"{what} {spec!r}: not a file, and {main.path} holds a single unnamed array")
    return main.get(spec, what)


def read_whole(array: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """All of a small side array (mask, lengths, document ids), checked against ``shape``."""
    if _shape(array) != shape:
        raise BaeError(f"{what}: shape {_shape(array)}, expected {list(shape)} to match the activations")
    return _as_numpy(array[:])


class ArrayItems:
    """Activations ``[items, seq, d]`` (or ``[N, d]``, as N items of one position) in an array."""

    def __init__(self, container: Container, tensor: str | None, tokens: Any | None):
        self.format = container.kind
        self.array = container.get(tensor, "import source")
        self.source_shape = _shape(self.array)
        self.dtype = _dtype_name(self.array)
        where = f"import source {container.path}"
        if len(self.source_shape) not in (2, 3) or 0 in self.source_shape:
            raise BaeError(f"{where}: array shape {self.source_shape}, expected [N, d] or [batch, seq, d]")
        if not any(k in self.dtype.lower() for k in _FLOAT_KINDS):
            raise BaeError(f"{where}: dtype {self.dtype}, expected a floating-point array")
        self.flat = len(self.source_shape) == 2
        self.shape = (self.source_shape[0], 1, self.source_shape[1]) if self.flat else self.source_shape
        self._tokens = tokens
        if tokens is not None and not self.flat and _shape(tokens) != self.shape[:2]:
            raise BaeError(
                f"token ids: shape {_shape(tokens)}, expected [batch, seq] = {list(self.shape[:2])} "
                "to match the activations"
            )

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Items ``start:stop`` as ``[n, seq, d]``."""
        return _as_tensor(self.array[start:stop]).reshape(stop - start, *self.shape[1:])

    def tokens(self, start: int, stop: int) -> np.ndarray | None:
        return None if self._tokens is None else _as_numpy(self._tokens[start:stop])


def is_dataset_dir(path: str) -> bool:
    """An HF ``datasets`` directory written by ``save_to_disk`` (what SAELens caches are)."""
    return Path(path, "dataset_info.json").is_file() and Path(path, "state.json").is_file()


class CacheItems:
    """A SAELens activation cache: each dataset row is one context window, the hook column an
    ``Array2D [seq, d]`` of activations and ``token_ids`` a ``[seq]`` int32 list."""

    format = "saelens"

    def __init__(self, path: str, tensor: str | None, token_column: str | None):
        import datasets

        where = f"SAELens cache {path}"
        try:
            features = json.loads(Path(path, "dataset_info.json").read_text())["features"]
            dataset = datasets.load_from_disk(path)
        except Exception as exc:  # datasets raises its own types for damaged directories
            raise BaeError(f"{where}: not a readable HF datasets directory ({first_line(exc)})") from None
        if not isinstance(dataset, datasets.Dataset):
            raise BaeError(f"{where}: a DatasetDict; import one split's directory")
        arrays = [name for name, f in features.items() if f.get("_type") == "Array2D"]
        if tensor is None and len(arrays) != 1:
            raise BaeError(f"{where}: name the hook column with --tensor; its Array2D columns are {arrays}")
        self.hook = tensor or arrays[0]
        if features.get(self.hook, {}).get("_type") != "Array2D":
            raise BaeError(f"{where}: no Array2D column {self.hook!r}; its Array2D columns are {arrays}")
        seq, d = features[self.hook]["shape"]
        self.dtype = features[self.hook]["dtype"]
        self.shape = (dataset.num_rows, int(seq), int(d))
        self.source_shape = self.shape
        if dataset.num_rows == 0:
            raise BaeError(f"{where}: holds no rows")
        self.token_column = token_column or (TOKEN_COLUMN if TOKEN_COLUMN in features else None)
        if self.token_column is not None:
            feature = features.get(self.token_column)
            if feature is None:
                raise BaeError(f"{where}: no column {self.token_column!r}; it holds {', '.join(features)}")
            length = feature.get("length")
            if length != seq:
                raise BaeError(
                    f"{where}: column {self.token_column!r} holds lists of length {length}, "
                    f"expected {seq} token ids per row to match {self.hook!r}"
                )
        self._rows = dataset.with_format("arrow")

    def _table(self, start: int, stop: int) -> Any:
        return self._rows[start:stop]

    def read(self, start: int, stop: int) -> torch.Tensor:
        column = self._table(start, stop).column(self.hook).combine_chunks()
        values = column.storage.flatten().flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(np.array(values)).reshape(stop - start, *self.shape[1:])

    def tokens(self, start: int, stop: int) -> np.ndarray | None:
        if self.token_column is None:
            return None
        column = self._table(start, stop).column(self.token_column).combine_chunks()
        return column.flatten().to_numpy(zero_copy_only=False).reshape(stop - start, self.shape[1])
