"""Per-group bit counts over a store layer: the reusable dask reduction behind ``bae entropy``.

For one store layer and one autoencoder, ``count_groups`` returns, for every group key, the number
of rows in the group and, per code bit, how many of those rows have the bit set (int64), over the rows
that pass a ``RowFilter``. A group key is any picklable callable ``rows -> int64 [n]`` over a unit's
row arrays (``token_ids``, ``doc_ids``, ``positions``, ``valid``, ``row``): ``RowKey("positions")``,
``RowKey("doc_ids")``, ``DocumentKey(store, field)`` for per-document metadata, ``ConstantKey()`` for all
rows in one group. It also counts, per group, the rows outside the checkpoint's typical radius
(``atypical``: massive-activation rows its training loss left out, whose codes were never fitted),
whole codes per group (128-bit hashes, any code width), the
pairwise co-occurrences of chosen bits, and optionally Poisson-bootstrap replicates (documents
reweighted); a ``RowSample`` cuts groups to equal size and adds null groups (negative keys).

The work is one dask task per store unit (read, encode in batches under ``no_grad``, segment-sum per
group), folded pairwise; memory is one batch plus the per-group counts, whatever the store's size.
Encoding and counting run on ``CountSpec.device`` (resolved by the process that runs the task): on a
GPU the counts are torch ops there and only per-group counts and packed codes come back.
Each unit's counts are written atomically to ``<partials>/unit-NNNNNNNN.npz.zst`` under a directory named
by a hash of everything that shapes them, so a killed run continues where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

from bae.common.atomic_files import atomic_write_bytes
from bae.common.devices import to_device
from bae.common.errors import BaeError
from bae.common.hashing import salt, splitmix64, unit_interval
from bae.pipeline.analysis.scan import cached_model, cached_store, map_reduce_units
from bae.pipeline.entropy.codes import CodeTable, code_hashes
from bae.pipeline.entropy.sampling import RowSample
from bae.stores import RowFilter, iter_unit_rows
from bae.trainer.models import WEIGHTS_FILE, resolve_model_dir

COUNTS_VERSION = 3  # bump when what a partial holds, or how it is drawn, changes
GroupKey = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class RowKey:
    """Group by a per-row array of the store (``positions``, ``doc_ids`` or ``token_ids``)."""

    name: str

    def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        return rows[self.name].astype(np.int64)


@dataclass(frozen=True)
class ConstantKey:
    """Every row in one group (key 0)."""

    def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        return np.zeros(len(rows["doc_ids"]), np.int64)


@functools.lru_cache(maxsize=8)
def document_field(store: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, each document's index into them) of a per-document field."""
    documents = cached_store(store).documents()
    if name not in documents:
        fields = ", ".join(sorted(documents)) or "none recorded"
        raise BaeError(f"store {store} has no per-document field {name!r} (fields: {fields})")
    values, codes = np.unique(documents[name], return_inverse=True)
    return values, codes.reshape(-1).astype(np.int64)


@dataclass(frozen=True)
class DocumentKey:
    """Group by a per-document metadata field: key = index of the row's document's value among the
    field's sorted distinct values (``document_field``); read once per process, not shipped in tasks."""

    store: str
    name: str

    def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        return document_field(self.store, self.name)[1][rows["doc_ids"]]


