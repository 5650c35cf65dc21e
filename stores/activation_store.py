"""The Zarr activation store: create or reopen, write whole units, read rows, dask views."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import zarr
import zarr.errors
import zarr.registry
from pydantic import ValidationError
from zarr.codecs import Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

from bae.common.atomic_files import temporary_dir
from bae.common.configs import config_diff, describe_validation_error
from bae.common.errors import BaeError, first_line
from bae.common.outputs import check_output_dir
from bae.common.selection import format_ranges
from bae.common.urls import is_local, local_path, url_filesystem
from bae.stores.chunk_files import ChunkFiles
from bae.stores.layout import (
    LAYER_CONVENTION,
    ROW_ARRAYS,
    ROW_FILL,
    SCHEMA_VERSION,
    StoreLayout,
    any_nonfinite,
    decode_values,
    physical,
    settle_nonfinite,
    to_storage,
)

INCOMPLETE_ATTR = "bae_incomplete"
_WRITERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="bae-store-write")
SPARSE_ARRAYS = ("units/clamped",)  # mostly zero: a zero chunk is not stored (read back as zero)

if TYPE_CHECKING:
    import dask.array as da
    from zarr.core.common import AccessModeLiteral


DAMAGED = "its zarr.json was edited or damaged"
UNIT_ARRAYS = (("units/done", "uint8"), ("units/clamped", "int64"))  # one entry per unit


def _zarr_store(
    url: str, read_only: bool, storage_options: dict[str, Any] | None
) -> LocalStore | FsspecStore:
    if not is_local(url):
        return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    return LocalStore(local_path(url), read_only=read_only)


def _compressors(layout: StoreLayout) -> list[Any]:
    codecs: list[Any] = []
    if layout.compressor:
        spec = dict(layout.compressor)
        name = spec.pop("name")
        try:
            codecs.append(zarr.registry.get_codec_class(name)(**spec))
        except (KeyError, TypeError) as exc:
            raise BaeError(f"compressor {layout.compressor}: unknown codec or options ({exc})") from exc
    if layout.checksum:
        codecs.append(Crc32cCodec())
    return codecs


def model_diff(old: Any, new: Any) -> list[str]:
    """How the LLM that made a store differs from the one resuming it: its revision or the
    fingerprint of its weight files, where both sides record one (stores of earlier bae do not)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    return [
        f"model {key}: {old[key]} -> {new[key]} (the model files changed)"
        for key in ("revision", "weights")
        if old.get(key) and new.get(key) and old[key] != new[key]
    ]


def _create_by_rename(
    target: Path, layout: StoreLayout, attrs: Mapping[str, Any], documents: Mapping[str, np.ndarray] | None
) -> None:
    """Build a local store in a temporary sibling and rename it into place, so that independent
    processes starting on one store at once never build it over each other: one rename wins, and
    the others then open the winner's store (and compare configs) like any existing store."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(target)
    try:
        ActivationStore._build(str(tmp), layout, attrs, documents)
        try:
            os.rename(tmp, target)
        except OSError as exc:  # EEXIST/ENOTEMPTY: another process's store got there first
            if not target.is_dir():
                raise BaeError(f"store {target}: cannot create it ({exc.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a store is at ``url``; a URL whose package is missing or whose endpoint cannot be
    reached is one line, not the file system's traceback."""
    if not is_local(url):
        fs, path = url_filesystem(url, storage_options)
        try:
            return fs.exists(path)
        except Exception as exc:  # each fsspec backend raises its own network and auth errors
            raise BaeError(f"store {url}: cannot reach it ({type(exc).__name__}: {first_line(exc)})") from exc
    return os.path.exists(local_path(url))


