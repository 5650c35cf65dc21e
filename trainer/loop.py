"""The ``bae train`` loop: stream a store layer, fit an autoencoder, log, validate, checkpoint, resume."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from bae.common.configs import require_same_config
from bae.common.console import human_count, print_summary, progress
from bae.common.errors import BaeError
from bae.common.signals import StopRequest
from bae.stores import ActivationStore, StoreSampler
from bae.trainer.checkpoints import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from bae.trainer.config import TrainConfig
from bae.trainer.models import WEIGHTS_FILE, Autoencoder, build_autoencoder, read_model_config
from bae.trainer.objectives import (
    Objective,
    binary_entropy,
    covariance_term,
    entropy_term,
    fraction_of_variance_unexplained,
)

LOG_FILE = "train_log.jsonl"
MODEL_DIR = "model"
DENSE_THRESHOLDS = (0.1, 0.2, 0.5)


@dataclass
class FiringWindow:
    """Per-bit firing counts over the last ``steps`` steps (a ring buffer), for dense/dead counts."""

    steps: int
    n_bits: int
    counts: torch.Tensor = field(init=False)
    rows: torch.Tensor = field(init=False)
    filled: int = 0

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.steps, self.n_bits, dtype=torch.int64)
        self.rows = torch.zeros(self.steps, dtype=torch.int64)

    def add(self, step: int, bits: torch.Tensor) -> None:
        slot = step % self.steps
        self.counts[slot] = bits.detach().sum(dim=0).to("cpu", torch.int64)
        self.rows[slot] = bits.shape[0]
        self.filled = min(self.filled + 1, self.steps)

    def stats(self) -> dict[str, int]:
        rate = self.counts.sum(0).double() / max(1, int(self.rows.sum()))
        out = {f"dense_{t}": int((rate > t).sum()) for t in DENSE_THRESHOLDS}
        out["dead"] = int((rate == 0).sum())
        return out

    def state(self) -> dict[str, Any]:
        return {"counts": self.counts, "rows": self.rows, "filled": self.filled}

    def load(self, state: dict[str, Any]) -> None:
        self.counts, self.rows, self.filled = state["counts"], state["rows"], int(state["filled"])


def lr_lambda(config: TrainConfig, total_steps: int):
    """Linear warm-up, then constant or cosine decay to zero."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        span = max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))

    return factor


def open_training_data(
    config: TrainConfig, rank: int, world_size: int
) -> tuple[ActivationStore, StoreSampler, StoreSampler | None]:
    """The store, the training sampler (this rank's share) and the validation sampler."""
    store = ActivationStore.open(config.store)
    common = dict(
        layer=config.layer,
        valid_only=config.valid_only,
        positions=config.positions,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
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
        **common,
    )
    n_train = train.count_rows()
    if n_train < config.batch_size * world_size:
        raise BaeError(
            f"batch_size {config.batch_size} × {world_size} process(es) is larger than the training "
            f"split of store {config.store} layer {config.layer} ({n_train} rows after filters)"
        )
    val = None
    if config.val_fraction > 0:
        val = StoreSampler(store, batch_size=config.batch_size, seed=config.seed, split="val", **common)
    return store, train, val


