"""``bae train``: open the store, build or resume the training state, and run the ``Trainer`` on the
store sampler; the run folder gets checkpoints, the metrics log and, at the end, ``model/``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from bae.common.configs import require_same_config
from bae.common.console import human_count, print_summary
from bae.common.errors import BaeError
from bae.common.outputs import exclusive_output, sweep_temporaries
from bae.common.selection import format_ranges, parse_ranges
from bae.common.stats import FVU_DEFINITION
from bae.stores import ActivationStore, RowFilter, StoreSampler
from bae.stores.sites import resolve_layer
from bae.trainer.checkpoints import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from bae.trainer.config import TrainConfig
from bae.trainer.loop import FiringWindow, JsonlLog, Trainer, TrainState, lr_lambda, validate
from bae.trainer.models import WEIGHTS_FILE, Autoencoder, build_autoencoder, read_model_config
from bae.trainer.provenance import Provenance
from bae.trainer.run_folder import RunFolder
from bae.trainer.scale import DataScale, estimate_scale, identity_scale
from bae.trainer.target import FVUTarget
from bae.trainer.tracking import check_trackers, start_trackers

if TYPE_CHECKING:
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import LoggerType


def make_accelerator(config: TrainConfig) -> Accelerator:
    """accelerate forms a CPU process group (gloo, under torchrun) only when told cpu=True."""
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return Accelerator(
        cpu=config.cpu or no_gpu,
        mixed_precision=config.mixed_precision,
        log_with=cast("list[str | LoggerType | GeneralTracker] | None", config.log_with),
        project_dir=config.out,
    )


def open_samplers(
    config: TrainConfig, store: ActivationStore, units: np.ndarray, rank: int, world_size: int
) -> tuple[StoreSampler, StoreSampler | None]:
    """The training sampler (this rank's share) and the validation sampler of the config's rows
    of ``units``."""
    rows = RowFilter.of(config)
    shared: dict[str, Any] = dict(
        units=units,
        layer=config.layer,
        valid_only=rows.valid_only,
        positions=rows.positions,
        val_fraction=rows.val_fraction,
        split_seed=rows.split_seed,
        buffer_rows=config.buffer_rows,
        prefetch=config.prefetch,
    )
    split = "train" if config.val_fraction > 0 else None
    train = StoreSampler(
        store,
        batch_size=config.batch_size,
        seed=config.seed,
        split=split,
        rank=rank,
        world_size=world_size,
        **shared,
    )
    n_train = train.count_rows()
    if n_train < config.batch_size * world_size:
        raise BaeError(
            f"batch_size {config.batch_size} × {world_size} process(es) is larger than the training "
            f"split of store {config.store} layer {config.layer} ({n_train} rows after filters)"
        )
    val = None
    if config.val_fraction > 0:
        val = StoreSampler(store, batch_size=config.batch_size, seed=config.seed, split="val", **shared)
    return train, val


def estimate_data_scale(config: TrainConfig, sampler: StoreSampler, d: int) -> DataScale:
    """The data's scale (``bae.trainer.scale``) from the first ``standardize_rows`` eligible rows."""
    needs_data = config.standardize != "none" or config.typical_ratio or config.encoder_scale
    if config.objective == "paper" and not needs_data:
        return identity_scale(d)
    sample = first_rows(sampler, config.standardize_rows)
    return estimate_scale(sample, str(config.standardize), float(config.typical_ratio or 0.0))


def first_rows(sampler: StoreSampler, limit: int) -> torch.Tensor:
    """The first ``limit`` eligible rows in store order, as one tensor; the units they were read
    from are freed on return (held through the scale estimate, they doubled its memory)."""
    rows, n = [], 0
    for x, _ in sampler.iter_epoch_once():
        rows.append(x[: limit - n])
        n += len(rows[-1])
        if n >= limit:
            break
    return torch.cat(rows)


def spread_rows(sampler: StoreSampler, limit: int) -> torch.Tensor:
    """Up to ``limit`` eligible rows taken evenly from the sampler's units (the first ⌈limit / units⌉
    of each, in store order), as one tensor."""
    per_unit = -(-limit // max(1, len(sampler.units)))
    return torch.cat([x[:per_unit] for x, _ in sampler.iter_epoch_once()])[:limit]


def provenance(config: TrainConfig, store: ActivationStore, units: np.ndarray) -> Provenance:
    """What the checkpoint records about the rows it is trained on."""
    return Provenance(
        store=config.store,
        model=store.meta.get("model"),
        layer=resolve_layer(store, config.layer),
        d_model=store.d_model,
        positions=config.position_list,
        valid_only=config.valid_only,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        corpus_fingerprint=store.meta.get("corpus_fingerprint"),
        units=format_ranges(units),
        n_units=store.n_units,
    )


def check_resumable(
    run: RunFolder, config: TrainConfig, d_model: int
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The latest checkpoint's (json, torch) state, after refusing a different d, architecture or config."""
    ckpt = latest_checkpoint(run.root)
    if ckpt is None:
        return None
    recorded = read_model_config(ckpt)
    old_arch, old_d = recorded["architecture"], recorded["model"]["d_model"]
    if (old_arch, old_d) != (config.architecture, d_model):
        raise BaeError(
            f"{run.root} holds a checkpoint of a {old_arch} with d={old_d}, but this run trains a "
            f"{config.architecture} with d={d_model}; use a new --out"
        )
    json_state, torch_state = load_checkpoint(ckpt)
    require_same_config(
        f"training run {run.root}", TrainConfig.as_recorded_today(json_state["config"]), config.recorded()
    )
    model_state = load_file(str(ckpt / WEIGHTS_FILE))
    return {**json_state, "weights": model_state, "model": recorded["model"]}, torch_state


def training_units(
    config: TrainConfig, store: ActivationStore, resumed: tuple[dict[str, Any], dict[str, Any]] | None
) -> np.ndarray:
    """The store units this run reads: those its checkpoint recorded when resuming (a partial store
    may have grown since), else the complete units (an unfinished store needs --allow-partial)."""
    recorded = resumed[0].get("units") if resumed is not None else None
    if recorded is None:
        return store.complete_units(config.allow_partial)
    units = np.asarray(parse_ranges(recorded), dtype=np.int64)
    if not store.done_mask()[units].all():
        raise BaeError(f"store {config.store} no longer holds all units {recorded} this run was trained on")
    return units


def make_optimizer(model: Autoencoder, learning_rate: float, device: torch.device) -> torch.optim.Adam:
    """Adam, as one fused kernel per parameter where torch has one (CPU, CUDA): the same update up
    to float rounding, ~4x faster than the per-op loop on a CPU (docs/benchmarks.md). A resumed run
    keeps the choice its checkpoint recorded (the optimizer's state restores it)."""
    fused = device.type in ("cpu", "cuda") or None
    return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=fused)


def initial_state(
    config: TrainConfig,
    store: ActivationStore,
    sampler: StoreSampler,
    resumed: tuple[dict[str, Any], dict[str, Any]] | None,
    world: int,
    device: torch.device,
) -> tuple[TrainState, bool]:
    """A fresh training state, or the latest checkpoint's (sampler cursor and RNGs restored); resumed?"""
    scale = estimate_data_scale(config, sampler, store.d_model) if resumed is None else None
    radius = scale.typical_radius if scale is not None else resumed[0]["model"]["typical_radius"]  # type: ignore[index]
    torch.manual_seed(config.seed)
    source = provenance(config, store, sampler.units)
    model = build_autoencoder(config.autoencoder_config(store.d_model, radius), source)
    optimizer = make_optimizer(model, config.learning_rate, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, config.total_steps(world)))
    state = TrainState(model, optimizer, scheduler, FiringWindow(config.window_steps, model.n_bits))
    if resumed is None:
        assert scale is not None
        if model.config.standardize:
            model.set_normalization(scale.mean, scale.std)
        if model.config.encoder_scale:
            model.encoder_input_scale.copy_(scale.per_dim_std)
        state.variance = scale.variance
        if config.target_fvu is not None:
            state.target = FVUTarget.starting_at(config.target_fvu, float(config.beta or 0.0))
        return state, False
    js, ts = resumed
    model.load_state_dict(js["weights"])
    state.load_objective_state(js.get("objective") or {"variance": 1.0, "target": None, "merged": 0})
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    state.window.load(ts["window"])
    sampler.load_state_dict(js["sampler"])
    state.step, state.tokens = js["step"], js["tokens"]
    restore_rng(ts)
    return state, True


def checkpoint_writer(config: TrainConfig, run: RunFolder, sampler: StoreSampler, world: int) -> Any:
    """The function that writes a checkpoint of a training state into the run folder."""

    def save(state: TrainState) -> None:
        save_checkpoint(
            run.root,
            state.step,
            state.model,
            {
                "config": config.recorded(),
                "sampler": sampler.state_dict(),
                "tokens": state.tokens,
                "world_size": world,
                "objective": state.objective_state(),
                "units": format_ranges(sampler.units),
            },
            {
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "window": state.window.state(),
            },
            config.keep_checkpoints,
        )

    return save


def train(config: TrainConfig, show_progress: bool = True) -> tuple[Autoencoder, dict[str, Any]]:
    """Train (or resume training) into ``config.out``; returns the model and the final summary.

    The main process holds the run folder for the whole run (a second ``bae train`` on it is
    refused) and first sweeps what a killed run left (temporary checkpoint and model directories)."""
    check_trackers(config.log_with or [])
    accelerator = make_accelerator(config)
    if not accelerator.is_main_process:
        return _train(config, accelerator, show_progress)
    with exclusive_output(Path(config.out), "bae train") as root:
        run = RunFolder.at(root)
        sweep_temporaries([run.root, run.checkpoints_dir])
        return _train(config, accelerator, show_progress)


def _train(
    config: TrainConfig, accelerator: Accelerator, show_progress: bool
) -> tuple[Autoencoder, dict[str, Any]]:
    run = RunFolder.at(config.out)
    world, main = accelerator.num_processes, accelerator.is_main_process
    store = ActivationStore.open(config.store)
    config = config.model_copy(update={"layer": resolve_layer(store, config.layer)})  # a site by its key
    checkpoint = check_resumable(run, config, store.d_model)
    units = training_units(config, store, checkpoint)
    sampler, val_sampler = open_samplers(config, store, units, accelerator.process_index, world)
    state, resumed = initial_state(config, store, sampler, checkpoint, world, accelerator.device)
    if state.step >= config.total_steps(world) and run.finished:
        summary = {
            "status": "already complete",
            "steps": state.step,
            "tokens": state.tokens,
            "out": config.out,
        }
        if main:
            print_summary(f"bae train: {config.out}", summary)
        return state.model, summary
    log = JsonlLog(run.log, state.step if resumed else None) if main else None
    if config.log_with:
        start_trackers(accelerator, config, run.root)
    validate_fn = None
    if val_sampler is not None:
        validate_fn = lambda model: validate(model, val_sampler, config.val_max_rows)  # noqa: E731
    polish_rows = (lambda: spread_rows(sampler, config.polish_rows)) if config.polish else None
    trainer = Trainer(
        config,
        accelerator,
        state,
        log,
        checkpoint_writer(config, run, sampler, world),
        validate_fn,
        polish_rows=polish_rows,
    )
    trainer.fit(iter(sampler), show_progress)
    state.model.metrics = achieved(trainer)
    if main:
        state.model.save_pretrained(run.model_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary = train_summary(config, state, trainer, store.d_model)
    if main:
        print_summary(f"bae train: {config.out}", summary)
    return state.model, summary


def achieved(trainer: Trainer) -> dict[str, Any]:
    """What the final model achieved, saved in its config.json for the stages that use it."""
    keys = ("val_fvu", "val_rows", "val_atypical_rows", "val_set_entropy", "val_varying_bits", "fvu", "beta")
    last = {**trainer.last_train, **trainer.last_val, **trainer.last_polish}
    keys += tuple(k for k in trainer.last_polish if k != "polish_seconds")  # reproducible model bytes
    return {k: last[k] for k in keys if k in last} | {"fvu_definition": FVU_DEFINITION}


def train_summary(config: TrainConfig, state: TrainState, trainer: Trainer, d: int) -> dict[str, Any]:
    """The one-screen summary: budget, model shape, last train and validation metrics."""
    model = state.model
    last = {**trainer.last_train, **trainer.last_val, **trainer.last_polish}
    source = model.provenance
    return {
        "store": f"{config.store} (units {source.units} of {source.n_units})",
        "steps": state.step,
        "tokens": human_count(state.tokens),
        "model": str(RunFolder.at(config.out).model_dir),
        "architecture": f"{config.architecture} d={d} d'={model.config.n_features} bits={model.n_bits}",
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()},
        "warnings": "; ".join(code_warnings(last, model.n_bits, config.target_fvu, config.architecture))
        or "none",
    }


def code_warnings(
    metrics: dict[str, Any], n_bits: int, target_fvu: float | None = None, architecture: str = "bae"
) -> list[str]:
    """What makes a trained code unfit for entropy numbers: no varying bit, no variance explained,
    most bits dense, a target FVU missed by more than a quarter (each warning one short clause)."""
    warnings = []
    fvu = metrics.get("val_fvu")
    if target_fvu is not None and fvu is not None and abs(fvu - target_fvu) > 0.25 * target_fvu:
        warnings.append(
            f"val FVU {fvu:.3g} is off the target {target_fvu:g} (codes are discrete; compare achieved FVUs)"
        )
    if metrics.get("val_varying_bits", 1) == 0:
        warnings.append("the code collapsed: no bit varies on the validation split")
    if metrics.get("val_fvu", 0.0) >= 1.0:
        warnings.append(
            f"val FVU {metrics['val_fvu']:.3g} ≥ 1: the reconstruction explains none of the variance"
        )
    key = "dense_oriented_0.1" if architecture == "bae" else "dense_0.1"
    if metrics.get(key, 0) > n_bits / 2:
        dense = metrics[key]
        if architecture == "bae":
            warnings.append(f"{dense} of {n_bits} bits are dense (their rarer state on > 10% of rows)")
        else:
            warnings.append(f"{dense} of {n_bits} features are dense (active on > 10% of rows)")
    return warnings
