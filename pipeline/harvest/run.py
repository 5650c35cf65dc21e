"""`bae harvest`: run a causal LM over a corpus and write chosen layers' hidden states to a store.

The plan is deterministic: the tokenised corpus gives windows in order, windows are packed whole
into units of ``unit_rows`` rows (a unit's unused tail is invalid filler), and each unit is run in
forward batches of at most ``batch_tokens`` tokens that never span units, so a unit's values do not
depend on which other units are already done or which process computes them. Rank ``r`` of ``W``
owns units ``u % W == r``; units recorded done are skipped, which is all that resuming takes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from pydantic import Field, field_validator

from bae.common.configs import StrictModel
from bae.common.console import human_bytes, human_count, print_summary, progress
from bae.common.errors import BaeError
from bae.common.signals import StopRequest
from bae.pipeline.harvest.corpus import BUILTIN, load_corpus
from bae.pipeline.harvest.windows import Positions, Window, parse_positions, tokenize_corpus
from bae.pipeline.llm.capture import LayerCapture, check_layers
from bae.pipeline.llm.load import LoadedModel, load_model, tokenizer_fingerprint
from bae.stores import ActivationStore, StoreLayout

DEFAULT_BUILTIN_TOKENS = 65_536
ROWS_PER_UNIT_TARGET = 4096


class HarvestConfig(StrictModel):
    """Everything that decides the contents of a harvested store, and where to write it."""

    output: str = Field("activations.zarr", description="store path or fsspec URL")
    model: str | None = Field(
        None, description="hub id, local directory or .gguf file; None = embedded SmolLM2"
    )
    model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="compute dtype; auto = bfloat16 on CUDA, float32 on CPU"
    )
    device_map: str | None = Field(None, description="accelerate device_map (e.g. 'auto') for large models")
    corpus: list[str] = Field(
        default_factory=list, description="files, directories, globs, saved datasets; empty = builtin"
    )
    text_field: str = Field("text", description="text field of JSON/JSONL/Parquet/dataset records")
    line_docs: bool = Field(False, description="plain text: one document per line")
    encoding_errors: Literal["strict", "replace"] = "strict"
    mode: Literal["packed", "document"] = "packed"
    context_length: int = Field(512, ge=2, description="tokens per forward window")
    bos: Literal["auto", "always", "never"] = Field("auto", description="start every window with BOS?")
    positions: Literal["all", "last"] | list[int] = Field("all", description="all | last | list of positions")
    layers: list[int] | None = Field(None, description="HF hidden_states indices; None = n_layers // 2")
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    overflow: Literal["error", "clamp"] = "error"
    compressor: Literal["none", "zstd"] = "none"
    unit_rows: int | None = Field(None, ge=1, description="rows per unit; None = ~4096, whole windows")
    batch_tokens: int = Field(8192, ge=1, description="token budget of one forward batch")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description=f"stop after this many input tokens (builtin corpus default {DEFAULT_BUILTIN_TOKENS})",
    )

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, value: Any) -> Any:
        try:
            return parse_positions(value) if isinstance(value, (str, list, tuple)) else value
        except BaeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError("expected a comma-separated list of integers, e.g. 3,6,9") from None
        return value

    def recorded(self) -> dict[str, Any]:
        """The config as recorded in the store and compared on resume: all but the store's own
        location, so a store that was moved or copied still resumes."""
        return self.model_dump(mode="json", exclude={"output"})

    @property
    def uses_builtin(self) -> bool:
        return not self.corpus or self.corpus == [BUILTIN]

    @property
    def token_budget(self) -> int | None:
        if self.max_tokens is None and self.uses_builtin:
            return DEFAULT_BUILTIN_TOKENS
        return self.max_tokens


@dataclass
class UnitPlan:
    """Units of whole windows: ``units[u]`` lists window indices; rows are concatenated kept rows."""

    windows: list[Window]
    unit_rows: int
    units: list[list[int]]

    @property
    def n_rows(self) -> int:
        return (len(self.units) - 1) * self.unit_rows + sum(self.windows[i].n_rows for i in self.units[-1])

    def unit_tokens(self, unit: int) -> int:
        return sum(len(self.windows[i].input_ids) for i in self.units[unit])


def plan_units(windows: list[Window], unit_rows: int) -> UnitPlan:
    """Pack windows in order into units of at most ``unit_rows`` rows, never splitting a window."""
    widest = max(w.n_rows for w in windows)
    if widest > unit_rows:
        raise BaeError(
            f"unit_rows {unit_rows} is smaller than a window's {widest} rows; use at least {widest}"
        )
    units: list[list[int]] = [[]]
    used = 0
    for i, win in enumerate(windows):
        if used + win.n_rows > unit_rows:
            units.append([])
            used = 0
        units[-1].append(i)
        used += win.n_rows
    return UnitPlan(windows, unit_rows, units)


def default_unit_rows(cfg: HarvestConfig) -> int:
    """~4096 rows, a whole number of full windows."""
    if cfg.unit_rows is not None:
        return cfg.unit_rows
    return max(cfg.context_length, ROWS_PER_UNIT_TARGET // cfg.context_length * cfg.context_length)


def forward_batches(windows: list[Window], batch_tokens: int) -> Iterator[list[Window]]:
    """Consecutive windows grouped so that ``count x longest`` stays within ``batch_tokens``."""
    batch: list[Window] = []
    longest = 0
    for win in windows:
        length = len(win.input_ids)
        if batch and (len(batch) + 1) * max(longest, length) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(win)
        longest = max(longest, length)
    if batch:
        yield batch


def check_free_space(output: str, needed: int) -> None:
    """Refuse, with the numbers, when a local store will not fit on its disk."""
    if "://" in output and not output.startswith("file://"):
        return
    path = Path(output.removeprefix("file://")).resolve()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if needed > free:
        raise BaeError(
            f"store {output} needs {human_bytes(needed)} but only {human_bytes(free)} is free on its disk; "
            "free space, lower --max-tokens, pick fewer layers, or write elsewhere"
        )


@dataclass
class HarvestResult:
    """What a run did, for the summary and the exit status."""

    store: ActivationStore
    units_written: int
    units_skipped: int
    tokens: int
    bytes_written: int
    seconds: float
    clamped: int
    interrupted: bool
    summary: dict[str, Any] = field(default_factory=dict)


class UnitWriter:
    """Runs a unit's windows through the capture hooks and writes the unit to the store."""

    def __init__(
        self, store: ActivationStore, plan: UnitPlan, capture: LayerCapture, loaded: LoadedModel, cfg
    ):
        self.store, self.plan, self.capture, self.cfg = store, plan, capture, cfg
        self.device = loaded.model.device
        pad = loaded.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def _forward(self, batch: list[Window]) -> dict[int, torch.Tensor]:
        longest = max(len(w.input_ids) for w in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for j, win in enumerate(batch):
            ids[j, : len(win.input_ids)] = torch.from_numpy(win.input_ids)
            mask[j, : len(win.input_ids)] = 1
        attention = None if bool(mask.all()) else mask.to(self.device)
        return self.capture.run(ids.to(self.device), attention)

    def write(self, unit: int) -> int:
        """Compute and write one unit; returns the number of clamped values."""
        start, stop = self.store.unit_range(unit)
        rows = stop - start
        d = self.store.d_model
        values = {layer: torch.zeros((rows, d), dtype=torch.float32) for layer in self.store.layers}
        row_arrays = {
            "token_ids": np.full(rows, -1, dtype=np.int32),
            "doc_ids": np.full(rows, -1, dtype=np.int64),
            "positions": np.full(rows, -1, dtype=np.int32),
            "valid": np.zeros(rows, dtype=bool),
        }
        windows = [self.plan.windows[i] for i in self.plan.units[unit]]
        offset = 0
        for batch in forward_batches(windows, self.cfg.batch_tokens):
            captured = self._forward(batch)
            for j, win in enumerate(batch):
                keep = torch.from_numpy(win.keep)
                span = slice(offset, offset + win.n_rows)
                for layer, hidden in captured.items():
                    values[layer][span] = hidden[j].index_select(0, keep.to(hidden.device)).float().cpu()
                row_arrays["token_ids"][span] = win.input_ids[win.keep]
                row_arrays["doc_ids"][span] = win.doc_ids[win.keep]
                row_arrays["positions"][span] = win.positions[win.keep]
                row_arrays["valid"][span] = win.valid[win.keep]
                offset += win.n_rows
        return self.store.write_unit(unit, layers=values, **row_arrays)


def process_state() -> PartialState:
    """This process's rank and world, from torchrun / accelerate launch (gloo on CPU-only machines)."""
    return PartialState(cpu=not torch.cuda.is_available())


def _open_store(
    cfg: HarvestConfig, state: PartialState, layout: StoreLayout, attrs: dict, documents: dict
) -> ActivationStore:
    """Rank 0 creates (or reopens, checking the config); the others open it after a barrier."""
    error = [None]
    if state.is_main_process:
        try:
            ActivationStore.create(cfg.output, layout, attrs=attrs, documents=documents)
        except BaeError as exc:
            error = [str(exc)]
    if state.num_processes > 1:
        state.wait_for_everyone()
        broadcast_object_list(error, from_process=0)
    if error[0]:
        raise BaeError(error[0])
    return ActivationStore.open(cfg.output, mode="r+")


def _pending_bytes(output: str, layout: StoreLayout) -> int:
    try:
        done = ActivationStore.open(output).done_mask()
    except BaeError:
        done = np.zeros(layout.n_units, dtype=bool)
    pending = sum(layout.unit_range(u)[1] - layout.unit_range(u)[0] for u in np.flatnonzero(~done))
    return int(pending) * layout.bytes_per_row


def run_harvest(cfg: HarvestConfig, show_progress: bool = True) -> HarvestResult:
    """Plan, create or resume the store, and write this process's pending units."""
    began = time.perf_counter()
    state = process_state()
    corpus = load_corpus(cfg.corpus, cfg.text_field, cfg.line_docs, cfg.encoding_errors)
    loaded = load_model(cfg.model, cfg.model_dtype, state.device, cfg.device_map)
    layers = check_layers(cfg.layers if cfg.layers is not None else [loaded.n_layers // 2], loaded.n_layers)
    if loaded.max_positions is not None and cfg.context_length > loaded.max_positions:
        raise BaeError(
            f"context_length {cfg.context_length} exceeds the model's maximum "
            f"of {loaded.max_positions} positions"
        )
    positions: Positions = cfg.positions
    tokens = tokenize_corpus(
        loaded.tokenizer,
        [doc.text for doc in corpus.docs],
        cfg.context_length,
        cfg.mode,
        cfg.bos,
        positions,
        cfg.token_budget,
    )
    if not tokens.windows:
        raise BaeError(
            f"positions {cfg.positions!r} select no tokens of this corpus (context {cfg.context_length})"
        )
    plan = plan_units(tokens.windows, default_unit_rows(cfg))
    layout = StoreLayout(
        n_rows=plan.n_rows,
        unit_rows=plan.unit_rows,
        d_model=loaded.d_model,
        layers=layers,
        dtype=cfg.store_dtype,
        overflow=cfg.overflow,
        compressor={"name": "zstd", "level": 3} if cfg.compressor == "zstd" else None,
    )
    attrs = {
        "config": cfg.recorded(),
        "model": {"id": loaded.model_id, "revision": loaded.revision},
        "compute_dtype": str(loaded.model.dtype).removeprefix("torch."),
        "tokenizer_fingerprint": tokenizer_fingerprint(loaded.tokenizer),
        "corpus_fingerprint": corpus.fingerprint,
        "context_length": cfg.context_length,
        "packing_mode": cfg.mode,
        "n_tokens": tokens.n_tokens,
    }
    if state.is_main_process:
        check_free_space(cfg.output, _pending_bytes(cfg.output, layout))
    store = _open_store(cfg, state, layout, attrs, corpus.metadata_columns())
    done = store.done_mask()
    mine = [u for u in range(store.n_units) if u % state.num_processes == state.process_index]
    pending = [u for u in mine if not done[u]]
    total_tokens = sum(plan.unit_tokens(u) for u in pending)
    written = clamped = n_tokens = n_bytes = 0
    bar = progress(
        total_tokens,
        f"harvest rank {state.process_index}" if state.num_processes > 1 else "harvest",
        unit="tok",
        disable=not show_progress or not state.is_main_process,
    )
    t0 = time.perf_counter()
    with LayerCapture(loaded.model, layers) as capture, StopRequest() as stop, bar:
        writer = UnitWriter(store, plan, capture, loaded, cfg)
        for unit in pending:
            if stop.signum:
                break
            clamped += writer.write(unit)
            start, end = store.unit_range(unit)
            written += 1
            n_tokens += plan.unit_tokens(unit)
            n_bytes += (end - start) * layout.bytes_per_row
            bar.update(plan.unit_tokens(unit))
            bar.set_postfix_str(f"{human_bytes(n_bytes)} written", refresh=False)
    seconds = time.perf_counter() - t0
    interrupted = bool(stop.signum) and written < len(pending)
    if not interrupted and state.num_processes > 1:
        state.wait_for_everyone()
    n_done = int(store.done_mask().sum())
    summary = {
        "store": cfg.output,
        "model": f"{loaded.model_id} ({attrs['compute_dtype']})",
        "layers": ", ".join(map(str, layers)) + f" of 0..{loaded.n_layers}",
        "mode": f"{cfg.mode}, context {cfg.context_length}, positions {cfg.positions}",
        "documents": f"{tokens.n_docs_used} used of {len(corpus.docs)} "
        f"({corpus.n_empty} empty skipped, {tokens.n_truncated} truncated, "
        f"{corpus.n_replaced} bytes replaced)",
        "rows": f"{human_count(store.n_rows)} in {store.n_units} units of {store.unit_rows}",
        "units": f"{written} written now, {len(mine) - len(pending)} were done, "
        f"{n_done}/{store.n_units} done",
        "tokens": f"{human_count(n_tokens)} in {seconds:.1f} s "
        f"({human_count(n_tokens / max(seconds, 1e-9))} tok/s)",
        "written": human_bytes(n_bytes),
        "clamped values": clamped,
        "elapsed": f"{time.perf_counter() - began:.1f} s",
    }
    return HarvestResult(
        store=store,
        units_written=written,
        units_skipped=len(mine) - len(pending),
        tokens=n_tokens,
        bytes_written=n_bytes,
        seconds=seconds,
        clamped=clamped,
        interrupted=interrupted,
        summary=summary,
    )


def harvest_command(cfg: HarvestConfig, show_progress: bool = True) -> int:
    """Run a harvest as the CLI does: summary on the main process, exit status 130 if interrupted."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()  # our own bar reports the harvest
    result = run_harvest(cfg, show_progress)
    state = process_state()
    if result.interrupted:
        print(
            f"interrupted: {result.units_written} units written by rank {state.process_index}; "
            "completed units are recorded, re-run the same command to resume",
            flush=True,
        )
        return 130
    if state.is_main_process:
        print_summary("bae harvest", result.summary)
    return 0
