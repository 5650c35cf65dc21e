"""What ``bae evaluate`` runs over: the checkpoints (checked against the store and the LLM), the held-out
windows cut exactly as the harvest cut them, the resumable units of documents, and each layer's mean.

The windows come from the store's recorded harvest config (the same tokenizer, mode, context and BOS
rule), so document ids, and with them the train/validation split, are the store's; ``--corpus``
replaces the documents, which are then all held out.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from transformers import PreTrainedModel

from bae.common.atomic_files import atomic_write_bytes
from bae.common.errors import BaeError
from bae.pipeline.analysis.checkpoint_match import load_for_store
from bae.pipeline.evaluate.config import EvaluateConfig
from bae.pipeline.evaluate.splice import SiteSplice
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.corpus import CorpusStream
from bae.pipeline.harvest.plan import plan_units
from bae.pipeline.harvest.windows import Window, tokenize_corpus
from bae.pipeline.llm.capture import Site, check_layers
from bae.pipeline.llm.load import LoadedModel, file_sha256, load_model
from bae.pipeline.llm.sites import site_block
from bae.stores import ActivationStore, RowFilter, iter_unit_rows, split_mask
from bae.stores.sites import store_sites
from bae.trainer import Autoencoder, load_autoencoder
from bae.trainer.models import CONFIG_FILE, WEIGHTS_FILE, resolve_model_dir

FORMAT_VERSION = 1  # bump when what a partial holds, or how it is computed, changes


@dataclass
class Target:
    """One checkpoint to splice in: a short name, its path, the model, its layer, a digest of its files."""

    name: str
    path: str
    model: Autoencoder
    layer: int
    digest: str


@dataclass
class EvalWindow(Window):
    """A harvest window (``keep`` = every token) with the rows replaced (``splice``: valid tokens at the
    chosen positions) and the rows measured (``measure``: those of held-out documents)."""

    splice: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    measure: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def targets(self) -> np.ndarray:
        """The next token of each row within its document, −1 where there is none."""
        same_doc = self.doc_ids[1:] == self.doc_ids[:-1]
        return np.append(np.where(same_doc, self.input_ids[1:], -1), -1).astype(np.int64)


@dataclass
class Prepared:
    """Everything a rank needs: the LLM, the checkpoints, the windows, their units and each layer's mean."""

    loaded: LoadedModel
    targets: list[Target]
    windows: list[EvalWindow]
    units: list[list[int]]
    means: dict[int, torch.Tensor]
    fingerprint: str  # everything that decides the windows, the model and the batches
    held_out: str  # how the documents were chosen, for the summary
    n_docs: int
    sites: dict[int, SiteSplice] = field(default_factory=dict)  # the hook sites among the layers

    @property
    def layers(self) -> list[int]:
        return sorted({t.layer for t in self.targets})

    def unit_windows(self, unit: int) -> list[EvalWindow]:
        return [self.windows[i] for i in self.units[unit]]

    def unit_tokens(self, unit: int) -> int:
        return sum(len(w.input_ids) for w in self.unit_windows(unit))


def checkpoint_names(paths: list[str]) -> list[str]:
    """Short unique names: the directory name, suffixed with its index if two clash."""
    names = [Path(p).resolve().name for p in paths]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def open_store(cfg: EvaluateConfig) -> ActivationStore:
    """``--store``, else the store the first checkpoint records."""
    if not cfg.checkpoints:
        raise BaeError("no checkpoint given: pass --checkpoint (repeatable) or set `checkpoints` in --config")
    url = cfg.store or load_autoencoder(cfg.checkpoints[0]).provenance.store
    if not url:
        raise BaeError(f"checkpoint {cfg.checkpoints[0]} records no store: pass --store")
    return ActivationStore.open(url)


def recorded_harvest(store: ActivationStore) -> HarvestConfig | None:
    """The harvest config a store records (None: the store was imported or made otherwise)."""
    try:
        return HarvestConfig.model_validate(store.meta.get("config") or {})
    except ValidationError:
        return None


