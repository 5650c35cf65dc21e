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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bae.common.atomic_files import atomic_write_bytes, atomic_write_json, read_json
from bae.common.configs import require_same_config
from bae.common.console import print_summary
from bae.common.devices import resolve_device, to_device
from bae.common.errors import BaeError
from bae.common.outputs import exclusive_output, sweep_temporaries
from bae.common.selection import format_ranges
from bae.common.stats import FVU_DEFINITION
from bae.common.urls import with_resolved_paths
from bae.pipeline.analysis.checkpoint_match import load_for_store
from bae.pipeline.analysis.scan import cached_model
from bae.pipeline.entropy.bounds import pair_bits_for
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
from bae.pipeline.entropy.sampling import SamplePlan, plan_sample
from bae.pipeline.entropy.trainings import combine, replicate_sets
from bae.stores import ActivationStore, RowFilter, iter_unit_rows

ROW_GROUPINGS = {"position": "positions", "document": "doc_ids", "token": "token_ids"}


@dataclass
class EntropyModel:
    """One checkpoint applied to the store: its layer, the positions it covers, its code width."""

    checkpoint: str
    layer: int
    positions: list[int] | None
    n_bits: int
    fvu: float  # the FVU its training achieved on the validation split (NaN: not recorded)
    shape: dict[str, Any]  # its model config (architecture, width, estimator, ...)


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
        fvu = float(model.metrics.get("val_fvu", math.nan))
        covers = sorted(positions) if positions else None
        shape = model.config.model_dump(mode="json")
        models.append(EntropyModel(checkpoint, int(layer), covers, model.n_bits, fvu, shape))
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            if a.layer != b.layer:
                continue
            if a.positions == b.positions:  # trainings of one model, read together (trainings.py)
                differ = sorted(k for k in a.shape if a.shape[k] != b.shape.get(k))
                if differ:
                    raise BaeError(
                        f"checkpoints {a.checkpoint} and {b.checkpoint} cover layer {a.layer} at the same "
                        f"positions, so they would be read as trainings of one model, but their models "
                        f"differ ({', '.join(f'{k} {a.shape[k]} vs {b.shape.get(k)}' for k in differ)}); "
                        "measure different models in separate runs"
                    )
                continue
            if a.positions is None or b.positions is None or set(a.positions) & set(b.positions):
                raise BaeError(
                    f"checkpoints {a.checkpoint} and {b.checkpoint} both cover layer {a.layer} at some of "
                    "the same positions; give one per layer, or per (layer, disjoint positions), or several "
                    "trainings of one model (same layer and positions)"
                )
    return models


PAIR_SAMPLE_ROWS = 16384


