"""``bae evaluate``: run the LLM over held-out documents with each checkpoint's reconstruction spliced in
at its layer, and with the layer zeroed or set to its mean, and report what that costs (docs/evaluate.md).

Work is cut into units of whole windows; rank ``r`` of ``W`` (``torchrun``) takes units ``u % W == r``,
and independent processes on one ``--out`` share them by leases (``bae.stores.claims``).
A unit's result is one small file per job — the layer's ablations (once per layer and documents, for
any checkpoint), or one checkpoint spliced in — written atomically under ``<out>/partials/<job>/``, a
directory named by a hash of everything that decides it: a killed run, re-run, computes only the
missing files, and a new checkpoint reuses the ablations. Rank 0 (every independent process, once all
units are done) merges the files into the table.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import transformers
from accelerate import PartialState

from bae.common.atomic_files import atomic_write_bytes, atomic_write_json
from bae.common.console import format_table, human_count, print_summary, progress
from bae.common.devices import resolve_device
from bae.common.signals import StopRequest
from bae.common.stats import FVU_DEFINITION
from bae.pipeline.evaluate.config import EVALUATE_JSON, EvaluateConfig
from bae.pipeline.evaluate.inputs import EvalWindow, Prepared, Target, fingerprint, prepare
from bae.pipeline.evaluate.metrics import (
    FvuSums,
    Partial,
    bootstrap_weights,
    doc_sums,
    fvu_of,
    interval,
    means,
    recovered,
)
from bae.pipeline.evaluate.plot import plot_recovered
from bae.pipeline.evaluate.splice import (
    CleanPass,
    Reference,
    clean_forward,
    log_probs,
    next_token_terms,
    resume,
    resume_site,
)
from bae.pipeline.harvest.plan import forward_batches
from bae.pipeline.harvest.windows import Window
from bae.stores.claims import LEASE_SECONDS, UnitClaims, units_to_compute

LOGIT_ROWS = 512  # rows whose [rows, vocabulary] log-probabilities are held at once
ABLATIONS = ("zero", "mean")


@dataclass(frozen=True, eq=False)
class Job:
    """One per-unit result: a layer's ablations (``target`` None) or one checkpoint spliced in."""

    key: str
    layer: int
    target: Target | None = None

    def path(self, out: Path, unit: int) -> Path:
        return out / "partials" / self.key / f"unit-{unit:08d}.npz"


def plan_jobs(prepared: Prepared, cfg: EvaluateConfig) -> list[Job]:
    """The ablations of every layer, then every checkpoint."""
    jobs = []
    for layer in prepared.layers:
        mean = prepared.means[layer].cpu().numpy().tobytes()
        key = fingerprint({"run": prepared.fingerprint, "layer": layer, "mean": mean.hex()})
        jobs.append(Job(f"ablations-layer{layer}-{key}", layer))
    for t in prepared.targets:
        key = fingerprint(
            {"run": prepared.fingerprint, "weights": t.digest, "layer": t.layer, "keep": cfg.keep_atypical}
        )
        jobs.append(Job(f"checkpoint-{key}", t.layer, t))
    return jobs


