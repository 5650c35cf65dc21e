"""Make a store from activations made elsewhere: ``[N, d]`` rows, ``[batch, seq, d]`` caches
(.npy, .safetensors, .pt, Zarr) with their token ids and padding masks, or a SAELens activation cache.

Item ``b`` (a sequence) becomes document ``b`` and its position ``s`` a row at position ``s``, as a
harvest records them; padding is dropped, listed special tokens are stored as invalid rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from bae.common.command import cli
from bae.common.configs import StrictModel, comma_list
from bae.common.console import print_summary, progress
from bae.common.errors import BaeError
from bae.stores.activation_store import ActivationStore
from bae.stores.import_sources import (
    ArrayItems,
    CacheItems,
    Container,
    is_dataset_dir,
    read_whole,
    side_array,
)
from bae.stores.layout import LogicalDtype, StoreLayout
from bae.stores.sites import layer_of_hook


class StoreRef(StrictModel):
    """``bae store info/verify``: which store."""

    store: str = Field(
        description="store path or fsspec URL (s3://, gs://, memory://)", json_schema_extra=cli(argument=True)
    )


class ImportConfig(StrictModel):
    """``bae store import``: where the activations come from and how they are stored."""

    src: str = Field(
        description="activations [N, d] or [batch, seq, d]: a .npy, .safetensors or .pt file, a Zarr "
        "array or group, or a SAELens activation cache directory",
        json_schema_extra=cli(argument=True),
    )
    out: str = Field(description="store to create (path or fsspec URL)", json_schema_extra=cli("-o"))
    layer: int | None = Field(
        default=None,
        ge=0,
        description="layer index recorded for these activations [from the hook, --hook or a SAELens "
        "column or a --tensor named so (blocks.L.hook_resid_pre: L, blocks.L.hook_resid_post or "
        "model.layers.L: L+1), else 0]",
    )
    tensor: str | None = Field(
        default=None,
        description="the activations' name in a .safetensors/.pt file or Zarr group, or the hook column "
        "of a SAELens cache [the only one]",
    )
    tokens: str | None = Field(
        default=None,
        description="token ids [batch, seq]: a name in the source, or a file (FILE or FILE:NAME) "
        "[a SAELens cache's token_ids]",
    )
    mask: str | None = Field(
        default=None, description="attention mask [batch, seq], 0 = padding (dropped): a name or a file"
    )
    lengths: str | None = Field(
        default=None, description="real tokens per sequence [batch], right padding dropped: a name or a file"
    )
    doc_ids: str | None = Field(
        default=None, description="document id per sequence [batch] [the batch index]: a name or a file"
    )
    special_tokens: list[int] = Field(
        default_factory=list,
        description="token ids stored as invalid rows, as a harvest stores BOS and separators (e.g. 1,2)",
    )
    hook: str | None = Field(
        default=None,
        description="hook the activations were read at, recorded [a SAELens cache's column, or --tensor "
        "when it is a residual hook name]",
    )
    model: str | None = Field(
        default=None,
        description="model (HF id or directory) that made them, recorded; bae features contexts decodes "
        "token ids with its tokenizer",
    )
    dtype: LogicalDtype = Field(default="float16", description="storage dtype")
    unit_rows: int = Field(default=4096, ge=1, description="rows per unit (chunk)")
    overflow: Literal["error", "clamp"] = Field(
        default="error", description="values beyond the storage range"
    )
    compressor: dict[str, Any] | None = Field(
        default=None, description="numcodecs compressor, e.g. {name: zstd}"
    )

    @field_validator("special_tokens", mode="before")
    @classmethod
    def _special_tokens(cls, value: Any) -> Any:
        return comma_list(value)

    @model_validator(mode="after")
    def _one_padding_rule(self) -> ImportConfig:
        if self.mask is not None and self.lengths is not None:
            raise ValueError("give --mask or --lengths, not both")
        return self


Items = ArrayItems | CacheItems


def open_items(cfg: ImportConfig) -> tuple[Items, Container | None]:
    """The activations as ``[items, seq, d]``, and the file or group they came from (None: a cache)."""
    if os.path.isdir(cfg.src) and is_dataset_dir(cfg.src):
        return CacheItems(cfg.src, cfg.tensor, cfg.tokens), None
    container = Container(cfg.src)
    tokens = None if cfg.tokens is None else side_array(cfg.tokens, container, "token ids")
    return ArrayItems(container, cfg.tensor, tokens), container


@dataclass
class RowPlan:
    """Which positions of each item become rows, in item-major order."""

    keep: np.ndarray | None  # bool [items, seq]; None: every position
    ends: np.ndarray  # int64 [items]: rows of items 0..i
    doc_ids: np.ndarray  # int64 [items]

    @property
    def n_rows(self) -> int:
        return int(self.ends[-1])

    def item_start(self, item: int) -> int:
        """The store row of item ``item``'s first row."""
        return int(self.ends[item - 1]) if item else 0


