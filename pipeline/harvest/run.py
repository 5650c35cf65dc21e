"""`bae harvest`: run a causal LM over a corpus and write chosen layers' hidden states to a store.

The plan (``plan.py``) is deterministic; rank ``r`` of ``W`` owns units ``u % W == r``; units recorded
done are skipped, which is all that resuming takes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from bae.common.console import human_bytes, human_count, print_summary, progress
from bae.common.devices import to_device
from bae.common.errors import BaeError
from bae.common.signals import StopRequest
from bae.common.urls import is_local, local_path
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.corpus import CorpusStream
from bae.pipeline.harvest.overlap import ForwardClock, OverlappedWriter, UnitBuffer
from bae.pipeline.harvest.plan import UnitPlan, forward_batches, plan_units
from bae.pipeline.harvest.windows import Tokenized, Window, tokenize_corpus
from bae.pipeline.llm.capture import LayerCapture, Site, check_layers
from bae.pipeline.llm.load import LoadedModel, load_model, tokenizer_fingerprint
from bae.pipeline.llm.sites import probe_sites, resolve_sites
from bae.stores import ActivationStore, StoreLayout
from bae.stores.claims import UnitClaims, leased_units
from bae.stores.layout import ROW_ARRAYS, ROW_FILL
from bae.stores.sites import site_lines


def check_free_space(out: str, needed: int) -> None:
    """Refuse, with the numbers, when a local store will not fit on its disk."""
    if not is_local(out):
        return
    path = Path(local_path(out)).resolve()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if needed > free:
        raise BaeError(
            f"store {out} needs {human_bytes(needed)} but only {human_bytes(free)} is free on its disk; "
            "free space, lower --max-tokens, pick fewer layers, or write elsewhere"
        )


WINDOW_FIELDS = {"token_ids": "input_ids", "doc_ids": "doc_ids", "positions": "positions", "valid": "valid"}


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


class UnitForwards:
    """Runs a unit's windows through the capture hooks, batch by batch, into a host buffer, and
    writes a filled buffer to the store (on the writer thread)."""

    def __init__(
        self,
        store: ActivationStore,
        plan: UnitPlan,
        capture: LayerCapture,
        loaded: LoadedModel,
        cfg: HarvestConfig,
    ):
        self.store, self.plan, self.capture, self.cfg = store, plan, capture, cfg
        self.device = loaded.model.device
        self.clock = ForwardClock(self.device)
        pad = loaded.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def _forward(self, batch: list[Window]) -> dict[int, torch.Tensor]:
        longest = max(len(w.input_ids) for w in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for j, win in enumerate(batch):
            ids[j, : len(win.input_ids)] = torch.from_numpy(win.input_ids)
            mask[j, : len(win.input_ids)] = 1
        attention = None if bool(mask.all()) else to_device(mask, self.device)
        with self.clock.forward():
            return self.capture.run(to_device(ids, self.device), attention)

    def fill(self, unit: int, buffer: UnitBuffer) -> None:
        """Compute one unit into ``buffer``: each batch's kept rows are gathered on the device and
        copied to the host (asynchronously into pinned memory on CUDA); rows past the unit's
        windows are zero."""
        offset = 0
        for batch in forward_batches(self.plan.unit_windows(unit), self.cfg.batch_tokens):
            captured = self._forward(batch)
            longest = next(iter(captured.values())).shape[1]
            kept = torch.cat([torch.from_numpy(w.keep) + j * longest for j, w in enumerate(batch)])
            span = slice(offset, offset + len(kept))
            on_device: dict[torch.device, torch.Tensor] = {}  # kept rows' indices, per device of the sites
            for layer, hidden in captured.items():
                if hidden.device not in on_device:
                    on_device[hidden.device] = to_device(kept, hidden.device)
                index = on_device[hidden.device]
                rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).float()
                # the unit's CUDA event (OverlappedWriter.submit) covers copies on this device's stream;
                # a site on another GPU (--device-map) is copied synchronously
                copy_async = hidden.device.type == "cuda" and hidden.device == self.device
                buffer.values[layer][span].copy_(rows, non_blocking=copy_async)
            offset += len(kept)
        for values in buffer.values.values():
            values[offset:].zero_()

    def write(self, unit: int, buffer: UnitBuffer) -> int:
        """Write a filled unit and record it done; returns the number of clamped values."""
        start, stop = self.store.unit_range(unit)
        windows = self.plan.unit_windows(unit)
        row_arrays = {}
        for name, field_name in WINDOW_FIELDS.items():
            column = np.full(stop - start, ROW_FILL[name], dtype=ROW_ARRAYS[name])
            kept = np.concatenate([getattr(w, field_name)[w.keep] for w in windows])
            column[: len(kept)] = kept
            row_arrays[name] = column
        layers = {layer: values[: stop - start] for layer, values in buffer.values.items()}
        return self.store.write_unit(unit, layers=layers, **row_arrays)


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
            ActivationStore.create(cfg.out, layout, attrs, documents, cfg.storage_options)
        except BaeError as exc:
            error = [str(exc)]
    if state.num_processes > 1:
        state.wait_for_everyone()
        broadcast_object_list(error, from_process=0)
    if error[0]:
        raise BaeError(error[0])
    return ActivationStore.open(cfg.out, mode="r+", storage_options=cfg.storage_options)


def _pending_bytes(cfg: HarvestConfig, layout: StoreLayout) -> int:
    try:
        done = ActivationStore.open(cfg.out, storage_options=cfg.storage_options).done_mask()
    except BaeError:
        done = np.zeros(layout.n_units, dtype=bool)
    pending = sum(layout.unit_range(int(u))[1] - layout.unit_range(int(u))[0] for u in np.flatnonzero(~done))
    return int(pending) * layout.bytes_per_row


@dataclass
class Prepared:
    """A harvest made ready: the corpus, the model, its windows, the unit plan and the store layout."""

    corpus: CorpusStream  # read as far as the windows needed
    loaded: LoadedModel
    layers: list[int]
    tokens: Tokenized
    plan: UnitPlan
    layout: StoreLayout
    sites: list[Site] = field(default_factory=list)
    site_records: list[dict[str, Any]] = field(default_factory=list)


def prepare(cfg: HarvestConfig, state: PartialState) -> Prepared:
    """List the corpus, load the model, tokenize the documents as they are read (up to the token
    budget), plan units and lay out the store."""
    corpus = CorpusStream(cfg.corpus, cfg.text_field, cfg.line_docs, cfg.encoding_errors, cfg.storage_options)
    # PartialState sets its device on creation
    loaded = load_model(cfg.model, cfg.model_dtype, cast(torch.device, state.device), cfg.device_map)
    requested = cfg.layers if cfg.layers is not None else ([] if cfg.hooks else [loaded.n_layers // 2])
    layers = check_layers(requested, loaded.n_layers) if requested or not cfg.hooks else []
    sites = resolve_sites(loaded.model, cfg.hooks)
    site_records = probe_sites(loaded.model, sites, loaded.d_model)
    if loaded.max_positions is not None and cfg.context_length > loaded.max_positions:
        raise BaeError(
            f"context_length {cfg.context_length} exceeds the model's maximum "
            f"of {loaded.max_positions} positions"
        )
    tokens = tokenize_corpus(
        loaded.tokenizer,
        corpus.texts(),
        cfg.context_length,
        cfg.mode,
        cfg.bos,
        cfg.positions,
        cfg.token_budget,
    )
    if not tokens.windows:
        raise BaeError(
            f"positions {cfg.positions!r} select no tokens of this corpus (context {cfg.context_length})"
        )
    plan = plan_units(tokens.windows, cfg.rows_per_unit)
    layout = StoreLayout(
        n_rows=plan.n_rows,
        unit_rows=plan.unit_rows,
        d_model=loaded.d_model,
        layers=layers + [site.layer for site in sites],
        dtype=cfg.store_dtype,
        overflow=cfg.overflow,
        compressor={"name": "zstd", "level": 3} if cfg.compressor == "zstd" else None,
    )
    return Prepared(corpus, loaded, layers, tokens, plan, layout, sites, site_records)


def store_attrs(cfg: HarvestConfig, prepared: Prepared) -> dict[str, Any]:
    """What the store records about how it was made (compared on resume)."""
    loaded = prepared.loaded
    return {
        "config": cfg.recorded(),
        "model": {"id": loaded.model_id, "revision": loaded.revision, "weights": loaded.weights},
        "compute_dtype": str(loaded.model.dtype).removeprefix("torch."),
        "tokenizer_fingerprint": tokenizer_fingerprint(loaded.tokenizer),
        "corpus_fingerprint": prepared.corpus.fingerprint,
        "context_length": cfg.context_length,
        "packing_mode": cfg.mode,
        "n_tokens": prepared.tokens.n_tokens,
        **({"sites": prepared.site_records} if prepared.site_records else {}),
    }


@dataclass
class Progress:
    """What this process wrote so far (counted by the writer thread as units are recorded done)."""

    written: int = 0
    clamped: int = 0
    tokens: int = 0
    bytes: int = 0
    elsewhere: int = 0  # units other processes finished meanwhile (claims)
    clock: ForwardClock | None = None  # how long the forwards kept the device busy


def write_pending(
    cfg: HarvestConfig,
    prepared: Prepared,
    store: ActivationStore,
    pending: list[int],
    bar: Any,
    claims: UnitClaims | None = None,
) -> tuple[Progress, bool]:
    """Write units until done or a stop signal; (progress, interrupted). Without ``claims`` the units
    are ``pending`` (a torchrun rank's static share); with them, whatever this process claims. Each
    unit's forwards run here while the previous unit is written on the writer thread; a unit's lease
    is held until its write is recorded."""
    done = Progress()
    plan, layout = prepared.plan, prepared.layout
    capture = LayerCapture(prepared.loaded.model, prepared.layers, prepared.sites)
    with capture, StopRequest() as stop, bar:
        forwards = UnitForwards(store, plan, capture, prepared.loaded, cfg)

        def write(unit: int, buffer: UnitBuffer) -> None:
            done.clamped += forwards.write(unit, buffer)
            start, end = store.unit_range(unit)
            done.written += 1
            done.tokens += plan.unit_tokens(unit)
            done.bytes += (end - start) * layout.bytes_per_row
            bar.update(plan.unit_tokens(unit))
            bar.set_postfix_str(f"{human_bytes(done.bytes)} written", refresh=False)

        def finished_elsewhere(units: list[int]) -> None:
            done.elsewhere += len(units)
            bar.update(sum(plan.unit_tokens(u) for u in units))

        writer = OverlappedWriter(write, layout.unit_rows, layout.d_model, layout.layers, forwards.device)

        def done_mask() -> np.ndarray:  # claims poll it: units handed to the writer count once written
            writer.drain()
            return store.done_mask()

        units = leased_units(pending, claims, done_mask, store.is_done, stop, finished_elsewhere)
        with writer, contextlib.closing(units):  # closed on an error too: held leases are released
            for unit, lease in units:
                held = contextlib.ExitStack()
                held.enter_context(lease)
                try:
                    buffer = writer.buffer()
                    forwards.fill(unit, buffer)
                except BaseException:
                    held.close()
                    raise
                writer.submit(unit, buffer, held)
        done.clock = forwards.clock
    return done, bool(stop.signum) and not store.done_mask()[pending].all()


def harvest_summary(
    cfg: HarvestConfig, prepared: Prepared, store: ActivationStore, done: Progress, counts: dict[str, Any]
) -> dict[str, Any]:
    """The one-screen summary of a harvest."""
    loaded, tokens, corpus = prepared.loaded, prepared.tokens, prepared.corpus
    seconds = counts["seconds"]
    return {
        "store": cfg.out,
        "model": f"{loaded.model_id} ({str(loaded.model.dtype).removeprefix('torch.')})",
        "layers": (", ".join(map(str, prepared.layers)) or "none") + f" of 0..{loaded.n_layers}",
        **({"sites": site_lines(prepared.site_records)} if prepared.site_records else {}),
        "mode": f"{cfg.mode}, context {cfg.context_length}, positions {cfg.positions}",
        "documents": f"{tokens.n_docs_used} used of {corpus.n_read} read ({corpus.n_empty} empty skipped, "
        f"{tokens.n_truncated} truncated, {corpus.n_replaced} bytes replaced)"
        + ("" if corpus.exhausted else "; the token budget ended the reading"),
        "rows": f"{human_count(store.n_rows)} in {store.n_units} units of {store.unit_rows}",
        "units": f"{done.written} written now, {counts['skipped']} were done, "
        f"{done.elsewhere} written by other processes, {int(store.done_mask().sum())}/{store.n_units} done",
        "tokens": f"{human_count(done.tokens)} in {seconds:.1f} s "
        f"({human_count(done.tokens / max(seconds, 1e-9))} tok/s)",
        **(done.clock.summary(seconds) if done.clock and done.written else {}),
        "written": human_bytes(done.bytes),
        "clamped values": done.clamped,
        "elapsed": f"{counts['elapsed']:.1f} s",
    }


def run_harvest(cfg: HarvestConfig, show_progress: bool = True) -> HarvestResult:
    """Plan, create or resume the store, and write this process's pending units."""
    began = time.perf_counter()
    state = process_state()
    prepared = prepare(cfg, state)
    if state.is_main_process:
        check_free_space(cfg.out, _pending_bytes(cfg, prepared.layout))
    store = _open_store(
        cfg, state, prepared.layout, store_attrs(cfg, prepared), prepared.corpus.metadata_columns()
    )
    done_mask = store.done_mask()
    mine = [u for u in range(store.n_units) if u % state.num_processes == state.process_index]
    pending = [u for u in mine if not done_mask[u]]
    # independent processes (not torchrun ranks) on a local store share its units by leases
    claims = None
    if pending and state.num_processes == 1 and is_local(cfg.out):
        claims = UnitClaims(Path(local_path(cfg.out)), cfg.lease_seconds)
    bar = progress(
        sum(prepared.plan.unit_tokens(u) for u in pending),
        f"harvest rank {state.process_index}" if state.num_processes > 1 else "harvest",
        unit="tok",
        disable=not show_progress or not state.is_main_process,
    )
    t0 = time.perf_counter()
    done, interrupted = write_pending(cfg, prepared, store, pending, bar, claims)
    seconds = time.perf_counter() - t0
    if not interrupted and state.num_processes > 1:
        state.wait_for_everyone()
    counts = {"seconds": seconds, "skipped": len(mine) - len(pending), "elapsed": time.perf_counter() - began}
    return HarvestResult(
        store=store,
        units_written=done.written,
        units_skipped=len(mine) - len(pending),
        tokens=done.tokens,
        bytes_written=done.bytes,
        seconds=seconds,
        clamped=done.clamped,
        interrupted=interrupted,
        summary=harvest_summary(cfg, prepared, store, done, counts),
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
