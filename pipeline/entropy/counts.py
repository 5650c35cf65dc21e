"""Per-group bit counts over a store layer: the reusable dask reduction behind ``bae entropy``.

For one store layer and one autoencoder, ``count_groups`` returns, for every group key, the number
of rows in the group and, per code bit, how many of those rows have the bit set (int64), over the rows
that pass a ``RowFilter``. A group key is any picklable callable ``rows -> int64 [n]`` over a unit's
row arrays (``token_ids``, ``doc_ids``, ``positions``, ``valid``, ``row``): ``RowKey("positions")``,
``RowKey("doc_ids")``, ``DocumentKey(store, field)`` for per-document metadata, ``ConstantKey()`` for all
rows in one group. It also counts whole codes per group (128-bit hashes, any code width), the
pairwise co-occurrences of chosen bits, and optionally Poisson-bootstrap replicates (documents
reweighted); a ``RowSample`` cuts groups to equal size and adds null groups (negative keys).

The work is one dask task per store unit (read, encode in batches under ``no_grad``, segment-sum per
group), folded pairwise; memory is one batch plus the per-group counts, whatever the store's size.
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
from bae.common.errors import BaeError
from bae.common.hashing import salt, splitmix64, unit_interval
from bae.pipeline.analysis.scan import cached_model, cached_store, map_reduce_units
from bae.pipeline.entropy.codes import CodeTable, code_hashes
from bae.pipeline.entropy.sampling import RowSample
from bae.stores import RowFilter, iter_unit_rows
from bae.trainer.models import WEIGHTS_FILE, resolve_model_dir

COUNTS_VERSION = 2  # bump when what a partial holds, or how it is drawn, changes
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
    store, model = cached_store(spec.store), cached_model(spec.checkpoint)
    parts = [GroupCounts.empty(model.n_bits, spec.bootstrap, len(spec.pair_bits), spec.joint)]
    for _, x, rows in iter_unit_rows(store, spec.layer, spec.row_filter, [unit]):
        row_keys, doc_ids = spec.group_key(rows), rows["doc_ids"]
        if spec.sample is not None:
            index, row_keys = spec.sample.select(row_keys, rows["row"])
            x, doc_ids = x[index], doc_ids[index]
        keys, inverse = np.unique(row_keys, return_inverse=True)
        for a in range(0, len(x), spec.batch_rows):
            part = slice(a, a + spec.batch_rows)
            bits = model.encode_bits(x[part])
            parts.append(
                batch_counts(
                    keys,
                    inverse[part],
                    bits,
                    doc_ids[part],
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
    bits: np.ndarray,
    doc_ids: np.ndarray,
    *,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    pair_bits: tuple[int, ...] = (),
    joint: bool = True,
) -> GroupCounts:
    """Counts of one encoded batch (bool [n, bits]) whose rows fall in groups ``keys[inverse]``, with
    the extras a ``CountSpec`` names (bootstrap replicates over ``doc_ids``, pairs, whole codes)."""
    present, local = np.unique(inverse, return_inverse=True)
    order = np.argsort(local, kind="stable")
    bounds = np.searchsorted(local[order], np.arange(len(present) + 1))
    sorted_bits = bits[order].view(np.uint8)
    spans = list(itertools.pairwise(bounds))
    ones = np.stack([sorted_bits[lo:hi].sum(0, dtype=np.int32) for lo, hi in spans]).astype(np.int64)
    counts = GroupCounts(keys[present], np.diff(bounds).astype(np.int64), ones)
    weights = poisson_weights(doc_ids[order], bootstrap, bootstrap_seed) if bootstrap else None
    if weights is not None:
        counts.boot_rows = np.add.reduceat(weights, bounds[:-1], axis=1)
        counts.boot_ones = grouped_products(weights.T, sorted_bits, bounds).transpose(1, 0, 2)
    if pair_bits:
        chosen = sorted_bits[:, list(pair_bits)]
        counts.pairs = grouped_products(chosen, chosen, bounds)
    if joint:
        group = np.repeat(counts.keys, counts.rows)
        counts.codes = CodeTable.of_rows(group, code_hashes(np.packbits(sorted_bits, axis=1)), weights)
    return counts


def padded_groups(values: np.ndarray, bounds: np.ndarray) -> torch.Tensor:
    """float32 [G, n_max, k]: each group's rows (``bounds[g]:bounds[g+1]`` of ``values``), zero-padded."""
    sizes = np.diff(bounds)
    padded = np.zeros((len(sizes), int(sizes.max(initial=0)), values.shape[1]), np.float32)
    slot = np.arange(len(values)) - np.repeat(bounds[:-1], sizes)
    padded[np.repeat(np.arange(len(sizes)), sizes), slot] = values
    return torch.from_numpy(padded)


def grouped_products(left: np.ndarray, right: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """int64 [G, a, b]: Σ over each group's rows of leftᵀ·right ([n, a] and [n, b], small integers),
    as one batched product. float32 sums stay exact integers below 2**24 (at most batch_rows rows
    of 0/1 bits times Poisson weights ≤ 20)."""
    sizes = np.diff(bounds)
    if len(sizes) * int(sizes.max(initial=0)) > 4 * len(left):  # skewed groups: padding would cost more
        lt, rt = torch.from_numpy(left).to(torch.float32), torch.from_numpy(right).to(torch.float32)
        products = [lt[lo:hi].T @ rt[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        return torch.stack(products).round().to(torch.int64).numpy()
    x, y = padded_groups(left, bounds), padded_groups(right, bounds)
    return torch.bmm(x.transpose(1, 2), y).round().to(torch.int64).numpy()


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
