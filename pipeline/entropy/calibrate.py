"""``bae entropy calibrate``: how close today's training and estimators get to a known code entropy.

From a store's layer L it estimates the per-dimension mean and standard deviation over the typical
rows (training's rule) among up to ``stats_rows`` valid rows (float64), builds synthetic stores of
the same d and scale whose code entropy is known (``bae.pipeline.entropy.synthetic``: independent,
Markov and sparse bits for each rank r), trains a model on each with exactly the given ``bae train``
options, measures its rows as one group with the entropy estimators (all of them, as ``bae entropy``
does by default, or one side of the split with ``--split``), and compares the reported estimate with
the truth. Layout of ``--out``::

    sets/<kind>-r<r>/store.zarr    a real activation store (one document per row, position 0, valid)
    runs/<kind>-r<r>/              the ``bae train`` run on it
    calibration.csv, .json         a row per set: truth, every estimate, verdict, FVU, pass/fail

Imports stay light (the CLI imports this module for its config); the work imports lazily.
Every step resumes: a store's written units are kept, a finished run is reused (``train`` skips it),
and only the counting is redone. The result is a measurement: cells that fail are reported, not errors.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from bae.common.atomic_files import atomic_write_json, atomic_write_text
from bae.common.command import cli
from bae.common.configs import comma_list
from bae.common.console import print_summary
from bae.common.errors import BaeError
from bae.common.outputs import LocalOutput, make_output_dir
from bae.pipeline.entropy.synthetic import KINDS, SyntheticSpec
from bae.trainer.config import TrainConfig
from bae.trainer.run_folder import RunFolder

if TYPE_CHECKING:
    from bae.stores import ActivationStore

Kind = Literal["independent", "markov", "sparse"]
UNIT_ROWS = 4096
PAIR_BITS = 64  # as `bae entropy --pair-bits`


class CalibrateConfig(TrainConfig):
    """``bae entropy calibrate``: every ``bae train`` option (applied to each synthetic set as given),
    plus what the synthetic sets are and when an estimate passes."""

    store: str = Field(
        description="activation store whose layer's per-dimension mean and std the synthetic sets copy",
        json_schema_extra=cli("-s"),
    )
    layer: int = Field(
        description="layer of the store to copy (the synthetic stores record it too)",
        json_schema_extra=cli("-l"),
    )
    out: LocalOutput = Field(
        description="calibration directory: sets/, runs/, calibration.csv and .json",
        json_schema_extra=cli("-o"),
    )
    ranks: list[int] = Field(
        default_factory=lambda: [4, 8, 16, 32], description="code ranks r of the synthetic sets, e.g. 4,8"
    )
    kinds: list[Kind] = Field(
        default_factory=lambda: list(KINDS), description="laws of the bits: independent, markov, sparse"
    )
    rows: int = Field(default=30_000, ge=100, description="rows of each synthetic set")
    stats_rows: int = Field(
        default=20_000, ge=2, description="valid rows of the store read to estimate its mean and std"
    )
    tolerance: float = Field(
        default=0.10, gt=0, description="a cell passes when |estimate − truth| ≤ tolerance × truth"
    )
    noise_fraction: float = Field(
        default=0.02, ge=0, lt=1, description="share of every dimension's variance that is Gaussian noise"
    )
    sparse_p: float = Field(default=0.05, gt=0, lt=1, description="firing probability of a sparse bit")
    markov_q: float = Field(default=0.2, gt=0, lt=1, description="flip probability between Markov bits")
    seed: int = Field(default=0, description="seed of the synthetic sets and of training")
    split: Literal["train", "val"] | None = Field(
        default=None, description="measure one split of the set's rows only [all rows, as bae entropy]"
    )

    @field_validator("ranks", "kinds", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, value: list[int]) -> list[int]:
        if not value or any(r < 1 for r in value):
            raise ValueError("expected one or more ranks ≥ 1, e.g. 4,8")
        return sorted(set(value))

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"expected one or more of {', '.join(KINDS)}")
        return [k for k in KINDS if k in value]

    @model_validator(mode="after")
    def _has_validation(self) -> CalibrateConfig:
        if self.val_fraction <= 0:
            raise ValueError("calibration reports the validation FVU: val_fraction must be > 0")
        return self

    def train_config(self, store: str, out: str) -> TrainConfig:
        """The run of one set: the training options as given, on ``store``, into ``out``."""
        given = self.model_dump(include=set(TrainConfig.model_fields), exclude_unset=True)
        return TrainConfig.model_validate({**given, "store": store, "layer": self.layer, "out": out})


@dataclass(frozen=True)
class Cell:
    """One synthetic set: its law and where its store and run live."""

    kind: str
    r: int

    @property
    def name(self) -> str:
        return f"{self.kind}-r{self.r}"

    def store(self, out: Path) -> Path:
        return out / "sets" / self.name / "store.zarr"

    def run(self, out: Path) -> Path:
        return out / "runs" / self.name


def store_scale(
    store: ActivationStore, layer: int, max_rows: int, seed: int, typical_ratio: float
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(mean, std, rows used, atypical rows left out): float64 per-dimension moments of the typical
    rows among up to ``max_rows`` valid rows of ``layer``, read from the store's completed units in a
    seeded random order. Typical is training's rule (``bae.trainer.scale.typical_rows``): attention
    sinks would otherwise put their massive activations into every synthetic row."""
    import torch

    from bae.stores import RowFilter, iter_unit_rows
    from bae.trainer.scale import typical_rows

    if layer not in store.layers:
        raise BaeError(
            f"store {store.url} has no layer {layer} (layers: {', '.join(map(str, store.layers))})"
        )
    units = np.flatnonzero(store.done_mask())
    if len(units) == 0:
        raise BaeError(f"store {store.url} has no completed units")
    order = np.random.default_rng([seed, 0x5CA1E]).permutation(units)
    blocks, n = [], 0
    for _, x, _ in iter_unit_rows(store, layer, RowFilter(valid_only=True), order):
        blocks.append(np.asarray(x[: max_rows - n], np.float32))
        n += len(blocks[-1])
        if n >= max_rows:
            break
    x = np.concatenate(blocks) if blocks else np.zeros((0, store.d_model), np.float32)
    keep = typical_rows(torch.from_numpy(x), typical_ratio).numpy() if len(x) else np.zeros(0, bool)
    kept = x[keep].astype(np.float64)
    if len(kept) < 2:
        raise BaeError(f"store {store.url} layer {layer}: fewer than 2 valid rows to estimate its scale from")
    return kept.mean(0), kept.std(0, ddof=1), len(kept), len(x) - len(kept)