@dataclass
class GroupCounts:
    """Counts per group key (sorted, unique); the optional parts are None when not gathered."""

    keys: np.ndarray  # int64 [G]
    rows: np.ndarray  # int64 [G]
    ones: np.ndarray  # int64 [G, bits]: rows of the group with each bit set
    boot_rows: np.ndarray | None = None  # int64 [B, G]: Poisson-weighted rows per bootstrap replicate
    boot_ones: np.ndarray | None = None  # int64 [B, G, bits]
    pairs: np.ndarray | None = None  # int64 [G, m, m]: rows with both of two chosen bits set
    codes: CodeTable | None = None  # whole codes: (group, code hash) -> count
    atypical: np.ndarray | None = None  # int64 [G]: rows outside the checkpoint's typical radius

    @classmethod
    def empty(cls, bits: int, bootstrap: int, pair_bits: int, joint: bool) -> GroupCounts:
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros((0, bits), np.int64),
            np.zeros((bootstrap, 0), np.int64) if bootstrap else None,
            np.zeros((bootstrap, 0, bits), np.int64) if bootstrap else None,
            np.zeros((0, pair_bits, pair_bits), np.int64) if pair_bits else None,
            CodeTable.of_rows(np.zeros(0, np.int64), np.zeros((0, 2), np.uint64), empty_weights(bootstrap))
            if joint
            else None,
            np.zeros(0, np.int64),
        )

    def merge(self, other: GroupCounts) -> GroupCounts:
        """The counts of both parts together (associative and commutative)."""
        keys = np.union1d(self.keys, other.keys)
        a, b = np.searchsorted(keys, self.keys), np.searchsorted(keys, other.keys)

        def add(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
            shape = list(x.shape)
            shape[axis] = len(keys)
            out = np.zeros(shape, np.int64)
            np.moveaxis(out, axis, 0)[a] += np.moveaxis(x, axis, 0)
            np.moveaxis(out, axis, 0)[b] += np.moveaxis(y, axis, 0)
            return out

        merged = GroupCounts(keys, add(self.rows, other.rows, 0), add(self.ones, other.ones, 0))
        if self.boot_rows is not None and other.boot_rows is not None:
            merged.boot_rows = add(self.boot_rows, other.boot_rows, 1)
            merged.boot_ones = add(self.boot_ones, other.boot_ones, 1)  # type: ignore[arg-type]
        if self.pairs is not None and other.pairs is not None:
            merged.pairs = add(self.pairs, other.pairs, 0)
        if self.codes is not None and other.codes is not None:
            merged.codes = self.codes.merge(other.codes)
        if self.atypical is not None and other.atypical is not None:
            merged.atypical = add(self.atypical, other.atypical, 0)
        return merged

    def save(self, path: Path) -> None:
        """Atomically write the counts: smallest integer dtypes, an ``.npz`` compressed with zstd."""
        arrays = {k: v for k, v in asdict(self).items() if isinstance(v, np.ndarray)}
        small = {
            k: v.astype(np.min_scalar_type(int(v.max(initial=1)))) if v.min(initial=0) >= 0 else v
            for k, v in arrays.items()
        }
        codes = self.codes.arrays() if self.codes is not None else {}
        buffer = io.BytesIO()
        # numpy's stub binds **arrays to its `allow_pickle: bool` keyword
        np.savez(buffer, **small, **codes)  # pyright: ignore[reportArgumentType]
        atomic_write_bytes(path, Zstd(level=1).encode(buffer.getvalue()))

    @classmethod
    def load(cls, path: Path) -> GroupCounts:
        with np.load(io.BytesIO(Zstd().decode(path.read_bytes()))) as data:
            arrays = {k: data[k] for k in data.files}
        codes = CodeTable.from_arrays(arrays) if "code_group" in arrays else None
        plain = {k: v.astype(np.int64) for k, v in arrays.items() if not k.startswith("code_")}
        return cls(**plain, codes=codes)


def empty_weights(bootstrap: int) -> np.ndarray | None:
    return np.zeros((bootstrap, 0), np.int64) if bootstrap else None


# Poisson(1) inverse CDF: P(X <= k) for k = 0..19; a uniform above the last entry maps to 20.
_POISSON1_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])


def poisson_weights(doc_ids: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """int64 [replicates, n]: each document's Poisson(1) weight in each bootstrap replicate.

    A hash of (seed, replicate, document), so every row of a document gets the same weight, in any
    unit, on any worker: the streaming form of resampling documents with replacement.
    """
    salts = salt(seed, "bootstrap", np.arange(replicates))
    with np.errstate(over="ignore"):
        mixed = splitmix64(doc_ids.astype(np.uint64)[None, :] ^ salts[:, None])
    u = unit_interval(mixed)
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.int64)


