"""``bae entropy``: feature-set entropy of a store's hidden states per group (docs/method.md).

For each checkpoint (one BAE per layer, or per (layer, positions) when the checkpoint records the
positions it was trained on) one dask pass counts, per group and bit, the rows with the bit set
(``bae.pipeline.entropy.counts``); ``entropy_estimates`` turns counts into Ĥ, the log2 n ceiling, the
varying bits, a bootstrap interval and the joint plug-in cross-check. Outputs in ``--out``:
``entropy.csv``, ``entropy.parquet``, ``entropy.png``, ``entropy_config.json``, and ``partials/``
(per-unit counts a killed run continues from).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bae.common.atomic_files import atomic_write_bytes, atomic_write_json, read_json
from bae.common.configs import require_same_config
from bae.common.console import print_summary
from bae.common.errors import BaeError
from bae.pipeline.analysis.checkpoint_match import load_for_store
from bae.pipeline.entropy.config import CONFIG_JSON, EntropyConfig
from bae.pipeline.entropy.counts import (
    ConstantKey,
    CountSpec,
    DocumentKey,
    GroupKey,
    RowKey,
    count_groups,
    document_field,
)
from bae.pipeline.entropy.estimates import estimate_columns
from bae.pipeline.entropy.plot import plot_entropy
from bae.stores import ActivationStore, RowFilter

ROW_GROUPINGS = {"position": "positions", "document": "doc_ids", "token": "token_ids"}


@dataclass
class EntropyModel:
    """One checkpoint applied to the store: its layer, the positions it covers, its code width."""

    checkpoint: str
    layer: int
    positions: list[int] | None
    n_bits: int


@dataclass
class EntropyResult:
    table: Any  # pyarrow.Table
    csv: Path
    parquet: Path
    plot: Path
    summary: dict[str, Any]


def resolve_models(store: ActivationStore, checkpoints: list[str]) -> list[EntropyModel]:
    """Load each checkpoint, check its layer and d against the store, and that no two overlap."""
    models = []
    for checkpoint in checkpoints:
        model, layer = load_for_store(store, checkpoint)
        positions = model.provenance.positions
        models.append(
            EntropyModel(checkpoint, int(layer), sorted(positions) if positions else None, model.n_bits)
        )
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            if a.layer == b.layer and (
                a.positions is None or b.positions is None or set(a.positions) & set(b.positions)
            ):
                raise BaeError(
                    f"checkpoints {a.checkpoint} and {b.checkpoint} both cover layer {a.layer} at the same "
                    "positions; give one per layer, or per (layer, disjoint positions)"
                )
    return models


def resolve_grouping(store: ActivationStore, group_by: str) -> tuple[GroupKey, np.ndarray | None]:
    """The group key of ``group_by`` and, for a document field, the values its integer codes stand for."""
    if group_by in ROW_GROUPINGS:
        return RowKey(ROW_GROUPINGS[group_by]), None
    if group_by == "all":
        return ConstantKey(), None
    if group_by not in store.meta.get("document_fields", []):
        fields = ", ".join(store.meta.get("document_fields", [])) or "none recorded"
        raise BaeError(
            f"unknown grouping {group_by!r}: expected position, document, token, all, or a per-document "
            f"field of store {store.url} ({fields})"
        )
    return DocumentKey(store.url, group_by), document_field(store.url, group_by)[0]


def model_filter(config: EntropyConfig, model: EntropyModel) -> RowFilter:
    """The rows a checkpoint measures: valid, requested positions ∩ its own, the chosen split."""
    requested = config.position_list
    positions = requested
    if model.positions is not None:
        positions = model.positions if requested is None else sorted(set(model.positions) & set(requested))
        if not positions:
            raise BaeError(
                f"checkpoint {model.checkpoint} covers positions {model.positions}, none of the requested "
                f"positions {config.positions}"
            )
    return RowFilter.of(config.model_copy(update={"positions": positions or "all"}), config.split)


def check_no_empty_positions(parts: list[dict[str, Any]]) -> None:
    """Every position a layer was asked for (requested ∩ its checkpoints' positions) must have rows."""
    for layer in sorted({p["layer"] for p in parts}):
        mine = [p for p in parts if p["layer"] == layer and p["expected"] is not None]
        expected = set().union(*(p["expected"] for p in mine))
        seen = set().union(*(set(p["keys"].tolist()) for p in mine))
        missing = sorted(expected - seen)
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise BaeError(
                f"empty group: no rows at position(s) {shown} in layer {layer} (the store's rows there "
                "are missing or invalid); choose positions that occur"
            )


def build_table(parts: list[dict[str, Any]], group_by: str, values: np.ndarray | None) -> Any:
    """One pyarrow table: a row per (checkpoint, group)."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    for part in parts:
        n = len(part["keys"])
        group = part["keys"] if values is None else values[part["keys"]]
        fixed = {"layer": [part["layer"]] * n, "checkpoint": [part["checkpoint"]] * n, group_by: group}
        for name, col in {**fixed, **part["columns"]}.items():
            columns.setdefault(name, []).extend(np.asarray(col).tolist())
    return pa.table(columns)


def write_table(table: Any, out: Path) -> tuple[Path, Path]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    csv_buffer, parquet_buffer = io.BytesIO(), io.BytesIO()
    pacsv.write_csv(table, csv_buffer)
    pq.write_table(table, parquet_buffer)
    return (
        atomic_write_bytes(out / "entropy.csv", csv_buffer.getvalue()),
        atomic_write_bytes(out / "entropy.parquet", parquet_buffer.getvalue()),
    )


def plot_series(
    parts: list[dict[str, Any]], group_by: str, values: np.ndarray | None
) -> list[dict[str, Any]]:
    """Lines to draw: per layer when grouping by position (per-position checkpoints joined), else per part."""
    merged: dict[Any, dict[str, Any]] = {}
    layer_parts = [p["layer"] for p in parts]
    for part in parts:
        several = layer_parts.count(part["layer"]) > 1 and group_by != "position"
        key = (part["layer"], part["checkpoint"]) if several else part["layer"]
        label = f"layer {part['layer']}" + (f" ({Path(part['checkpoint']).name})" if several else "")
        x = part["keys"] if values is None else values[part["keys"]]
        s = merged.setdefault(key, {"label": label, "x": []})
        s["x"] = [*s["x"], *np.asarray(x).tolist()]
        for name, col in part["columns"].items():
            s[name] = np.concatenate([s.get(name, np.zeros(0)), np.asarray(col, np.float64)])
    return list(merged.values())


def record_config(config: EntropyConfig, out: Path) -> None:
    """Write the config into ``out``, or refuse a different one already recorded there."""
    recorded = read_json(out / CONFIG_JSON)
    if recorded is not None:
        require_same_config(f"entropy output {out}", recorded["config"], config.shaping())
    atomic_write_json(out / CONFIG_JSON, {"config": config.shaping(), "full": config.model_dump(mode="json")})


def summarize(table_parts: list[dict[str, Any]], group_by: str, values: np.ndarray | None) -> dict[str, Any]:
    """One line per checkpoint: range of Ĥ, where it peaks, and the largest ceiling."""
    lines: dict[str, Any] = {}
    for part in table_parts:
        h, ceiling = part["columns"]["entropy_bits"], part["columns"]["ceiling_bits"]
        top = int(np.nanargmax(h))
        at = part["keys"][top] if values is None else values[part["keys"][top]]
        lines[f"layer {part['layer']} ({Path(part['checkpoint']).name})"] = (
            f"{len(h)} {group_by} groups, {int(part['columns']['n'].sum())} rows, "
            f"Ĥ {np.nanmin(h):.2f}..{np.nanmax(h):.2f} bits (max at {group_by} {at}), "
            f"d'={part['columns']['code_bits'][0]}, ceiling log2 n <= {np.max(ceiling):.2f}"
        )
        saturated = int((h >= ceiling - 0.5).sum())
        if saturated:
            lines[f"layer {part['layer']} ({Path(part['checkpoint']).name})"] += (
                f"; {saturated} group(s) at or near log2 n: too few rows to resolve, not saturation"
            )
    return lines


def run_entropy(config: EntropyConfig, show_progress: bool = True) -> EntropyResult:
    """Count, estimate, write the table and plot, print the summary."""
    if not config.store:
        raise BaeError("no store given: pass --store or set `store` in --config")
    if not config.checkpoints:
        raise BaeError("no checkpoint given: pass --checkpoint (repeatable) or set `checkpoints` in --config")
    store = ActivationStore.open(config.store)
    models = resolve_models(store, config.checkpoints)
    group_key, values = resolve_grouping(store, config.group_by)
    units = tuple(int(u) for u in np.flatnonzero(store.done_mask()))
    if not units:
        raise BaeError(f"store {store.url} has no completed units")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    record_config(config, out)
    parts = []
    for model in models:
        row_filter = model_filter(config, model)
        spec = CountSpec(
            store=config.store,
            checkpoint=model.checkpoint,
            layer=model.layer,
            row_filter=row_filter,
            group_key=group_key,
            units=units,
            batch_rows=config.batch_rows,
            bootstrap=config.bootstrap,
            bootstrap_seed=config.bootstrap_seed,
            joint=model.n_bits <= config.joint_max_bits,
        ).with_partials(out / "partials")
        counts = count_groups(spec, config.scheduler, show_progress, f"entropy: layer {model.layer}")
        if len(counts.keys) == 0:
            raise BaeError(
                f"empty selection: no rows of store {store.url} layer {model.layer} pass the filters "
                f"(positions {config.positions or 'all'}, split {config.split or 'all'})"
            )
        columns = estimate_columns(counts, config.confidence)
        parts.append(
            {
                "layer": model.layer,
                "checkpoint": model.checkpoint,
                "keys": counts.keys,
                "columns": columns,
                "expected": row_filter.positions,
            }
        )
    if config.group_by == "position":
        check_no_empty_positions(parts)
    table = build_table(parts, config.group_by, values)
    csv_path, parquet_path = write_table(table, out)
    plot = plot_entropy(plot_series(parts, config.group_by, values), config.group_by, out / "entropy.png")
    summary = {
        "store": f"{store.url} ({len(units)} of {store.n_units} units complete)",
        **summarize(parts, config.group_by, values),
        "table": f"{csv_path}, {parquet_path}",
        "plot": str(plot),
    }
    print_summary("bae entropy", summary)
    return EntropyResult(table, csv_path, parquet_path, plot, summary)