def standardization(sampler: StoreSampler, max_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (float64 sums) over the first ``max_rows`` eligible rows."""
    n, total, total_sq = 0, 0.0, 0.0
    for x, _ in sampler.iter_epoch_once():
        if max_rows is not None:
            x = x[: max_rows - n]
        xd = x.double()
        total, total_sq, n = total + xd.sum(0), total_sq + xd.pow(2).sum(0), n + len(x)
        if max_rows is not None and n >= max_rows:
            break
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(0).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


@torch.no_grad()
def validate(model: Autoencoder, sampler: StoreSampler, max_rows: int | None) -> dict[str, float]:
    """MSE, FVU and the set entropy Σ_j H_b(p̂_j) over the whole validation split (vs log2|S|)."""
    was_training = model.training
    model.eval()
    n, sse = 0, 0.0
    sum_x = sum_sq = 0.0
    counts = torch.zeros(model.n_bits, dtype=torch.int64)
    device = model.encoder.weight.device
    for x_raw, _ in sampler.iter_epoch_once():
        if max_rows is not None:
            x_raw = x_raw[: max_rows - n]
        x = model.normalize(x_raw.to(device))
        out = model(x)
        sse += float((x - out.recon).double().pow(2).sum())
        xd = x.double()
        sum_x, sum_sq = sum_x + xd.sum(0), sum_sq + xd.pow(2).sum(0)
        counts += (out.bits > 0).sum(0).cpu()
        n += len(x)
        if max_rows is not None and n >= max_rows:
            break
    model.train(was_training)
    if n == 0:
        return {}
    variance = float((sum_sq - sum_x.pow(2) / n).sum())
    p = counts.double() / n
    return {
        "val_rows": n,
        "val_mse": sse / (n * x.shape[1]),
        "val_fvu": sse / max(variance, 1e-30),
        "val_set_entropy": float(binary_entropy(p).sum()),
        "val_log2_rows": math.log2(n),
    }


def batch_metrics(x: torch.Tensor, out: Any, terms: dict[str, Any]) -> dict[str, float]:
    """Train metrics of one batch (terms not computed for the loss are computed here)."""
    bits = out.bits.detach().float()
    entropy = terms["entropy"] if terms["entropy"] is not None else entropy_term(bits)
    covariance = terms["covariance"] if terms["covariance"] is not None else covariance_term(bits)
    metrics = {
        "mse": float(terms["mse"]),
        "fvu": float(fraction_of_variance_unexplained(x.float(), out.recon.detach().float())),
        "batch_entropy": float(entropy),
        "covariance": float(covariance),
        "l0": float(bits.sum(1).mean()),
    }
    if terms["l1"] is not None:
        metrics["l1"] = float(terms["l1"])
    return metrics


class JsonlLog:
    """Append-only JSONL metrics log; on resume, entries after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() and resume_step is not None else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def check_resumable(ckpt: Path, config: TrainConfig, d_model: int, out: Path) -> dict[str, Any]:
    """The checkpoint's state, after refusing a different d, architecture or config."""
    recorded = read_model_config(ckpt)
    old_arch, old_d = recorded["architecture"], recorded["model"]["d_model"]
    if (old_arch, old_d) != (config.architecture, d_model):
        raise BaeError(
            f"{out} holds a checkpoint of a {old_arch} with d={old_d}, but this run trains a "
            f"{config.architecture} with d={d_model}; use a new --out"
        )
    json_state, torch_state = load_checkpoint(ckpt)
    require_same_config(f"training run {out}", json_state["config"], config.model_dump(mode="json"))
    return {"json": json_state, "torch": torch_state}


def ranks_agree(accelerator: Accelerator, model: Autoencoder) -> bool:
    """Whether every process holds the same weights (exact fingerprints, gathered)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=flat.dtype)).sum()])
    gathered = accelerator.gather(fingerprint.to(accelerator.device).unsqueeze(0))
    return bool((gathered == gathered[0]).all())


def train(
    config: TrainConfig, out: str | Path, show_progress: bool = True
) -> tuple[Autoencoder, dict[str, Any]]:
    """Train (or resume training) into ``out``; returns the model and the final summary."""
    out = Path(out)
    # accelerate forms a CPU process group (gloo, under torchrun) only when told cpu=True
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(
        cpu=config.cpu or no_gpu,
        mixed_precision=config.mixed_precision,
        log_with=config.log_with,
        project_dir=str(out),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    store, sampler, val_sampler = open_training_data(config, rank, world)
    d = store.d_model
    total_steps = config.total_steps(world)
    entropy_start = config.entropy_start_step(world)

    ckpt = latest_checkpoint(out)
    resumed = check_resumable(ckpt, config, d, out) if ckpt is not None else None

    torch.manual_seed(config.seed)
    source = {
        "store": config.store,
        "model": store.meta.get("model"),
        "layer": config.layer,
        "d_model": d,
        "positions": config.positions,
        "valid_only": config.valid_only,
        "val_fraction": config.val_fraction,
        "split_seed": config.split_seed,
        "corpus_fingerprint": store.meta.get("corpus_fingerprint"),
    }
    model = build_autoencoder(config.autoencoder_config(d), source)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    window = FiringWindow(config.window_steps, model.n_bits)
    step = tokens = 0
    if resumed is not None:
        js, ts = resumed["json"], resumed["torch"]
        model.load_state_dict(load_file(str(ckpt / WEIGHTS_FILE)))
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        window.load(ts["window"])
        sampler.load_state_dict(js["sampler"])
        step, tokens = js["step"], js["tokens"]
        restore_rng(js, ts)
    elif config.standardize:
        model.set_normalization(*standardization(sampler, config.standardize_rows))

    if step >= total_steps and (out / MODEL_DIR).is_dir():
        summary = {"status": "already complete", "steps": step, "tokens": tokens, "out": str(out)}
        if main:
            print_summary(f"bae train: {out}", summary)
        return model, summary

    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / LOG_FILE, step if resumed else None) if main else None
    if config.log_with:
        accelerator.init_trackers("bae-train", config=config.model_dump(mode="json"))
    model.to(accelerator.device)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    objective = Objective(
        config.architecture, config.lambda_entropy, config.lambda_covariance, config.l1_coefficient
    )

    def checkpoint() -> None:
        if main:
            save_checkpoint(
                out,
                step,
                model,
                {
                    "config": config.model_dump(mode="json"),
                    "sampler": sampler.state_dict(),
                    "tokens": tokens,
                    "world_size": world,
                },
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "window": window.state(),
                },
                config.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    def record(metrics: dict[str, Any]) -> None:
        if main:
            log.write({"step": step, "tokens": tokens, **metrics})
            if config.log_with:
                accelerator.log(metrics, step=step)

    bar = progress(total_steps, "train", unit="step", initial=step, disable=not (main and show_progress))
    last_val: dict[str, float] = {}
    last_train: dict[str, float] = {}
    t_log, tokens_log = time.perf_counter(), tokens
    batches: Iterator[torch.Tensor] = iter(sampler)
    last_ckpt = step
    with StopRequest() as stop, bar:
        while step < total_steps:
            x = model.normalize(next(batches).to(accelerator.device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            with accelerator.autocast():
                out_codes = ddp_model(x)
                loss, terms = objective(x, out_codes, entropy_on=step >= entropy_start)
            accelerator.backward(loss)
            if config.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            window.add(step, out_codes.bits)
            step += 1
            tokens += config.batch_size * world
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                last_train = batch_metrics(x, out_codes, terms)
                last_train.update(
                    window.stats(),
                    lr=scheduler.get_last_lr()[0],
                    tokens_per_s=(tokens - tokens_log) / max(now - t_log, 1e-9),
                    entropy_on=step > entropy_start,
                )
                t_log, tokens_log = now, tokens
                record(last_train)
                bar.set_postfix(mse=f"{last_train['mse']:.4g}", H=f"{last_train['batch_entropy']:.1f}")
            if val_sampler is not None and (step % config.val_every == 0 or step == total_steps):
                if main:
                    last_val = validate(model, val_sampler, config.val_max_rows)
                    record(last_val)
                accelerator.wait_for_everyone()
            if step % config.checkpoint_every == 0 or step == total_steps:
                checkpoint()
                last_ckpt = step
            signum = stop.signum
            if world > 1:
                flag = torch.tensor([signum], device=accelerator.device)
                signum = int(accelerator.reduce(flag, reduction="max").item())
            if signum:
                if last_ckpt != step:
                    checkpoint()
                raise SystemExit(128 + signum)
    if world > 1 and not ranks_agree(accelerator, model):
        raise BaeError(f"training run {out}: processes ended with different weights")
    if main:
        model.save_pretrained(out / MODEL_DIR)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary = {
        "steps": step,
        "tokens": human_count(tokens),
        "model": str(out / MODEL_DIR),
        "architecture": f"{config.architecture} d={d} d'={model.config.n_features} bits={model.n_bits}",
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in {**last_train, **last_val}.items()},
    }
    if main:
        print_summary(f"bae train: {out}", summary)
    return model, summary