def replaced(hidden: torch.Tensor, rows: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """``hidden`` with the ``rows`` mask set to ``value`` (rows [n, d], one vector [d], or a number)."""
    out = hidden.clone()
    out[rows] = torch.as_tensor(value, dtype=hidden.dtype, device=hidden.device)
    return out


@dataclass
class Batch:
    """A forward batch: padded ids and masks [B, T], and per measured row its document and next token."""

    ids: torch.Tensor
    attention: torch.Tensor | None
    splice: torch.Tensor
    measure: torch.Tensor
    targets: torch.Tensor
    docs: np.ndarray

    @classmethod
    def of(cls, windows: list[EvalWindow], pad_id: int, device: torch.device) -> Batch:
        longest = max(len(w.input_ids) for w in windows)

        def padded(values: list[np.ndarray], fill: int | bool) -> np.ndarray:
            return np.stack([np.pad(v, (0, longest - len(v)), constant_values=fill) for v in values])

        real = padded([np.ones(len(w.input_ids), bool) for w in windows], False)
        measure = padded([w.measure for w in windows], False)
        return cls(
            ids=torch.from_numpy(padded([w.input_ids.astype(np.int64) for w in windows], pad_id)).to(device),
            attention=None if real.all() else torch.from_numpy(real.astype(np.int64)).to(device),
            splice=torch.from_numpy(padded([w.splice for w in windows], False)).to(device),
            measure=torch.from_numpy(measure).to(device),
            targets=torch.from_numpy(padded([w.targets() for w in windows], -1)[measure]).to(device),
            docs=padded([w.doc_ids for w in windows], -1)[measure],
        )


@dataclass
class UnitRows:
    """Per measured row of a unit: its document, whether it has a next token, and each variant's terms."""

    docs: list[np.ndarray] = field(default_factory=list)
    has_target: list[np.ndarray] = field(default_factory=list)
    terms: dict[tuple[str, str], list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def add(self, key: tuple[str, str], terms: dict[str, torch.Tensor]) -> None:
        self.terms.setdefault(key, []).append({k: v.double().cpu().numpy() for k, v in terms.items()})

    def sums(self, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        parts = self.terms[key]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return doc_sums(np.concatenate(self.docs), joined, np.concatenate(self.has_target))


class UnitEvaluator:
    """Computes the missing jobs of one unit, batch by batch."""

    def __init__(self, prepared: Prepared, cfg: EvaluateConfig):
        self.prepared, self.cfg = prepared, cfg
        self.model = prepared.loaded.model
        pad = prepared.loaded.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def resume(self, clean: CleanPass, layer: int, value: torch.Tensor) -> torch.Tensor:
        """Final hidden states with store layer ``layer`` (a ``hidden_states`` index or a hook site) set
        to ``value``."""
        at = self.prepared.sites.get(layer)
        if at is None:
            return resume(self.model, clean, layer, value)
        return resume_site(self.model, clean, at, value)

    def finals(
        self, job: Job, clean: CleanPass, batch: Batch, fvu: dict[str, FvuSums]
    ) -> dict[str, torch.Tensor]:
        """Final hidden states at the measured rows of each variant of ``job``."""
        h = clean.state(job.layer)
        if job.target is None:
            values = {"zero": 0.0, "mean": self.prepared.means[job.layer]}
            return {
                name: self.resume(clean, job.layer, replaced(h, batch.splice, values[name]))[batch.measure]
                for name in ABLATIONS
            }
        autoencoder = job.target.model
        x = h[batch.splice].float()
        with torch.inference_mode():
            recon = autoencoder.reconstruct(autoencoder.analyse(x).decoder_input).float()
            typical = autoencoder.typical_raw(x)
        measured = batch.measure[batch.splice]
        fvu[job.key].add(x[measured], recon[measured], None if typical is None else typical[measured])
        if self.cfg.keep_atypical and typical is not None:
            recon = torch.where(typical[:, None], recon, x)
        return {"spliced": self.resume(clean, job.layer, replaced(h, batch.splice, recon))[batch.measure]}

    def run(self, unit: int, jobs: list[Job]) -> dict[Job, Partial]:
        rows = UnitRows()
        d = self.prepared.loaded.d_model
        fvu = {job.key: FvuSums(d) for job in jobs if job.target is not None}
        sites = self.prepared.sites
        first = min(sites[job.layer].block if job.layer in sites else job.layer for job in jobs)
        hooked = [sites[layer].site for layer in {job.layer for job in jobs} if layer in sites]
        for windows in forward_batches(list[Window](self.prepared.unit_windows(unit)), self.cfg.batch_tokens):
            batch = Batch.of(cast(list[EvalWindow], windows), self.pad_id, self.model.device)
            clean = clean_forward(self.model, batch.ids, batch.attention, first, hooked)
            finals = {
                (job.key, name): f for job in jobs for name, f in self.finals(job, clean, batch, fvu).items()
            }
            clean_final = clean.final[batch.measure]
            rows.docs.append(batch.docs)
            rows.has_target.append((batch.targets >= 0).cpu().numpy())
            with torch.inference_mode():
                for a in range(0, len(clean_final), LOGIT_ROWS):
                    part = slice(a, a + LOGIT_ROWS)
                    reference = Reference.of(log_probs(self.model, clean_final[part]))
                    ce = reference.ce(batch.targets[part])
                    rows.add(
                        ("clean", "clean"),
                        {"ce": ce, "kl": torch.zeros_like(ce), "jsd": torch.zeros_like(ce)},
                    )
                    for key, final in finals.items():
                        terms = next_token_terms(
                            reference, log_probs(self.model, final[part]), batch.targets[part]
                        )
                        rows.add(key, terms)
        results = {}
        for job in jobs:
            names = ("clean", *ABLATIONS) if job.target is None else ("spliced",)
            variants = {}
            for name in names:
                docs, variants[name] = rows.sums(("clean", "clean") if name == "clean" else (job.key, name))
            extras = fvu[job.key].extras() if job.key in fvu else {}
            results[job] = Partial(docs, variants, extras)
        return results


def _clean(value: Any) -> Any:
    """JSON/CSV-ready: numpy scalars as Python numbers, NaN as None."""
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def measure_row(
    base: dict[str, Any],
    ablations: dict[str, dict[str, np.ndarray]],
    variant: dict[str, np.ndarray],
    confidence: float,
) -> dict[str, Any]:
    """One table row: CE clean/spliced/ablated, CE recovered (vs zero and mean ablation), KL, JSD,
    each estimate with its bootstrap interval over documents."""
    clean, zero, mean = (ablations[k] for k in ("clean", "zero", "mean"))
    rec = recovered(zero["ce"], variant["ce"], clean["ce"])
    row = {
        **base,
        "ce_clean": clean["ce"][0],
        "ce_spliced": variant["ce"][0],
        "ce_zero": zero["ce"][0],
        "ce_mean": mean["ce"][0],
        "ce_recovered": rec[0],
    }
    row["ce_recovered_low"], row["ce_recovered_high"] = interval(rec[1:], confidence)
    row["ce_recovered_vs_mean"] = recovered(mean["ce"], variant["ce"], clean["ce"])[0]
    for name in ("kl", "jsd"):
        row[name] = variant[name][0]
        row[f"{name}_low"], row[f"{name}_high"] = interval(variant[name][1:], confidence)
    return {k: _clean(v) for k, v in row.items()}


def table_rows(
    prepared: Prepared, cfg: EvaluateConfig, jobs: list[Job], merged: dict[str, Partial]
) -> list[dict[str, Any]]:
    """Per layer: the zero and mean ablation, then each checkpoint spliced in."""
    rows = []
    for ablation in (j for j in jobs if j.target is None):
        part = merged[ablation.key]
        weights = bootstrap_weights(len(part.docs), cfg.bootstrap, cfg.bootstrap_seed)
        found = {name: means(sums, weights) for name, sums in part.variants.items()}
        counts = part.variants["clean"].sum(0)
        base = {
            "layer": ablation.layer,
            "documents": len(part.docs),
            "tokens": int(counts[0]),
            "ce_tokens": int(counts[1]),
        }
        for name in ABLATIONS:
            row = {"name": f"{name}@{ablation.layer}", "kind": f"{name} ablation", **base}
            rows.append(
                {
                    **measure_row(row, found, found[name], cfg.confidence),
                    "fvu": None,
                    "atypical_rows": None,
                    "checkpoint": None,
                }
            )
        for job in (j for j in jobs if j.layer == ablation.layer and j.target is not None):
            target = cast(Target, job.target)
            spliced = merged[job.key]
            assert np.array_equal(spliced.docs, part.docs), (
                "a checkpoint and its ablations saw other documents"
            )
            row = {"name": target.name, "kind": target.model.architecture, **base}
            row = measure_row(row, found, means(spliced.variants["spliced"], weights), cfg.confidence)
            row.update(
                fvu=_clean(fvu_of(spliced.extras)),
                atypical_rows=int(spliced.extras["atypical_rows"]),
                checkpoint=target.path,
            )
            rows.append(row)
    return rows


def write_tables(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``evaluate.csv`` and ``evaluate.parquet``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    paths = []
    for suffix, write in ((".csv", pacsv.write_csv), (".parquet", pq.write_table)):
        buffer = io.BytesIO()
        write(table, buffer)
        paths.append(atomic_write_bytes(out / f"evaluate{suffix}", buffer.getvalue()))
    return paths


SCREEN = ("name", "kind", "layer", "ce_spliced", "ce_recovered", "kl", "jsd", "fvu")


def screen_table(rows: list[dict[str, Any]]) -> str:
    """The summary table: the main columns, intervals in brackets, 4 significant digits."""

    def cell(row: dict[str, Any], column: str) -> Any:
        value = row.get(column)
        if not isinstance(value, float):
            return value
        low, high = row.get(f"{column}_low"), row.get(f"{column}_high")
        return f"{value:.4g}" + (f" [{low:.4g}, {high:.4g}]" if low is not None and high is not None else "")

    return format_table([{c: cell(r, c) for c in SCREEN} for r in rows])


@dataclass
class EvaluateResult:
    """What a run did: the table rows (rank 0), whether it was interrupted, the summary."""

    rows: list[dict[str, Any]]
    interrupted: bool
    units_computed: int
    tokens_per_second: float = math.nan  # of the units this rank computed
    summary: dict[str, Any] = field(default_factory=dict)


def compute_pending(
    prepared: Prepared, cfg: EvaluateConfig, jobs: list[Job], state: PartialState, show_progress: bool
) -> tuple[int, int, float, bool]:
    """This rank's units with a missing job file: (units computed, tokens, seconds, interrupted).
    Independent processes (not torchrun ranks) on one ``--out`` share the units by leases."""
    out = Path(cfg.out)

    def missing(unit: int) -> list[Job]:
        return [j for j in jobs if not j.path(out, unit).is_file()]

    def done_mask() -> np.ndarray:
        return np.array([not missing(u) for u in range(len(prepared.units))], dtype=bool)

    mine = range(state.process_index, len(prepared.units), state.num_processes)
    pending = [u for u in mine if missing(u)]
    bar = progress(
        sum(prepared.unit_tokens(u) for u in pending),
        f"evaluate rank {state.process_index}" if state.num_processes > 1 else "evaluate",
        unit="tok",
        disable=not show_progress or not state.is_main_process,
    )
    claims = UnitClaims(out / "partials", LEASE_SECONDS) if pending and state.num_processes == 1 else None
    evaluator = UnitEvaluator(prepared, cfg)
    done, tokens, began = 0, 0, time.perf_counter()
    with StopRequest() as stop, bar:

        def elsewhere(units: list[int]) -> None:
            bar.update(sum(prepared.unit_tokens(u) for u in units))

        units = units_to_compute(pending, claims, done_mask, lambda u: not missing(u), stop, elsewhere)
        with contextlib.closing(units):  # closed on an error too: the held lease is released
            for unit in units:
                for job, partial in evaluator.run(unit, missing(unit)).items():
                    partial.save(job.path(out, unit))
                done, tokens = done + 1, tokens + prepared.unit_tokens(unit)
                bar.update(prepared.unit_tokens(unit))
    return done, tokens, time.perf_counter() - began, bool(stop.signum) and any(missing(u) for u in pending)


def process_device(spec: str) -> tuple[PartialState, torch.device]:
    """This process's accelerate state and the device it computes on: ``auto`` takes accelerate's
    (under torchrun each process its own GPU), any other spelling is resolved and used as given."""
    if spec.strip().lower() == "auto":
        state = PartialState(cpu=not torch.cuda.is_available())
        return state, cast(torch.device, state.device)
    device = resolve_device(spec)
    return PartialState(cpu=device.type != "cuda"), device


def run_evaluate(cfg: EvaluateConfig, show_progress: bool = True, quiet: bool = False) -> EvaluateResult:
    """Compute this rank's missing units; on rank 0 merge every unit and write the outputs."""
    began = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    state, device = process_device(cfg.device)
    prepared = prepare(cfg, device)
    jobs = plan_jobs(prepared, cfg)
    done, tokens, seconds, interrupted = compute_pending(prepared, cfg, jobs, state, show_progress)
    rate = tokens / seconds if done else math.nan
    if interrupted:
        return EvaluateResult([], True, done, rate)
    if state.num_processes > 1:
        state.wait_for_everyone()
    if not state.is_main_process:
        return EvaluateResult([], False, done, rate)
    out = Path(cfg.out)
    units = range(len(prepared.units))
    merged = {job.key: Partial.merge([Partial.load(job.path(out, u)) for u in units]) for job in jobs}
    rows = table_rows(prepared, cfg, jobs, merged)
    csv_path, parquet_path = write_tables(rows, out)
    plot = plot_recovered(rows, out / "evaluate.png")
    summary = {
        "model": f"{prepared.loaded.model_id} ({str(prepared.loaded.model.dtype).removeprefix('torch.')})",
        "documents": f"{prepared.n_docs}: {prepared.held_out}",
        "tokens": f"{human_count(sum(len(w.input_ids) for w in prepared.windows))} in "
        f"{len(prepared.units)} units, measured at {cfg.positions} valid positions",
        "units": f"{done} of {len(prepared.units)} computed now by rank 0 of {state.num_processes}, "
        "the rest reused or computed by other ranks",
        "speed": f"{human_count(rate)} tok/s" if done else "nothing computed",
        "FVU": FVU_DEFINITION,
        "table": f"{csv_path}, {parquet_path}",
        "plot": str(plot),
        "elapsed": f"{time.perf_counter() - began:.1f} s",
    }
    atomic_write_json(
        out / EVALUATE_JSON, {"config": cfg.model_dump(mode="json"), "rows": rows, "summary": summary}
    )
    if not quiet:
        print(screen_table(rows))
        print_summary(f"bae evaluate -> {out}", summary)
    return EvaluateResult(rows, False, done, rate, summary)


def evaluate_command(cfg: EvaluateConfig, show_progress: bool = True) -> int:
    """``bae evaluate`` as the CLI runs it: exit status 130 when interrupted."""
    result = run_evaluate(cfg, show_progress)
    if result.interrupted:
        print(
            f"interrupted: {result.units_computed} units computed; they are recorded, re-run the same "
            "command to resume",
            flush=True,
        )
        return 130
    return 0