def harvest_settings(cfg: EvaluateConfig, store: ActivationStore) -> HarvestConfig:
    """The store's harvest config with this run's model, dtype and corpus on top."""
    recorded = recorded_harvest(store)
    if recorded is None:
        if not cfg.corpus or cfg.model is None:
            raise BaeError(
                f"store {store.url} records no harvest (it was imported?): pass --model and --corpus"
            )
        recorded = HarvestConfig()
    update: dict[str, Any] = {"model": cfg.model or recorded.model}
    if cfg.model_dtype is not None:
        update["model_dtype"] = cfg.model_dtype
    if cfg.corpus:
        update.update(corpus=cfg.corpus, max_tokens=cfg.max_tokens, line_docs=False)
    if cfg.text_field is not None:
        update["text_field"] = cfg.text_field
    return recorded.model_copy(update=update)


def same_model(recorded: Any, loaded: LoadedModel) -> bool:
    """Whether a recorded ``{"id", "revision", "weights"}`` names the loaded model (True when nothing
    is recorded): by revision, else by weights fingerprint, else by id."""
    if not isinstance(recorded, dict):
        return True
    for key in ("revision", "weights"):  # a hub commit or a GGUF digest; a local directory's weights
        if recorded.get(key) and getattr(loaded, key):
            return recorded[key] == getattr(loaded, key)
    return recorded.get("id") in (None, loaded.model_id)


def splice_sites(
    store: ActivationStore, model: PreTrainedModel, targets: list[Target]
) -> dict[int, SiteSplice]:
    """The hook sites among the checkpoints' layers, each with the block it is spliced in."""
    records = store_sites(store)
    layers = sorted({t.layer for t in targets} & set(records))
    sites = [Site.of_record(records[layer]) for layer in layers]
    return {site.layer: SiteSplice(site, site_block(model, site)) for site in sites}


def load_targets(cfg: EvaluateConfig, store: ActivationStore, loaded: LoadedModel) -> list[Target]:
    """Each checkpoint, refused in one line if it belongs to another store, LLM, width or layer range."""
    targets = []
    for name, path in zip(checkpoint_names(cfg.checkpoints), cfg.checkpoints):
        model, layer = load_for_store(store, path, cfg.layer)
        try:
            if layer not in store_sites(store):
                check_layers([layer], loaded.n_layers)
        except BaeError as exc:
            raise BaeError(f"checkpoint {path}: {exc}") from None
        if model.config.d_model != loaded.d_model:
            raise BaeError(
                f"checkpoint {path} was trained on d_model={model.config.d_model} states, but model "
                f"{loaded.model_id} has d_model={loaded.d_model}"
            )
        recorded = model.provenance.model
        if not same_model(recorded, loaded):
            shown = recorded.get("id") if isinstance(recorded, dict) else recorded
            raise BaeError(
                f"checkpoint {path} was trained on states of model {shown}, not {loaded.model_id}; "
                "pass the model its store was harvested with (--model)"
            )
        directory = resolve_model_dir(path)
        digest = file_sha256(directory / WEIGHTS_FILE) + file_sha256(directory / CONFIG_FILE)
        targets.append(Target(name, path, model.to(loaded.model.device), layer, digest))
    return targets


def split_of(targets: list[Target]) -> tuple[float, int]:
    """The train/validation split the checkpoints share (val_fraction, split_seed)."""
    splits = {(t.model.provenance.val_fraction, t.model.provenance.split_seed) for t in targets}
    if len(splits) > 1:
        raise BaeError(
            f"the checkpoints were trained with different document splits {sorted(splits)}; "
            "evaluate them separately, or pass --corpus with held-out documents"
        )
    (val_fraction, seed) = splits.pop()
    if val_fraction <= 0:
        raise BaeError(
            "the checkpoints were trained on every document of the store (val_fraction 0): "
            "pass --corpus with held-out documents"
        )
    return val_fraction, seed


def eval_windows(windows: list[Window], held_out: Any, max_tokens: int | None) -> list[EvalWindow]:
    """Windows with a held-out token at the chosen positions, in order, up to ``max_tokens`` tokens."""
    chosen: list[EvalWindow] = []
    total = 0
    for win in windows:
        splice = np.zeros(len(win.input_ids), bool)
        splice[win.keep] = win.valid[win.keep]
        measure = splice & held_out(win.doc_ids)
        if not measure.any():
            continue
        if max_tokens is not None and total + len(win.input_ids) > max_tokens:
            break
        total += len(win.input_ids)
        every = np.arange(len(win.input_ids))
        fields = {k: getattr(win, k) for k in ("input_ids", "doc_ids", "positions", "valid")}
        chosen.append(EvalWindow(**fields, keep=every, splice=splice, measure=measure))
    return chosen