@dataclass(frozen=True)
class CountSpec:
    """One reduction: which rows, which model, which groups, what extras (picklable for dask workers)."""

    store: str
    checkpoint: str
    layer: int
    row_filter: RowFilter
    group_key: GroupKey
    units: tuple[int, ...]
    partials: str | None = None  # directory for per-unit counts; None: keep nothing
    batch_rows: int = 4096
    bootstrap: int = 0
    bootstrap_seed: int = 0
    joint: bool = True  # count whole codes per group
    pair_bits: tuple[int, ...] = ()  # bits whose pairwise co-occurrences are counted
    sample: RowSample | None = None  # equal-size and null groups
    device: str = "auto"  # where to encode and count (resolved per process); not in the fingerprint

    def fingerprint(self) -> str:
        """A hash of everything that shapes the counts (the partials directory's name)."""
        shaping = {
            "version": COUNTS_VERSION,
            "store": cached_store(self.store).meta,  # what the store is, not how its path is spelled
            "layer": self.layer,
            "filter": repr(self.row_filter),
            "group_key": hashlib.sha256(repr(self.group_key).encode()).hexdigest(),
            "weights": weights_digest(self.checkpoint),
            "bootstrap": [self.bootstrap, self.bootstrap_seed],
            "joint": self.joint,
            "pair_bits": list(self.pair_bits),
            "sample": hashlib.sha256(repr(self.sample).encode()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    def with_partials(self, root: str | Path) -> CountSpec:
        """This spec keeping its per-unit counts in ``root/<fingerprint>/``."""
        return replace(self, partials=str(Path(root) / self.fingerprint()))

    def partial_path(self, unit: int) -> Path | None:
        return None if self.partials is None else Path(self.partials) / f"unit-{unit:08d}.npz.zst"


def weights_digest(checkpoint: str) -> str:
    """sha256 of a checkpoint's weights file (names the model in partial-count directories)."""
    digest = hashlib.sha256()
    with open(resolve_model_dir(checkpoint) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unit_counts(spec: CountSpec, unit: int) -> GroupCounts:
    """One unit's counts: read from its partial file if a previous run wrote it, else computed and saved."""
    path = spec.partial_path(unit)
    if path is not None and path.is_file():
        return GroupCounts.load(path)
    store, model = cached_store(spec.store), cached_model(spec.checkpoint, spec.device)
    device = model.encoder.weight.device
    parts = [GroupCounts.empty(model.n_bits, spec.bootstrap, len(spec.pair_bits), spec.joint)]
    for _, x, rows in iter_unit_rows(store, spec.layer, spec.row_filter, [unit]):
        row_keys, doc_ids = spec.group_key(rows), rows["doc_ids"]
        if spec.sample is not None:
            index, row_keys = spec.sample.select(row_keys, rows["row"])
            x, doc_ids = x[index], doc_ids[index]
        keys, inverse = np.unique(row_keys, return_inverse=True)
        for a in range(0, len(x), spec.batch_rows):
            part = slice(a, a + spec.batch_rows)
            bits, typical = model.encode_typical(
                to_device(torch.from_numpy(np.ascontiguousarray(x[part])), device)
            )
            parts.append(
                batch_counts(
                    keys,
                    inverse[part],
                    bits,
                    doc_ids[part],
                    typical=typical,
                    bootstrap=spec.bootstrap,
                    bootstrap_seed=spec.bootstrap_seed,
                    pair_bits=spec.pair_bits,
                    joint=spec.joint,
                )
            )
    counts = merge_all(parts)
    if path is not None:
        counts.save(path)
    return counts


def merge_all(parts: list[GroupCounts]) -> GroupCounts:
    """All parts merged pairwise in a balanced tree (an entry is re-sorted log(parts) times, not parts)."""
    while len(parts) > 1:
        parts = [a.merge(b) for a, b in zip(parts[::2], parts[1::2])] + parts[len(parts) // 2 * 2 :]
    return parts[0]


def batch_counts(
    keys: np.ndarray,
    inverse: np.ndarray,
    bits: np.ndarray | torch.Tensor,
    doc_ids: np.ndarray,
    *,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    pair_bits: tuple[int, ...] = (),
    joint: bool = True,
    typical: np.ndarray | torch.Tensor | None = None,
    on_device: bool | None = None,
) -> GroupCounts:
    """Counts of one encoded batch (bool [n, bits], numpy or a tensor on any device) whose rows fall
    in groups ``keys[inverse]``, with the extras a ``CountSpec`` names (bootstrap replicates over
    ``doc_ids``, pairs, whole codes); ``typical`` (bool [n], None: every row) marks the rows inside
    the checkpoint's typical radius, the others are counted per group as ``atypical``.

    The sums run where the bits are (``on_device``, default: a tensor off the CPU) as torch ops, and
    only per-group counts (plus d'/8 bytes per row of packed codes for the whole-code hashes) come
    back; CPU bits are summed in NumPy, which is faster there (docs/entropy.md)."""
    present, local = np.unique(inverse, return_inverse=True)
    order = np.argsort(local, kind="stable")
    bounds = np.searchsorted(local[order], np.arange(len(present) + 1))
    sizes = np.diff(bounds).astype(np.int64)
    if on_device is None:
        on_device = torch.is_tensor(bits) and bits.device.type != "cpu"
    if on_device:
        device_bits = torch.as_tensor(bits)
        sorted_bits = device_bits[torch.from_numpy(order).to(device_bits.device)].view(torch.uint8)
        group = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)).to(sorted_bits.device)
        ones = segment_sums(sorted_bits, group, len(sizes))
        packed = pack_bits(sorted_bits) if joint else None
    else:
        host_bits = bits.numpy() if torch.is_tensor(bits) else np.asarray(bits)
        host_sorted = host_bits[order].view(np.uint8)
        spans = itertools.pairwise(bounds)
        ones = np.stack([host_sorted[lo:hi].sum(0, dtype=np.int32) for lo, hi in spans]).astype(np.int64)
        packed = np.packbits(host_sorted, axis=1) if joint else None
        sorted_bits = torch.from_numpy(host_sorted)
    counts = GroupCounts(keys[present], sizes, ones, atypical=np.zeros(len(sizes), np.int64))
    if typical is not None and len(order):
        outside = ~(typical.cpu().numpy() if torch.is_tensor(typical) else np.asarray(typical, bool))
        counts.atypical = np.add.reduceat(outside[order].astype(np.int64), bounds[:-1])
    weights = poisson_weights(doc_ids[order], bootstrap, bootstrap_seed) if bootstrap else None
    if weights is not None:
        counts.boot_rows = np.add.reduceat(weights, bounds[:-1], axis=1)
        replicate = torch.from_numpy(weights.T.astype(np.uint8)).to(sorted_bits.device)  # Poisson(1) ≤ 20
        counts.boot_ones = grouped_products(replicate, sorted_bits, bounds).transpose(1, 0, 2)
    if pair_bits:
        chosen = sorted_bits[:, torch.tensor(pair_bits, device=sorted_bits.device)]
        counts.pairs = grouped_products(chosen, chosen, bounds)
    if packed is not None:
        group_keys = np.repeat(counts.keys, counts.rows)
        counts.codes = CodeTable.of_rows(group_keys, code_hashes(packed), weights)
    return counts


def exact_float(largest: int) -> torch.dtype:
    """A float dtype whose sums of small non-negative integers stay exact up to ``largest``."""
    return torch.float32 if largest < 2**24 else torch.float64


def segment_sums(values: torch.Tensor, group: torch.Tensor, groups: int) -> np.ndarray:
    """int64 [groups, k]: Σ of the 0/1 rows of ``values`` [n, k] per ``group`` [n], summed where they are."""
    dtype = exact_float(len(values))
    sums = torch.zeros(groups, values.shape[1], dtype=dtype, device=values.device)
    return sums.index_add_(0, group, values.to(dtype)).to(torch.int64).cpu().numpy()


_BIT_WEIGHTS = 2 ** torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> np.ndarray:
    """``np.packbits(bits, axis=1)`` of 0/1 ``bits`` [n, k] computed where they are: uint8 [n, ⌈k/8⌉]."""
    n, k = bits.shape
    padded = torch.zeros(n, -(-k // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :k] = bits
    octets = padded.view(n, -1, 8) * _BIT_WEIGHTS.to(bits.device)
    return octets.sum(2, dtype=torch.uint8).cpu().numpy()


def padded_groups(values: torch.Tensor, bounds: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """[G, n_max, k] of ``dtype``: each group's rows (``bounds[g]:bounds[g+1]`` of ``values``),
    zero-padded, on the device of ``values``."""
    sizes = np.diff(bounds)
    shape = (len(sizes), int(sizes.max(initial=0)), values.shape[1])
    padded = torch.zeros(shape, dtype=dtype, device=values.device)
    slot = np.arange(len(values)) - np.repeat(bounds[:-1], sizes)
    index = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)), torch.from_numpy(slot)
    padded[tuple(i.to(values.device) for i in index)] = values.to(dtype)
    return padded


def grouped_products(
    left: np.ndarray | torch.Tensor, right: np.ndarray | torch.Tensor, bounds: np.ndarray
) -> np.ndarray:
    """int64 [G, a, b]: Σ over each group's rows of leftᵀ·right ([n, a] and [n, b], small non-negative
    integers: 0/1 bits, Poisson weights ≤ 20), as one batched product where the operands are, in a
    float dtype exact for these sums (float32 below 2**24)."""
    lt, rt = torch.as_tensor(left), torch.as_tensor(right)
    dtype = exact_float(20 * len(lt))
    sizes = np.diff(bounds)
    if len(sizes) * int(sizes.max(initial=0)) > 4 * len(lt):  # skewed groups: padding would cost more
        lt, rt = lt.to(dtype), rt.to(dtype)
        products = torch.stack([lt[lo:hi].T @ rt[lo:hi] for lo, hi in itertools.pairwise(bounds.tolist())])
    else:
        x, y = padded_groups(lt, bounds, dtype), padded_groups(rt, bounds, dtype)
        products = torch.bmm(x.transpose(1, 2), y)
    return products.round().to(torch.int64).cpu().numpy()


def count_groups(
    spec: CountSpec, scheduler: str | None = None, show_progress: bool = True, desc: str = "counting"
) -> GroupCounts:
    """Counts over all of ``spec.units``: dask threads locally, or the cluster at ``scheduler``."""
    if not spec.units:
        raise BaeError(f"store {spec.store}: no completed units to read")
    if spec.partials is not None:
        Path(spec.partials).mkdir(parents=True, exist_ok=True)
    return map_reduce_units(
        spec.units, functools.partial(unit_counts, spec), GroupCounts.merge, scheduler, desc, show_progress
    )