class ActivationStore:
    """A Zarr v3 group of per-token hidden states, written in units and read by row range."""

    def __init__(self, url: str, group: zarr.Group, meta: dict[str, Any]):
        self.url = url
        self.group = group
        self.meta = meta
        self.layout = StoreLayout.model_validate(meta["layout"])

    # ------------------------------------------------------------------ creation and opening

    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        layout: StoreLayout,
        attrs: Mapping[str, Any],
        documents: Mapping[str, np.ndarray] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> ActivationStore:
        """Create a store, or reopen an existing one made with the same layout and config.

        ``attrs`` holds the producing ``config`` plus model/tokenizer/corpus descriptions. A store that
        exists with a different layout or config is refused with the differing fields.
        ``storage_options`` go to fsspec for a URL (endpoint, credentials); they are not recorded.
        """
        url = os.fspath(url)
        if is_local(url):
            check_output_dir(local_path(url))
            if not _exists(url):
                _create_by_rename(Path(local_path(url)), layout, attrs, documents)
        if _exists(url, storage_options):
            try:
                existing = cls.open(url, mode="r+", storage_options=storage_options)
            except BaeError as exc:
                if "creation was interrupted" not in str(exc):
                    raise BaeError(f"{url} exists and is not a bae activation store: {exc}") from exc
            else:
                new = {"layout": layout.model_dump(mode="json"), "config": attrs.get("config")}
                old = {"layout": existing.meta["layout"], "config": existing.meta.get("config")}
                diffs = config_diff(old, new) + model_diff(existing.meta.get("model"), attrs.get("model"))
                if diffs:
                    raise BaeError(
                        f"store {url} was made with a different config ({'; '.join(diffs)}); "
                        "re-run with the same config to resume, or choose a new --out"
                    )
                return existing
        return cls._build(url, layout, attrs, documents, storage_options)

    @classmethod
    def _build(
        cls,
        url: str,
        layout: StoreLayout,
        attrs: Mapping[str, Any],
        documents: Mapping[str, np.ndarray] | None,
        storage_options: dict[str, Any] | None = None,
    ) -> ActivationStore:
        """Make a new store at ``url`` in place; it is marked incomplete until its metadata is in."""
        group = zarr.open_group(_zarr_store(url, False, storage_options), mode="w", zarr_format=3)
        group.attrs[INCOMPLETE_ATTR] = True
        rows, unit = layout.n_rows, layout.unit_rows
        codecs = _compressors(layout)
        for layer in layout.layers:
            group.create_array(
                f"layers/{layer}",
                shape=(rows, layout.d_model),
                chunks=(unit, layout.d_model),
                dtype=layout.physical_dtype,
                compressors=codecs,
                fill_value=0,
            )
        for name, dtype in ROW_ARRAYS.items():
            group.create_array(
                name,
                shape=(rows,),
                chunks=(unit,),
                dtype=dtype,
                compressors=codecs,
                fill_value=ROW_FILL[name],
            )
        for name, dtype in UNIT_ARRAYS:
            group.create_array(
                name,
                shape=(layout.n_units,),
                chunks=(1,),
                dtype=dtype,
                compressors=None,
                fill_value=0,
            )
        documents = dict(documents or {})
        n_docs = _write_documents(group, documents)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "kind": "activations",
            "layer_convention": LAYER_CONVENTION,
            "d_model": layout.d_model,
            "layers": layout.layers,
            "dtype": {"logical": layout.dtype, "physical": layout.physical_dtype},
            "n_rows": layout.n_rows,
            "unit_rows": layout.unit_rows,
            "n_units": layout.n_units,
            "n_docs": n_docs,
            "document_fields": sorted(documents),
            **dict(attrs),
            "layout": layout.model_dump(mode="json"),
        }
        group.attrs.put({"bae": meta})  # replaces the incomplete marker: the store now exists
        return cls(url, group, meta)

    @classmethod
    def open(
        cls, url: str | os.PathLike[str], mode: str = "r", storage_options: dict[str, Any] | None = None
    ) -> ActivationStore:
        """Open an existing store; a clear error if it is missing, not a store, or of another schema.
        ``storage_options`` go to fsspec for a URL (endpoint, credentials)."""
        url = os.fspath(url)
        if not _exists(url, storage_options):
            raise BaeError(f"store {url}: not found")
        try:
            group = zarr.open_group(
                _zarr_store(url, mode == "r", storage_options),
                mode=cast("AccessModeLiteral", mode),
                zarr_format=3,
            )
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as exc:
            raise BaeError(f"{url} is not a bae activation store (no Zarr v3 group there)") from exc
        attrs = dict(group.attrs)
        if INCOMPLETE_ATTR in attrs:
            raise BaeError(f"store {url}: its creation was interrupted; re-run the command that makes it")
        meta = attrs.get("bae")
        if not isinstance(meta, dict) or meta.get("kind") != "activations":
            raise BaeError(f"{url} is a Zarr group but not a bae activation store (no 'bae' attributes)")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise BaeError(
                f"store {url}: schema version {meta.get('schema_version')!r} is not supported "
                f"(this bae reads version {SCHEMA_VERSION})"
            )
        if not isinstance(meta.get("layout"), dict):
            raise BaeError(f"store {url}: its 'bae' attributes have no layout ({DAMAGED})")
        try:
            store = cls(url, group, meta)
        except ValidationError as exc:
            raise BaeError(f"{describe_validation_error(exc, f'store {url} layout')} ({DAMAGED})") from None
        store.check_arrays()
        return store

    def check_arrays(self) -> None:
        """Refuse a store whose arrays disagree with its recorded layout (edited attributes, or a
        damaged or missing array) instead of reading wrong rows."""
        lay = self.layout
        expected: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {
            name: ((lay.n_rows,), (lay.unit_rows,), dtype) for name, dtype in ROW_ARRAYS.items()
        }
        expected.update({name: ((lay.n_units,), (1,), dtype) for name, dtype in UNIT_ARRAYS})
        for layer in lay.layers:
            shape = (lay.n_rows, lay.d_model)
            expected[f"layers/{layer}"] = (shape, (lay.unit_rows, lay.d_model), lay.physical_dtype)
        try:
            arrays = self._arrays
        except KeyError as exc:
            raise BaeError(f"store {self.url}: array {exc} is missing") from None
        for name, (shape, chunks, dtype) in expected.items():
            arr = arrays[name]
            actual = (arr.shape, arr.chunks, np.dtype(arr.dtype))
            if actual != (shape, chunks, np.dtype(dtype)):
                raise BaeError(
                    f"store {self.url}: array {name} has shape {arr.shape}, chunks {arr.chunks}, dtype "
                    f"{arr.dtype}, but the recorded layout says {shape}, {chunks}, {dtype} ({DAMAGED})"
                )

    # ------------------------------------------------------------------ geometry

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def n_units(self) -> int:
        return self.layout.n_units

    @property
    def unit_rows(self) -> int:
        return self.layout.unit_rows

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def layers(self) -> list[int]:
        return self.layout.layers

    def unit_range(self, unit: int) -> tuple[int, int]:
        return self.layout.unit_range(unit)

    def _layer_array(self, layer: int) -> zarr.Array:
        if layer not in self.layers:
            raise BaeError(
                f"store {self.url} has no layer {layer}; layers present: {', '.join(map(str, self.layers))}"
            )
        return self._arrays[f"layers/{layer}"]

    @cached_property
    def _arrays(self) -> dict[str, zarr.Array]:
        """Array handles opened once (each open reads metadata). Chunks equal to the fill value are
        written too, so that every recorded unit has all its chunk files, except in the sparse
        arrays, whose usual value is the fill value."""
        names = (*ROW_ARRAYS, *(n for n, _ in UNIT_ARRAYS), *(f"layers/{layer}" for layer in self.layers))
        return {
            name: cast(zarr.Array, self.group[name]).with_config(
                {"write_empty_chunks": name not in SPARSE_ARRAYS}
            )
            for name in names
        }

    @cached_property
    def _chunk_files(self) -> dict[str, ChunkFiles]:
        """Direct chunk-file access for the arrays that allow it (local, raw bytes [+ crc32c])."""
        direct = {name: ChunkFiles.for_array(arr) for name, arr in self._arrays.items()}
        return {name: files for name, files in direct.items() if files is not None}

    def _chunk(self, name: str, unit: int) -> tuple[int, ...]:
        """The chunk of array ``name`` that holds unit ``unit`` (every array has one chunk per unit)."""
        return (unit, 0) if name.startswith("layers/") else (unit,)

    def _write_chunk(self, name: str, unit: int, values: np.ndarray) -> None:
        """Write unit ``unit``'s chunk of array ``name``.

        Data chunks of a local store are rewritten in place: nothing reads them before the unit's
        ``units/done`` flag is set, and that flag (like every ``units/`` chunk) is set atomically,
        as a hard link to a one-byte file.
        """
        files = self._chunk_files.get(name)
        if files is None:
            start, stop = self.unit_range(unit) if not name.startswith("units/") else (unit, unit + 1)
            self._arrays[name][start:stop] = values
        elif name == "units/done":
            files.write_flag(self._chunk(name, unit), values)
        else:
            record = name.startswith("units/")
            files.write(self._chunk(name, unit), values, atomic=record, omit_fill=name in SPARSE_ARRAYS)

    def _read_chunk(self, name: str, unit: int, out: np.ndarray | None = None) -> np.ndarray:
        """Unit ``unit``'s rows of array ``name``, read into ``out`` (the full chunk shape) if given."""
        start, stop = self.unit_range(unit)
        files = self._chunk_files.get(name)
        if files is None:
            values = cast(np.ndarray, self._arrays[name][start:stop])
            if out is None:
                return values
            out[: stop - start] = values
        else:
            out = files.read(self._chunk(name, unit), out)
        return out[: stop - start]

    # ------------------------------------------------------------------ writing

    def write_unit(
        self,
        unit: int,
        layers: Mapping[int, np.ndarray | torch.Tensor],
        token_ids: np.ndarray | torch.Tensor,
        doc_ids: np.ndarray | torch.Tensor,
        positions: np.ndarray | torch.Tensor,
        valid: np.ndarray | torch.Tensor,
    ) -> int:
        """Write every array of one unit, then record it as done; returns the clamped count."""
        start, stop = self.unit_range(unit)
        rows = stop - start
        if sorted(layers) != self.layers:
            raise BaeError(f"unit {unit}: got layers {sorted(layers)}, the store holds {self.layers}")
        converted = {}
        for layer, values in layers.items():
            if tuple(values.shape) != (rows, self.d_model):
                raise BaeError(
                    f"unit {unit} layer {layer}: shape {tuple(values.shape)}, expected {(rows, self.d_model)}"
                )
            converted[layer] = to_storage(values, self.layout.dtype, f"unit {unit} layer {layer}")
        row_values = {"token_ids": token_ids, "doc_ids": doc_ids, "positions": positions, "valid": valid}
        for name, values in row_values.items():
            arr = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
            if arr.shape != (rows,):
                raise BaeError(f"unit {unit} {name}: shape {arr.shape}, expected {(rows,)}")
            row_values[name] = arr.astype(ROW_ARRAYS[name], copy=False)
        # the pool checks and writes the layers' chunks while this thread writes the small row chunks;
        # a chunk found to hold NaN/inf is settled (an error, or clamped and rewritten) afterwards, and
        # completion is recorded only after all of that
        dtype = self.layout.dtype
        checks = {layer: _WRITERS.submit(any_nonfinite, stored) for layer, (_, stored) in converted.items()}
        pending = [
            _WRITERS.submit(self._write_chunk, f"layers/{layer}", unit, physical(stored, dtype))
            for layer, (_, stored) in converted.items()
        ]
        for name, values in row_values.items():
            self._write_chunk(name, unit, cast(np.ndarray, values))  # converted above
        for future in pending:
            future.result()
        clamped = 0
        for layer, check in checks.items():
            if check.result():
                where = f"unit {unit} (rows {start}..{stop}) layer {layer}"
                stored, n = settle_nonfinite(converted[layer][0], dtype, self.layout.overflow, where)
                self._write_chunk(f"layers/{layer}", unit, physical(stored, dtype))
                clamped += n
        self._write_chunk("units/clamped", unit, np.array([clamped], np.int64))
        self._write_chunk("units/done", unit, np.ones(1, np.uint8))
        return clamped

    # ------------------------------------------------------------------ reading

    def done_mask(self) -> np.ndarray:
        """Boolean [n_units]: which units are completely written."""
        return cast(np.ndarray, self._arrays["units/done"][:]).astype(bool)

    def complete_units(self, allow_partial: bool = False) -> np.ndarray:
        """The completely written units a reader may use: all of them, or with ``allow_partial``
        those done so far; an unfinished store is otherwise refused in one line."""
        done = self.done_mask()
        units = np.flatnonzero(done)
        if len(units) == 0:
            raise BaeError(f"store {self.url} has no completed units")
        if not allow_partial and len(units) < self.n_units:
            missing = format_ranges(np.flatnonzero(~done))
            raise BaeError(
                f"store {self.url} is unfinished: {len(units)} of {self.n_units} units are complete "
                f"(missing {missing}); re-run the harvest or import that makes it, or pass "
                "--allow-partial to use the complete units only"
            )
        return units

    def is_done(self, unit: int) -> bool:
        return bool(self._arrays["units/done"][unit])

    def clamped_counts(self) -> np.ndarray:
        return cast(np.ndarray, self._arrays["units/clamped"][:])

    def read_layer(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a layer as float32."""
        return decode_values(cast(np.ndarray, self._layer_array(layer)[start:stop]), self.layout.dtype)

    def read_layer_physical(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a layer as stored (float16, uint16 bfloat16 bits, or float32)."""
        return cast(np.ndarray, self._layer_array(layer)[start:stop])

    def read_unit_layer(self, layer: int, unit: int, out: np.ndarray | None = None) -> np.ndarray:
        """One unit's rows of a layer as stored, read into ``out`` ([unit_rows, d], physical dtype) if
        given; missing, truncated or corrupted chunks are errors."""
        self._layer_array(layer)
        return self._read_chunk(f"layers/{layer}", unit, out)

    def read_unit_rows(self, unit: int) -> dict[str, np.ndarray]:
        """One unit's per-row arrays (token_ids, doc_ids, positions, valid)."""
        return {name: self._read_chunk(name, unit) for name in ROW_ARRAYS}

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The per-row arrays (token_ids, doc_ids, positions, valid) for rows ``start:stop``."""
        return {name: cast(np.ndarray, self._arrays[name][start:stop]) for name in ROW_ARRAYS}

    def documents(self) -> dict[str, np.ndarray]:
        """Per-document metadata fields recorded from the corpus."""
        return {
            name: cast(np.ndarray, cast(zarr.Array, self.group[f"documents/{name}"])[:])
            for name in self.meta.get("document_fields", [])
        }

    def dask_layer(self, layer: int) -> da.Array:
        """A float32 dask view of one layer, one block per unit."""
        import dask.array as da  # dask.array imports sparse and numba: only when a view is asked for

        # dask leaves `chunks` unannotated, so pyright infers str from its default "auto"
        arr = da.from_array(self._layer_array(layer), chunks=(self.unit_rows, self.d_model), asarray=True)  # pyright: ignore[reportArgumentType]
        return arr.map_blocks(decode_values, self.layout.dtype, dtype=np.float32)

    def dask_rows(self, name: str) -> da.Array:
        """A dask view of a per-row array, one block per unit."""
        if name not in ROW_ARRAYS:
            raise BaeError(f"unknown row array {name!r}; expected one of {', '.join(ROW_ARRAYS)}")
        import dask.array as da

        # dask leaves `chunks` unannotated, so pyright infers str from its default "auto"
        return da.from_array(self._arrays[name], chunks=(self.unit_rows,), asarray=True)  # pyright: ignore[reportArgumentType]

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r}, rows={self.n_rows}, d={self.d_model}, layers={self.layers})"


def _write_documents(group: zarr.Group, documents: Mapping[str, np.ndarray]) -> int:
    """Write per-document metadata arrays; all fields must have one value per document."""
    lengths = {name: len(values) for name, values in documents.items()}
    if len(set(lengths.values())) > 1:
        raise BaeError(f"document metadata fields differ in length: {lengths}")
    for name, values in documents.items():
        arr = np.asarray(values)
        if arr.dtype.kind in "OU":
            arr = arr.astype(str)
            group.create_array(f"documents/{name}", shape=arr.shape, dtype=str, fill_value="")
        else:
            group.create_array(f"documents/{name}", shape=arr.shape, dtype=arr.dtype, fill_value=0)
        cast(zarr.Array, group[f"documents/{name}"])[:] = arr
    return next(iter(lengths.values()), 0)