def layer_mean(store: ActivationStore, layer: int, row_filter: RowFilter, cache: Path) -> torch.Tensor:
    """The mean of a store layer's rows (float64 sums), cached in ``cache``."""
    if cache.is_file():
        return torch.from_numpy(np.load(cache))
    total, rows = np.zeros(store.d_model), 0
    for _, x, _ in iter_unit_rows(store, layer, row_filter):
        total, rows = total + x.sum(0, dtype=np.float64), rows + len(x)
    if rows == 0:
        raise BaeError(f"store {store.url} layer {layer}: no rows for the mean ablation")
    mean = (total / rows).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, mean)
    atomic_write_bytes(cache, buffer.getvalue())
    return torch.from_numpy(mean)


def fingerprint(data: Any) -> str:
    """A short hash of JSON-able ``data`` (other values by their ``str``)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(cfg: EvaluateConfig, device: torch.device | str) -> Prepared:
    """Open the store, load the LLM and the checkpoints, cut the held-out windows into units."""
    store = open_store(cfg)
    settings = harvest_settings(cfg, store)
    loaded = load_model(settings.model, settings.model_dtype, device)
    targets = load_targets(cfg, store, loaded)
    sites = splice_sites(store, loaded.model, targets)
    corpus = CorpusStream(settings.corpus, settings.text_field, settings.line_docs, settings.encoding_errors)
    tokens = tokenize_corpus(
        loaded.tokenizer,
        corpus.texts(),
        settings.context_length,
        settings.mode,
        settings.bos,
        cfg.positions,
        settings.token_budget,
    )
    # the harvest read the same documents (same budget), so the fingerprints of what was read agree;
    # a store of an earlier bae, which read every document, recorded the whole corpus's
    recorded = store.meta.get("corpus_fingerprint", corpus.fingerprint)
    changed = (
        not cfg.corpus
        and recorded != corpus.fingerprint
        and (corpus.exhausted or recorded != corpus.read_to_end())
    )
    if changed:
        raise BaeError(f"the corpus of store {store.url} has changed since the harvest; pass --corpus")
    if cfg.corpus:
        split: tuple[float, int] | None = None
        held_out_text = f"every document of {', '.join(cfg.corpus)}"
        windows = eval_windows(tokens.windows, lambda docs: np.ones(len(docs), bool), cfg.max_tokens)
    else:
        split = split_of(targets)
        held_out_text = f"validation split of {store.url} (fraction {split[0]}, seed {split[1]})"
        windows = eval_windows(tokens.windows, lambda docs: split_mask(docs, "val", *split), cfg.max_tokens)
    if not windows:
        raise BaeError(
            f"no held-out tokens to evaluate ({held_out_text}, positions {cfg.positions}"
            + (f", max_tokens {cfg.max_tokens})" if cfg.max_tokens else ")")
        )
    longest = max(len(w.input_ids) for w in windows)
    units = plan_units(list[Window](windows), max(cfg.unit_tokens, longest)).units
    shaping = {
        "version": FORMAT_VERSION,
        "model": [loaded.model_id, loaded.revision, loaded.weights, str(loaded.model.dtype)],
        "harvest": settings.recorded(),
        "corpus": corpus.fingerprint,
        "positions": cfg.positions,
        "split": split,
        "max_tokens": cfg.max_tokens,
        "unit_tokens": cfg.unit_tokens,
        "batch_tokens": cfg.batch_tokens,
    }
    mean_filter = RowFilter(True, None, "train" if split else None, *(split or (0.1, 0)))
    means = {
        layer: layer_mean(
            store,
            layer,
            mean_filter,
            Path(cfg.out) / "partials" / f"mean-layer{layer}-{fingerprint([store.meta, mean_filter])}.npy",
        ).to(loaded.model.device)
        for layer in sorted({t.layer for t in targets})
    }
    n_docs = len(np.unique(np.concatenate([w.doc_ids[w.measure] for w in windows])))
    shaped = fingerprint(shaping)
    return Prepared(loaded, targets, windows, units, means, shaped, held_out_text, n_docs, sites)