def choose_pair_bits(
    store: ActivationStore,
    model: EntropyModel,
    row_filter: RowFilter,
    units: tuple[int, ...],
    m: int,
    device: str = "cpu",
) -> tuple[int, ...]:
    """The bits whose pairwise statistics the Chow–Liu bound uses (``pair_bits_for``), ranked when
    there are more than ``m`` on rows read from units spread over the store (encoded on ``device``)."""

    def sample() -> tuple[np.ndarray, int]:
        autoencoder = cached_model(model.checkpoint, device)
        on = autoencoder.encoder.weight.device
        step = max(1, len(units) // 8)
        ones, n = np.zeros(model.n_bits), 0
        for _, x, _ in iter_unit_rows(store, model.layer, row_filter, units[::step]):
            bits = autoencoder.encode(to_device(torch.from_numpy(x[: PAIR_SAMPLE_ROWS - n]), on))
            ones, n = ones + bits.sum(0).cpu().numpy(), n + len(bits)
            if n >= PAIR_SAMPLE_ROWS:
                break
        return ones, n

    return pair_bits_for(model.n_bits, m, sample)


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


def real_groups_first(keys: np.ndarray) -> np.ndarray:
    """Real groups (keys ≥ 0) ascending, then null groups 0, 1, ... (keys −1, −2, ...)."""
    big = int(keys.max(initial=0)) + 1
    return np.argsort(np.where(keys >= 0, keys, big - keys), kind="stable")


def build_table(parts: list[dict[str, Any]], group_by: str, values: np.ndarray | None) -> Any:
    """One pyarrow table: a row per (checkpoint, group), null groups last with ``null_group`` set;
    the rows of several trainings read together (``trainings`` > 1) after their members' rows, with
    columns only they have left empty elsewhere."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    rows = 0
    for part in parts:
        keys = part["keys"]
        real = keys >= 0
        group = np.where(real, keys, 0) if values is None else values[np.where(real, keys, 0)]
        fixed = {
            "layer": [part["layer"]] * len(keys),
            "checkpoint": [part["checkpoint"]] * len(keys),
            "checkpoint_fvu": [part["fvu"]] * len(keys),
            "trainings": [part["trainings"]] * len(keys),
            group_by: [g if r else None for g, r in zip(np.asarray(group).tolist(), real)],
            "null_group": [None if r else -1 - int(k) for k, r in zip(keys, real)],
        }
        for name, col in {**fixed, **part["columns"]}.items():
            columns.setdefault(name, [None] * rows).extend(np.asarray(col).tolist())
        rows += len(keys)
        for col in columns.values():
            col.extend([None] * (rows - len(col)))
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
    """Lines to draw: per layer when grouping by position (per-position checkpoints joined), else per
    part; each with its real groups' columns and, under ``null``, its null groups' columns."""
    merged: dict[Any, dict[str, Any]] = {}
    layer_parts = [p["layer"] for p in parts]
    for part in parts:
        several = layer_parts.count(part["layer"]) > 1 and group_by != "position"
        key = (part["layer"], part["checkpoint"]) if several else part["layer"]
        label = f"layer {part['layer']}" + (f" ({Path(part['checkpoint']).name})" if several else "")
        if part["trainings"] > 1:
            label += f", {part['trainings']} trainings"
        if math.isfinite(part["fvu"]):
            label += f", FVU {fvu_text(part, 2 if part['trainings'] == 1 else 3)}"
        real = part["keys"] >= 0
        x = part["keys"][real] if values is None else values[part["keys"][real]]
        s = merged.setdefault(key, {"label": label, "x": [], "null": {}})
        s["x"] = [*s["x"], *np.asarray(x).tolist()]
        for name, col in part["columns"].items():
            col = np.asarray(col)
            s[name] = np.concatenate([s.get(name, np.zeros(0, col.dtype)), col[real]])
            s["null"][name] = np.concatenate([s["null"].get(name, np.zeros(0, col.dtype)), col[~real]])
    return list(merged.values())


PATH_FIELDS = ("store", "checkpoints")


def record_config(config: EntropyConfig, out: Path, units: tuple[int, ...], n_units: int) -> None:
    """Write the config and the store units read into ``out``, or refuse a different config already
    recorded there (paths compared resolved: ``s.zarr`` and its absolute path are one store)."""
    recorded = read_json(out / CONFIG_JSON)
    if recorded is not None:
        old, new = (with_resolved_paths(c, PATH_FIELDS) for c in (recorded["config"], config.shaping()))
        require_same_config(f"entropy output {out}", old, new)
    atomic_write_json(
        out / CONFIG_JSON,
        {
            "config": config.shaping(),
            "full": config.model_dump(mode="json"),
            "units": format_ranges(units),
            "n_units": n_units,
        },
    )


def null_reading(null: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """What the null groups show: the joint estimate where every one is resolved, else the plug-in."""
    if (null["verdict"].astype(str) == "resolved").all():
        return "joint H", null["joint_bits"]
    return "plug-in", null["joint_plugin_bits"]


def fvu_text(part: dict[str, Any], digits: int) -> str:
    """A part's validation FVU, or the range over its trainings."""
    if part["trainings"] == 1:
        return f"{part['fvu']:.{digits}f}"
    low, high = part["fvu_range"]
    return f"{low:.{digits}f}..{high:.{digits}f}"


def part_name(part: dict[str, Any]) -> str:
    if part["trainings"] > 1:
        return f"layer {part['layer']} ({part['trainings']} trainings)"
    return f"layer {part['layer']} ({Path(part['checkpoint']).name})"


def trainings_line(part: dict[str, Any], real: np.ndarray) -> str:
    """How far K trainings read apart, and what the intervals then hold."""
    cols = part["columns"]
    spreads = [
        f"{np.nanmax(np.asarray(cols[c])[real]):.2f} bits of {what}"
        for c, what in (("plugin_spread_bits", "plug-in"), ("entropy_spread_bits", "Σ H_b"))
        if c in cols and np.isfinite(np.asarray(cols[c])[real]).any()
    ]
    return (
        f"{', '.join(part['names'])}: each number is their mean, each interval the hull of theirs "
        f"(documents' sampling and training spread); they differ by up to {' and '.join(spreads)} at "
        "one group"
    )


def summarize(parts: list[dict[str, Any]], group_by: str, values: np.ndarray | None) -> dict[str, Any]:
    """Per checkpoint (or set of trainings read together): groups and rows, the range of Σ H_b and
    of the joint estimate, verdict counts, and the null groups' range when there are any."""
    lines: dict[str, Any] = {}
    for part in parts:
        real = part["keys"] >= 0
        cols = {k: np.asarray(v)[real] for k, v in part["columns"].items()}
        name = part_name(part)
        if part["trainings"] > 1:
            lines[name] = trainings_line(part, real)
        h, n = cols["entropy_bits"], cols["n"]
        lines[f"{name} groups" if part["trainings"] > 1 else name] = (
            f"{len(h)} {group_by} groups, {int(n.sum())} rows (n {int(n.min())}..{int(n.max())}), d'="
            f"{cols['code_bits'][0]}; Σ H_b {np.nanmin(h):.1f}..{np.nanmax(h):.1f} bits (an upper bound)"
        )
        fvu = part["fvu"]
        lines[f"{name} FVU"] = (
            f"{fvu_text(part, 4)} on the validation split ({FVU_DEFINITION}): compare entropies at equal FVU"
            if math.isfinite(fvu)
            else "not recorded in the checkpoint: entropies cannot be compared at equal FVU"
        )
        atypical = cols["atypical_rows"]
        if atypical.any():
            marked = int((cols["verdict"] == "atypical").sum())
            share = float(np.max(atypical / np.maximum(cols["n"], 1)))
            lines[f"{name} atypical"] = (
                f"{int(atypical.sum())} rows outside the checkpoint's typical radius (massive "
                f"activations its training left out) in {int((atypical > 0).sum())} group(s), at most "
                f"{share:.1%} of one; "
                + (
                    f"{marked} group(s) mostly of them marked `atypical`: their code was never fitted, so "
                    "their entropy says nothing about the hidden states"
                    if marked
                    else "no group is mostly of them"
                )
            )
        if "joint_bits" in cols:
            verdict, counted = np.unique(cols["verdict"].astype(str), return_counts=True)
            lines[f"{name} verdicts"] = ", ".join(f"{c} {v}" for v, c in zip(verdict, counted))
            resolved = cols["verdict"] == "resolved"
            if resolved.any():
                j = cols["joint_bits"][resolved]
                lines[f"{name} joint H"] = f"{np.min(j):.2f}..{np.max(j):.2f} bits where resolved"
            lower = cols["verdict"] == "lower_bound"
            if lower.any():
                lines[f"{name} undersampled"] = (
                    f"{int(lower.sum())} group(s): only H ≥ plug-in "
                    f"({np.min(cols['joint_plugin_bits'][lower]):.1f}..{np.max(cols['joint_plugin_bits'][lower]):.1f}"
                    " bits) is known; more rows per group would resolve them"
                )
        null = {k: np.asarray(v)[~real] for k, v in part["columns"].items()}
        if len(null["n"]):
            covers = part["covers"]
            drawn = "" if covers is None else f" of its own position(s) {format_ranges(covers)} only"
            lines[f"{name} null"] = (
                f"{len(null['n'])} random groups of n={int(np.median(null['n']))}{drawn}: "
                f"Σ H_b {np.nanmin(null['entropy_bits']):.1f}..{np.nanmax(null['entropy_bits']):.1f}"
            )
            if "joint_bits" in null:
                what, value = null_reading(null)
                lines[f"{name} null"] += f", {what} {np.nanmin(value):.2f}..{np.nanmax(value):.2f}"
            outside = int(null["atypical_rows"].sum())
            if outside:  # rows the BAE never fitted, mixed into every null group, bias its numbers
                advice = (
                    "leave the groups made of them out (--positions) for a fair null"
                    if (cols["verdict"] == "atypical").any()
                    else "scattered, no group is made of them"
                )
                lines[f"{name} null"] += (
                    f"; they hold {outside} atypical rows ({outside / null['n'].sum():.1%}): {advice}"
                )
        if part.get("null_note"):
            lines[f"{name} null groups"] = part["null_note"]
    return lines


def null_shortfall(requested: int, drawn: int, rows: int) -> str | None:
    """Why fewer null groups than requested were drawn (None when all were)."""
    if drawn >= requested:
        return None
    return (
        f"{drawn} of the {requested} requested fit: null groups are disjoint, each ~n + 4√n of the "
        f"{rows} rows this checkpoint measures"
    )


def run_entropy(config: EntropyConfig, show_progress: bool = True) -> EntropyResult:
    """Count, estimate, write the table and plot, print the summary; the output directory is held
    for the run (a second ``bae entropy`` on it is refused) and first cleared of what a killed run
    left (temporary per-unit count files)."""
    if not config.store:
        raise BaeError("no store given: pass --store or set `store` in --config")
    if not config.checkpoints:
        raise BaeError("no checkpoint given: pass --checkpoint (repeatable) or set `checkpoints` in --config")
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    with exclusive_output(Path(config.out), "bae entropy") as out:
        partials = out / "partials"
        sweep_temporaries([out, partials, *(partials.iterdir() if partials.is_dir() else [])])
        return measure_entropy(config, out, show_progress)


def measure_entropy(config: EntropyConfig, out: Path, show_progress: bool) -> EntropyResult:
    """``run_entropy`` once its output directory is held."""
    assert config.store is not None  # checked by run_entropy
    store = ActivationStore.open(config.store)
    models = resolve_models(store, config.checkpoints)
    group_key, values = resolve_grouping(store, config.group_by)
    units = tuple(int(u) for u in store.complete_units(config.allow_partial))
    record_config(config, out, units, store.n_units)
    parts = []
    for model in models:
        row_filter = model_filter(config, model)
        sample, null_note = None, None
        if config.equal_n is not None or config.null_groups:
            plan = SamplePlan(config.store, row_filter, group_key, units, config.sample_seed)
            sample, sizes = plan_sample(
                plan, config.equal_n, config.null_groups, config.scheduler, show_progress
            )
            null_note = null_shortfall(config.null_groups, sample.null_groups, sum(sizes.values()))
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
            joint=config.joint,
            pair_bits=choose_pair_bits(store, model, row_filter, units, config.pair_bits, config.device),
            sample=sample,
            device=config.device,
        ).with_partials(out / "partials")
        counts = count_groups(spec, config.scheduler, show_progress, f"entropy: layer {model.layer}")
        if len(counts.keys) == 0:
            raise BaeError(
                f"empty selection: no rows of store {store.url} layer {model.layer} pass the filters "
                f"(positions {config.positions or 'all'}, split {config.split or 'all'})"
            )
        columns = estimate_columns(counts, config.confidence, spec.pair_bits)
        order = real_groups_first(counts.keys)
        parts.append(
            {
                "layer": model.layer,
                "checkpoint": model.checkpoint,
                "fvu": model.fvu,
                "null_note": null_note,
                "keys": counts.keys[order],
                "columns": {name: np.asarray(col)[order] for name, col in columns.items()},
                "expected": row_filter.positions,
                "covers": tuple(model.positions) if model.positions is not None else None,
                "trainings": 1,
            }
        )
    if config.group_by == "position":
        check_no_empty_positions(parts)
    sets = replicate_sets(parts)
    combined = [combine(members) for members in sets]
    in_sets = {id(m) for members in sets for m in members}
    shown = [p for p in parts if id(p) not in in_sets] + combined
    table = build_table(parts + combined, config.group_by, values)
    csv_path, parquet_path = write_table(table, out)
    plot = plot_entropy(plot_series(shown, config.group_by, values), config.group_by, out / "entropy.png")
    summary = {
        "store": f"{store.url} (units {format_ranges(units)} of {store.n_units})",
        **summarize(shown, config.group_by, values),
        "table": f"{csv_path}, {parquet_path}",
        "plot": str(plot),
    }
    print_summary("bae entropy", summary)
    return EntropyResult(table, csv_path, parquet_path, plot, summary)