def plan_rows(cfg: ImportConfig, items: Items, container: Container | None) -> RowPlan:
    """Read the mask or lengths and document ids (small, [batch, seq] at most) and count the rows."""
    n_items, seq, _ = items.shape
    side = {name: getattr(cfg, name) for name in ("tokens", "mask", "lengths", "doc_ids")}
    given = [f"--{name.replace('_', '-')}" for name, spec in side.items() if spec is not None]
    if isinstance(items, ArrayItems) and items.flat and given:
        raise BaeError(
            f"{' and '.join(given)} need [batch, seq, d] activations; {cfg.src} holds "
            f"{list(items.source_shape)} ([N, d]: every row its own document at position 0)"
        )
    if isinstance(items, CacheItems) and (cfg.mask or cfg.lengths or cfg.doc_ids):
        raise BaeError(
            f"SAELens cache {cfg.src}: its windows are unpadded; --mask, --lengths and --doc-ids do not apply"
        )

    def whole(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        spec = side[name]
        what = name.replace("_", " ")
        return (
            None if spec is None else read_whole(side_array(spec, container, what), shape, f"{what} {spec}")
        )

    keep = None
    mask, lengths = whole("mask", (n_items, seq)), whole("lengths", (n_items,))
    if mask is not None:
        keep = mask.astype(bool)
    if lengths is not None:
        if lengths.min() < 0 or lengths.max() > seq:
            raise BaeError(
                f"lengths {cfg.lengths}: values {lengths.min()}..{lengths.max()}, expected 0..{seq}"
            )
        keep = np.arange(seq)[None, :] < lengths.astype(np.int64)[:, None]
    counts = np.full(n_items, seq, np.int64) if keep is None else keep.sum(axis=1, dtype=np.int64)
    if counts.sum() == 0:
        raise BaeError(f"import source {cfg.src}: the mask or lengths keep no positions")
    doc_ids = whole("doc_ids", (n_items,))
    return RowPlan(
        keep, np.cumsum(counts), np.arange(n_items) if doc_ids is None else doc_ids.astype(np.int64)
    )


def unit_rows(items: Items, plan: RowPlan, start: int, stop: int, group: int) -> dict[str, Any]:
    """Rows ``start:stop`` of the store: activations and row arrays, reading ``group`` items at a time."""
    seq = items.shape[1]
    values, token_ids, doc_ids, positions = [], [], [], []
    first = int(np.searchsorted(plan.ends, start, side="right"))  # the item holding row ``start``
    while first < len(plan.ends) and (offset := plan.item_start(first)) < stop:
        last = min(first + group, len(plan.ends))
        keep = np.ones((last - first, seq), bool) if plan.keep is None else plan.keep[first:last]
        item, pos = np.nonzero(keep)
        take = slice(max(start - offset, 0), max(min(stop - offset, len(item)), 0))
        item, pos = item[take], pos[take]
        block = items.read(first, last)
        values.append(block[torch.from_numpy(item), torch.from_numpy(pos)])
        tokens = items.tokens(first, last)
        token_ids.append(np.full(len(item), -1, np.int64) if tokens is None else tokens[item, pos])
        doc_ids.append(plan.doc_ids[first + item])
        positions.append(pos if plan.keep is None else (np.cumsum(keep, axis=1) - 1)[item, pos])
        first = last
    return {
        "values": torch.cat(values),
        "token_ids": np.concatenate(token_ids),
        "doc_ids": np.concatenate(doc_ids),
        "positions": np.concatenate(positions),
    }


def source_record(cfg: ImportConfig, items: Items, hook: str | None) -> dict[str, Any]:
    """What the store records about where its rows came from (``bae store info`` shows it)."""
    return {
        "path": os.path.abspath(cfg.src),
        "format": items.format,
        "shape": list(items.source_shape),
        "dtype": items.dtype,
        "tensor": items.hook if isinstance(items, CacheItems) else cfg.tensor,
        "hook": hook,
        "token_ids": cfg.tokens or getattr(items, "token_column", None),
    }


def tensor_hook(tensor: str | None) -> str | None:
    """A tensor named as a TransformerLens or HF residual hook (a TransformerLens cache's keys) names
    its hook."""
    return tensor if tensor is not None and layer_of_hook(tensor) is not None else None


def resolve_layer(cfg: ImportConfig, hook: str | None) -> int:
    """``--layer``, else the layer the hook name reads, else 0 when no hook is named."""
    if cfg.layer is not None:
        return cfg.layer
    if hook is None:
        return 0
    layer = layer_of_hook(hook)
    if layer is None:
        raise BaeError(f"hook {hook!r}: not a residual-stream hook bae knows the layer of; pass --layer")
    return layer


def import_activations(cfg: ImportConfig, show_progress: bool = True) -> ActivationStore:
    """Copy ``cfg.src`` into a store unit by unit; resumable like every writer."""
    items, container = open_items(cfg)
    plan = plan_rows(cfg, items, container)
    hook = cfg.hook or (items.hook if isinstance(items, CacheItems) else tensor_hook(cfg.tensor))
    layer = resolve_layer(cfg, hook)
    n_items, seq, d = items.shape
    n = plan.n_rows
    layout = StoreLayout(
        n_rows=n,
        unit_rows=cfg.unit_rows,
        d_model=d,
        layers=[layer],
        dtype=cfg.dtype,
        overflow=cfg.overflow,
        compressor=cfg.compressor,
    )
    flat = isinstance(items, ArrayItems) and items.flat
    attrs = {
        "config": cfg.model_dump(mode="json", exclude={"out"}),  # where it lives is not part of it
        "model": {"id": cfg.model} if cfg.model else None,
        "tokenizer_fingerprint": None,
        "corpus_fingerprint": None,
        "source": source_record(cfg, items, hook),
        "context_length": None if flat else seq,
        "packing_mode": "import",
        "n_docs": len(np.unique(plan.doc_ids[np.diff(plan.ends, prepend=0) > 0])),
    }
    store = ActivationStore.create(cfg.out, layout, attrs)
    todo = np.flatnonzero(~store.done_mask())
    special = np.asarray(cfg.special_tokens, np.int64)
    group = max(1, cfg.unit_rows // seq)  # items read at once: about one unit's worth of activations
    clamped = 0
    pending_rows = sum(stop - start for start, stop in map(store.unit_range, map(int, todo)))
    with progress(n, "import", unit="row", initial=n - pending_rows, disable=not show_progress) as bar:
        for unit in todo:
            start, stop = store.unit_range(int(unit))
            rows = unit_rows(items, plan, start, stop, group)
            clamped += store.write_unit(
                int(unit),
                {layer: rows["values"]},
                token_ids=rows["token_ids"],
                doc_ids=rows["doc_ids"],
                positions=rows["positions"],
                valid=~np.isin(rows["token_ids"], special),
            )
            bar.update(stop - start)
    if show_progress:
        print_summary(
            f"imported {cfg.src} -> {cfg.out}",
            {
                "source": f"{items.format} {list(items.source_shape)} {items.dtype}"
                + (f", hook {hook}" if hook else ""),
                "rows": f"{n} of {n_items * seq} positions ({n_items * seq - n} padding dropped)",
                "d": d,
                "layer": layer,
                "token ids": "recorded" if attrs["source"]["token_ids"] else "none (-1)",
                "dtype": f"{cfg.dtype} (source {items.dtype})",
                "units written": f"{len(todo)} of {store.n_units}",
                "clamped values": clamped,
            },
        )
    return store