def write_set(
    path: Path, spec: SyntheticSpec, layer: int, rows: int, fingerprint: dict[str, Any]
) -> ActivationStore:
    """The synthetic store of ``spec`` at ``path``; its completed units are kept (resumable). Rows
    are float32, each its own document at position 0, all valid; unit u holds row stream u."""
    from bae.stores import ActivationStore, StoreLayout

    layout = StoreLayout(n_rows=rows, unit_rows=UNIT_ROWS, d_model=spec.d, layers=[layer], dtype="float32")
    attrs = {
        "config": fingerprint,
        "model": None,
        "tokenizer_fingerprint": None,
        "corpus_fingerprint": None,
        "context_length": None,
        "packing_mode": "synthetic",
        "n_docs": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    store = ActivationStore.create(str(path), layout, attrs)
    for unit in np.flatnonzero(~store.done_mask()):
        start, stop = store.unit_range(int(unit))
        states, _ = spec.sample(stop - start, stream=int(unit))
        index = np.arange(start, stop)
        store.write_unit(
            int(unit),
            {layer: states},
            token_ids=np.full(len(index), -1, np.int32),
            doc_ids=index,
            positions=np.zeros(len(index), np.int32),
            valid=np.ones(len(index), bool),
        )
    return store


def last_val_fvu(run: Path) -> float:
    """The run's last logged ``val_fvu`` (NaN when it never validated)."""
    from bae.trainer.loop import last_record_with  # torch and accelerate: not at CLI start-up

    return float(last_record_with(RunFolder.at(run).log, "val_fvu").get("val_fvu", math.nan))


def measure(
    store: ActivationStore, run: Path, config: CalibrateConfig, show_progress: bool
) -> dict[str, Any]:
    """The entropy estimates of the run's code over the set's rows (or ``config.split``), as one group."""
    from bae.pipeline.entropy.counts import ConstantKey, CountSpec, count_groups
    from bae.pipeline.entropy.estimates import estimate_columns
    from bae.pipeline.entropy.run import choose_pair_bits, resolve_models
    from bae.stores import RowFilter

    (model,) = resolve_models(store, [str(run)])
    row_filter = RowFilter.of(config, config.split)
    units = tuple(int(u) for u in np.flatnonzero(store.done_mask()))
    spec = CountSpec(
        store=store.url,
        checkpoint=str(run),
        layer=config.layer,
        row_filter=row_filter,
        group_key=ConstantKey(),
        units=units,
        joint=True,
        pair_bits=choose_pair_bits(store, model, row_filter, units, PAIR_BITS),
    )
    counts = count_groups(spec, None, show_progress, f"calibrate: {Path(store.url).parent.name}")
    if len(counts.keys) == 0:
        side = f"{config.split} split" if config.split else "set"
        raise BaeError(f"store {store.url}: no rows in the {side} to measure; raise --rows")
    columns = estimate_columns(counts, 0.95, spec.pair_bits)
    return {name: _scalar(np.asarray(col)[0]) for name, col in columns.items()}


def _scalar(value: Any) -> Any:
    """A numpy scalar as the Python value (ints stay ints, the verdict a string)."""
    return value.item() if isinstance(value, np.generic) else value


COLUMNS = (
    "kind",
    "r",
    "truth_bits",
    "reported_bits",
    "entropy_bits",
    "upper_bits",
    "joint_plugin_bits",
    "joint_bits",
    "joint_low",
    "joint_high",
    "verdict",
    "val_fvu",
    "fvu_floor",
    "weakest_share",
    "varying_bits",
    "code_bits",
    "n",
    "passed",
)


def judge(row: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Add the reported estimate (joint where resolved, else Σ H_b) and whether it is within tolerance."""
    reported = row["joint_bits"] if row["verdict"] == "resolved" else row["entropy_bits"]
    passed = bool(
        np.isfinite(reported) and abs(reported - row["truth_bits"]) <= tolerance * row["truth_bits"]
    )
    return {**row, "reported_bits": reported, "passed": passed}


def table_text(rows: list[dict[str, Any]]) -> str:
    """The table as aligned text (the numbers rounded to 2 decimals)."""
    shown = (
        ("kind", "kind"),
        ("r", "r"),
        ("truth", "truth_bits"),
        ("reported", "reported_bits"),
        ("ΣH_b", "entropy_bits"),
        ("upper", "upper_bits"),
        ("plug-in", "joint_plugin_bits"),
        ("joint [low, high]", "joint_bits"),
        ("verdict", "verdict"),
        ("val FVU", "val_fvu"),
        ("weakest bit", "weakest_share"),
        ("varying", "varying_bits"),
        ("pass", "passed"),
    )

    def cell(row: dict[str, Any], key: str) -> str:
        value = row[key]
        if key == "joint_bits":
            return f"{value:.2f} [{row['joint_low']:.2f}, {row['joint_high']:.2f}]"
        if key == "passed":
            return "pass" if value else "FAIL"
        if key == "val_fvu":
            return f"{value:.3f} ({row['fvu_floor']:.3f})"
        if key == "weakest_share":
            return f"{value:.2%}"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    header = [title + (" (floor)" if key == "val_fvu" else "") for title, key in shown]
    body = [[cell(row, key) for _, key in shown] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body])


def write_results(out: Path, rows: list[dict[str, Any]], config: CalibrateConfig) -> tuple[Path, Path]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: row[k] for k in COLUMNS} for row in rows])
    csv_path = atomic_write_text(out / "calibration.csv", buffer.getvalue())
    json_path = atomic_write_json(
        out / "calibration.json",
        {
            "config": config.model_dump(mode="json"),
            "passed": sum(row["passed"] for row in rows),
            "cells": len(rows),
            "rows": [
                {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in rows
            ],
        },
    )
    return csv_path, json_path


def run_calibrate(config: CalibrateConfig, show_progress: bool = True) -> list[dict[str, Any]]:
    """Build every set, train on it, measure it, and write and print the calibration table."""
    from bae.stores import ActivationStore  # zarr, torch: only when the command runs
    from bae.trainer.run import train

    source = ActivationStore.open(config.store)
    mean, std, used, atypical = store_scale(
        source, config.layer, config.stats_rows, config.seed, config.typical_ratio or 0.0
    )
    scale_digest = hashlib.sha256(np.concatenate([mean, std]).tobytes()).hexdigest()[:16]
    out = make_output_dir(config.out)
    rows = []
    for kind in config.kinds:
        for r in config.ranks:
            cell = Cell(kind, r)
            spec = SyntheticSpec.build(
                kind,
                r,
                mean,
                std,
                config.seed,
                noise_fraction=config.noise_fraction,
                p_sparse=config.sparse_p,
                q_flip=config.markov_q,
            )
            fingerprint = {
                "generator": "bae entropy calibrate",
                "kind": kind,
                "r": r,
                "rows": config.rows,
                "seed": config.seed,
                "noise_fraction": config.noise_fraction,
                "p": spec.p,
                "q": spec.q,
                "scale": {"store": source.url, "layer": config.layer, "rows": used, "digest": scale_digest},
            }
            store = write_set(cell.store(out), spec, config.layer, config.rows, fingerprint)
            train(config.train_config(store.url, str(cell.run(out))), show_progress)
            measured = measure(store, cell.run(out), config, show_progress)
            row = {
                "kind": kind,
                "r": r,
                "truth_bits": spec.entropy,
                **{k: measured.get(k, math.nan) for k in COLUMNS if k in measured},
                "val_fvu": last_val_fvu(cell.run(out)),
                "fvu_floor": spec.fvu_floor,
                "weakest_share": float(spec.bit_shares().min()),
            }
            for key in ("upper_bits", "joint_plugin_bits", "joint_bits", "joint_low", "joint_high"):
                row.setdefault(key, math.nan)
            rows.append(judge(row, config.tolerance))
    csv_path, json_path = write_results(out, rows, config)
    print(table_text(rows), flush=True)
    failed = [row for row in rows if not row["passed"]]
    passed = f"{len(rows) - len(failed)} of {len(rows)}"
    print_summary(
        "bae entropy calibrate",
        {
            "store": f"{source.url} layer {config.layer}: d={source.d_model}, scale from {used} typical "
            f"valid rows ({atypical} atypical left out)",
            "passed": f"{passed} cells within {config.tolerance:.0%} of the truth",
            "failed": ", ".join(
                f"{row['kind']} r={row['r']} ({row['reported_bits']:.2f} vs {row['truth_bits']:.2f} bits)"
                for row in failed
            )
            or "none",
            "measured": f"{'the ' + config.split + ' split of ' if config.split else 'all '}"
            f"{config.rows} rows of each set; FVU on the validation split",
            "reported": "joint_bits where the verdict is resolved, else Σ H_b",
            "table": f"{csv_path}, {json_path}",
        },
    )
    return rows
