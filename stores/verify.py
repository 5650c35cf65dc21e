"""Integrity check of a store: every recorded unit readable, well-shaped, finite and consistent."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from bae.common.urls import is_local, local_path
from bae.stores.activation_store import ActivationStore
from bae.stores.chunk_files import TEMPORARY_SUFFIX
from bae.stores.layout import ROW_ARRAYS, decode_values


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: units checked, units not yet written, problems by unit, and
    temporary files that killed writes left (harmless: never read; deletable while nothing writes)."""

    checked: int = 0
    incomplete: list[int] = field(default_factory=list)
    problems: dict[int, list[str]] = field(default_factory=dict)
    temporaries: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_unit(store: ActivationStore, unit: int) -> list[str]:
    start, stop = store.unit_range(unit)
    rows = stop - start
    problems = []
    for layer in store.layers:
        try:
            raw = store.read_unit_layer(layer, unit)
        except Exception as exc:  # a missing, truncated or corrupted chunk file
            problems.append(f"layer {layer}: unreadable chunk ({type(exc).__name__}: {exc})")
            continue
        if raw.shape != (rows, store.d_model) or raw.dtype != np.dtype(store.layout.physical_dtype):
            problems.append(f"layer {layer}: shape {raw.shape} dtype {raw.dtype}")
            continue
        values = decode_values(raw, store.layout.dtype)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            problems.append(f"layer {layer}: {bad} NaN/inf values")
    try:
        row = store.read_unit_rows(unit)
    except Exception as exc:
        return [*problems, f"row arrays: unreadable chunk ({type(exc).__name__}: {exc})"]
    for name, dtype in ROW_ARRAYS.items():
        if row[name].shape != (rows,) or row[name].dtype != np.dtype(dtype):
            problems.append(f"{name}: shape {row[name].shape} dtype {row[name].dtype}")
    if problems:
        return problems
    valid = row["valid"]
    if (row["doc_ids"][valid] < 0).any() or (row["positions"][valid] < 0).any():
        problems.append("valid rows with negative doc id or position")
    n_docs = store.meta.get("n_docs") or 0
    if n_docs and (row["doc_ids"] >= n_docs).any():
        problems.append(f"doc ids beyond the {n_docs} documents of the store")
    return problems


def verify_store(store: ActivationStore) -> VerifyReport:
    """Check every unit recorded as done; list the units not yet written separately."""
    report = VerifyReport()
    done = store.done_mask()
    report.incomplete = [int(u) for u in np.flatnonzero(~done)]
    for unit in np.flatnonzero(done):
        report.checked += 1
        problems = _check_unit(store, int(unit))
        if problems:
            report.problems[int(unit)] = problems
    report.temporaries = stray_temporaries(store.url)
    return report


def stray_temporaries(url: str) -> list[str]:
    """Temporary chunk files (``.<name>.<uuid>.partial``) under a local store, by path."""
    if not is_local(url):
        return []
    return sorted(
        os.path.join(root, name)
        for root, _, files in os.walk(local_path(url))
        for name in files
        if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)
    )


def bytes_on_disk(url: str) -> int:
    """Total size of the files under a store (local path or fsspec URL)."""
    if not is_local(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.du(path))
    total = 0
    for root, _, files in os.walk(local_path(url)):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
