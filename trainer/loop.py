"""The training loop: a ``Trainer`` fed by any iterator of batches logs, validates, checkpoints and
stops cleanly on a signal; ``bae.trainer.run`` wires the store sampler into it."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator

from bae.common.atomic_files import atomic_write_text
from bae.common.console import progress
from bae.common.errors import BaeError
from bae.common.signals import StopRequest
from bae.common.stats import binary_entropy, fvu_from_sums
from bae.stores import StoreSampler
from bae.trainer.config import TrainConfig
from bae.trainer.merge import bit_correlation, merge_duplicate_bits
from bae.trainer.models import Autoencoder
from bae.trainer.objectives import NormalizedObjective, Objective, covariance_term, entropy_term
from bae.trainer.pair_penalties import exact_counts
from bae.trainer.polish import polish
from bae.trainer.pruning import BitMoves, prune_statistics, switched_off
from bae.trainer.target import FVUTarget

DENSE_THRESHOLDS = (0.1, 0.2, 0.5)


@dataclass
class FiringWindow:
    """Per-bit firing counts over the last ``steps`` steps (a ring buffer), for dense/dead counts;
    held on the training device (``to``), so adding a step reads nothing back to the host."""

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
        self.counts[slot] = bits.detach().sum(dim=0).to(self.counts.device, torch.int64)
        self.rows[slot] = bits.shape[0]
        self.filled = min(self.filled + 1, self.steps)

    def stats(self) -> dict[str, int]:
        rate = self.counts.sum(0).double() / max(1, int(self.rows.sum()))
        out = {f"dense_{t}": int((rate > t).sum()) for t in DENSE_THRESHOLDS}
        # a bit on nearly always is an off-detector: dense means its rarer state is common
        oriented = torch.minimum(rate, 1 - rate)
        out.update({f"dense_oriented_{t}": int((oriented > t).sum()) for t in DENSE_THRESHOLDS})
        out["dead"] = int((rate == 0).sum())
        return out

    def to(self, device: torch.device) -> None:
        self.counts, self.rows = self.counts.to(device), self.rows.to(device)

    def state(self) -> dict[str, Any]:
        return {"counts": self.counts.cpu(), "rows": self.rows.cpu(), "filled": self.filled}

    def load(self, state: dict[str, Any]) -> None:
        device = self.counts.device
        self.counts, self.rows = state["counts"].to(device), state["rows"].to(device)
        self.filled = int(state["filled"])


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


@torch.no_grad()
def validate(model: Autoencoder, sampler: StoreSampler, max_rows: int | None) -> dict[str, float]:
    """FVU (the project's one definition: raw space, typical rows), MSE and the set entropy
    Σ_j H_b(p̂_j) over the whole validation split (vs log2|S|); atypical rows are counted."""
    was_training = model.training
    model.eval()
    n = atypical = 0
    sse = 0.0
    device = model.encoder.weight.device
    sum_x = sum_sq = torch.zeros(model.config.d_model, dtype=torch.float64, device=device)
    counts = torch.zeros(model.n_bits, dtype=torch.int64)
    for x_raw, _ in sampler.iter_epoch_once():
        if max_rows is not None:
            x_raw = x_raw[: max_rows - n - atypical]
        x_raw = x_raw.to(device)
        x = model.normalize(x_raw)
        keep = model.typical(x)
        if keep is not None:
            atypical += int((~keep).sum())
            x, x_raw = x[keep], x_raw[keep]
        out = model(x)
        xd = x_raw.double()
        sse += float((xd - model.denormalize(out.recon).double()).pow(2).sum())
        sum_x, sum_sq = sum_x + xd.sum(0), sum_sq + xd.pow(2).sum(0)
        counts += (out.bits > 0).sum(0).cpu()
        n += len(x)
        if max_rows is not None and n + atypical >= max_rows:
            break
    model.train(was_training)
    if n == 0:
        return {}
    p = (counts.double() / n).numpy()
    return {
        "val_rows": n,
        "val_atypical_rows": atypical,
        "val_mse": sse / (n * model.config.d_model),
        "val_fvu": fvu_from_sums(sse, sum_x.cpu().numpy(), sum_sq.cpu().numpy(), n),
        "val_set_entropy": float(binary_entropy(p).sum()),
        "val_varying_bits": int(((counts > 0) & (counts < n)).sum()),
        "val_log2_rows": math.log2(n),
    }


def batch_fvu(model: Autoencoder, x: torch.Tensor, recon: torch.Tensor) -> float:
    """The project's FVU (``bae.common.stats.fvu_from_sums``, raw space) of one batch."""
    xd = model.denormalize(x.detach()).double()
    sse = float((xd - model.denormalize(recon.detach()).double()).pow(2).sum())
    return fvu_from_sums(sse, xd.sum(0).cpu().numpy(), xd.pow(2).sum(0).cpu().numpy(), len(x))


def batch_metrics(model: Autoencoder, x: torch.Tensor, out: Any, terms: dict[str, Any]) -> dict[str, float]:
    """Train metrics of one batch: the loss's own terms, plus Σ H_b and the covariance sum."""
    bits = out.bits.detach().float()
    metrics = {k: float(v) for k, v in terms.items() if v is not None}
    metrics.update(
        mse=float((x.detach() - out.recon.detach()).pow(2).mean()),
        fvu=batch_fvu(model, x, out.recon),
        batch_entropy=float(terms["entropy"] if "entropy" in terms else entropy_term(bits)),
        covariance=float(terms["covariance"] if "covariance" in terms else covariance_term(bits)),
        l0=float(bits.sum(1).mean()),
    )
    return metrics


def make_objective(config: TrainConfig, variance: float) -> Objective:
    """The configured objective (V is the training space's variance, for the normalized one)."""
    if config.objective == "paper":
        return Objective(config.architecture, float(config.lambda_covariance or 0.0), config.l1_coefficient)
    return NormalizedObjective(
        config.architecture,
        l1_coefficient=config.l1_coefficient,
        variance=variance,
        gamma=float(config.gamma or 0.0),
    )


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log; a half-written last line (a kill or a full disk during an
    append) is dropped, a damaged line before it is an error."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise BaeError(f"{path} line {number} is not JSON; remove the damaged line to resume") from None
    return records


def last_record_with(path: Path, key: str) -> dict[str, Any]:
    """The log's last record that has ``key`` (e.g. ``tokens_per_s``: the last step's metrics;
    ``polish_rounds``: the polish's), {} when none has."""
    return next((r for r in reversed(read_log(path)) if key in r), {})


class JsonlLog:
    """Append-only JSONL metrics log; on resume, entries after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        records = read_log(path) if resume_step is not None else []
        kept = [r for r in records if r.get("step", 0) <= resume_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def ranks_agree(accelerator: Accelerator, model: Autoencoder) -> bool:
    """Whether every process holds the same weights (exact fingerprints, gathered)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=flat.dtype)).sum()])
    gathered = accelerator.gather(fingerprint.to(accelerator.device).unsqueeze(0))
    return bool((gathered == gathered[0]).all())


@dataclass
class TrainState:
    """Everything a checkpoint restores: the model, optimizer, schedule, firing window and counters."""

    model: Autoencoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    window: FiringWindow
    step: int = 0
    tokens: int = 0
    variance: float = 1.0  # V of the training space (the normalized objective's FVU denominator)
    target: FVUTarget | None = None  # dual-ascent state under --target-fvu
    merged: int = 0  # duplicate bits folded so far
    pruned: int = 0  # bits switched off by pruning so far
    reseeded: int = 0  # idle bits re-seeded so far
    split: int = 0  # working bits replaced by re-seeded ones so far
    joined: int = 0  # groups of correlated bits replaced by one re-seeded bit so far

    def objective_state(self) -> dict[str, Any]:
        """What a checkpoint records of the objective (JSON: floats round-trip exactly)."""
        target = self.target.state_dict() if self.target is not None else None
        counts = {"merged": self.merged, "pruned": self.pruned, "reseeded": self.reseeded}
        counts["split"], counts["joined"] = self.split, self.joined
        return {"variance": self.variance, "target": target, **counts}

    def load_objective_state(self, state: dict[str, Any]) -> None:
        self.variance, self.merged = float(state["variance"]), int(state["merged"])
        self.pruned, self.reseeded = int(state.get("pruned", 0)), int(state.get("reseeded", 0))
        self.split, self.joined = int(state.get("split", 0)), int(state.get("joined", 0))
        self.target = FVUTarget.from_state(state["target"]) if state["target"] is not None else None


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """torch on one thread inside (on a CPU): the re-seed and the split are hundreds of small tensor
    ops one after another, which two threads ran 1.5× slower than one (fork and join per op)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def float32_matmuls(device: torch.device, tf32: bool) -> Iterator[None]:
    """Float32 matrix products on CUDA's TF32 tensor cores while inside (``--tf32``; the setting is
    restored on exit); nothing changes off CUDA or without ``tf32``."""
    if device.type != "cuda" or not tf32:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


class Trainer:
    """Fits ``state.model`` on batches of raw rows until ``total_steps``; logs every ``log_every``
    steps, validates with ``validate_fn`` every ``val_every``, checkpoints with ``save_fn``, and on
    SIGINT/SIGTERM checkpoints and exits 128 + signal (agreed across processes). With
    ``polish_rows`` (raw training rows, read when needed) the last step is followed by the polish
    (``bae.trainer.polish``) before its validation and checkpoint.

    A non-finite loss or gradient stops the run in one line naming its step. ``check_every_step``
    (default: on the CPU) reads that check back at every step, before the optimizer touches the
    weights; otherwise (a GPU, where each read stalls the pipeline) the step is recorded on the
    device and read before anything is logged, validated, merged or written — the same error, the
    same step named, no file with non-finite values, at most ``log_every`` steps later."""

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Accelerator,
        state: TrainState,
        log: JsonlLog | None,
        save_fn: Callable[[TrainState], None],
        validate_fn: Callable[[Autoencoder], dict[str, float]] | None = None,
        check_every_step: bool | None = None,
        polish_rows: Callable[[], torch.Tensor] | None = None,
    ):
        self.config, self.accelerator, self.state, self.log = config, accelerator, state, log
        device = accelerator.device
        self.check_every_step = device.type == "cpu" if check_every_step is None else check_every_step
        # the first non-finite step and its loss, when not checked at every step (-1: none yet)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)  # float32: MPS has no float64
        self.save_fn, self.validate_fn, self.polish_rows = save_fn, validate_fn, polish_rows
        self.world = accelerator.num_processes
        self.total_steps = config.total_steps(self.world)
        self.entropy_start = config.entropy_start_step(self.world)
        self.objective = make_objective(config, state.variance)
        state.model.to(device)
        state.window.to(device)
        self.ddp_model, state.optimizer = accelerator.prepare(state.model, state.optimizer)
        self.hold_off(switched_off(state.model))
        self.last_train: dict[str, Any] = {}
        self.last_val: dict[str, float] = {}
        self.last_polish: dict[str, float | int] = {}
        self.last_checkpoint = state.step
        self._clock = (time.perf_counter(), state.tokens)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def record(self, metrics: dict[str, Any]) -> None:
        if self.main and self.log is not None:
            self.log.write({"step": self.state.step, "tokens": self.state.tokens, **metrics})
            if self.config.log_with:
                self.accelerator.log(metrics, step=self.state.step)

    def checkpoint(self) -> None:
        self.require_finite_so_far()
        if self.main:
            self.save_fn(self.state)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = self.state.step

    def entropy_weight(self) -> float:
        """This step's weight of the entropy term: 0 before the entropy start, then λ_H (paper),
        or β fixed or adapted towards the target FVU (normalized)."""
        if self.state.step < self.entropy_start:
            return 0.0
        if self.state.target is not None:
            return self.state.target.beta()
        weight = self.config.lambda_entropy if self.config.objective == "paper" else self.config.beta
        return float(weight or 0.0)

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """One optimizer step on the typical rows of normalized rows ``x`` (returned, with the
        forward pass and the loss terms)."""
        st = self.state
        keep = st.model.typical(x)
        if keep is not None:
            rows = keep.nonzero().squeeze(1)  # the step's one read back to the host (a shape)
            if 2 <= len(rows) < len(x):
                x = x.index_select(0, rows)
        st.optimizer.zero_grad(set_to_none=True)
        with self.accelerator.autocast():
            out = self.ddp_model(x) if self.live is None else self.ddp_model(x, live=self.live)
            loss, terms = self.objective(x, out, self.entropy_weight())
        self.accelerator.backward(loss)
        self.note_finite(loss)
        if self.config.grad_clip is not None:
            self.accelerator.clip_grad_norm_(st.model.parameters(), self.config.grad_clip)
        st.optimizer.step()
        st.scheduler.step()
        st.window.add(st.step, out.bits)
        if st.target is not None and st.step >= self.entropy_start:
            fvu = self.mean_over_ranks(terms["fvu_term"])  # read on the host either way
            if not math.isfinite(fvu):  # never a dual step from it: stop as at a non-finite loss
                self.require_finite_so_far()
                self.diverged(st.step, float(loss))
            st.target.update(fvu)
        if self.merge_due():
            self.require_finite_so_far()
            st.merged += self.merge(out.bits.detach())
            if self.config.prune_reseed:
                st.pruned += self.prune(x)
                reseeded, split, joined = self.reseed(x)
                st.reseeded, st.split, st.joined = (
                    st.reseeded + reseeded,
                    st.split + split,
                    st.joined + joined,
                )
                self.hold_off(switched_off(st.model))
        st.step += 1
        st.tokens += self.config.batch_size * self.world
        return x, out, terms

    def hold_off(self, off: torch.Tensor) -> None:
        """Hold the switched-off bits ``off`` until the next merge (with the moves): the steps run
        over the other bits alone (``BinaryAutoencoder.forward``'s ``live``), which leaves the held
        bits' gradients zero, so that only a re-seed wakes them. A full pass would move them: the
        scaled sigmoid's surrogate gradient is never zero for a constant pre-activation, and with the
        entropy term it moves every switched-off row by the same Adam step along the data's mean, so
        they would come back together as copies of one bit."""
        self.live = None
        if self.config.prune_reseed and len(off):  # the config allows it for one-bit BAEs only
            keep = torch.ones(self.state.model.n_bits, dtype=torch.bool, device=off.device)
            self.live = keep.index_fill_(0, off, False).nonzero().squeeze(1)

    def note_finite(self, loss: torch.Tensor) -> None:
        """Whether the loss and every gradient are finite (gradients are reduced over processes, so
        every rank agrees): checked now (``check_every_step``), else recorded on the device."""
        grads = [p.grad.sum() for p in self.state.model.parameters() if p.grad is not None]
        total = torch.stack(grads).sum() if grads else torch.zeros((), device=loss.device)
        loss = loss.detach()
        finite = torch.isfinite(total) & (torch.isfinite(loss) if self.world == 1 else True)
        if self.check_every_step:
            if not bool(finite):
                self.diverged(self.state.step, float(loss))
            return
        first = ~finite & (self.bad_step < 0)
        self.bad_step = torch.where(first, self.state.step, self.bad_step)
        self.bad_loss = torch.where(first, loss.float(), self.bad_loss)

    def require_finite_so_far(self) -> None:
        """Stop if a step since the start was recorded non-finite (not checked at every step)."""
        if not self.check_every_step and int(self.bad_step) >= 0:
            self.diverged(int(self.bad_step), float(self.bad_loss))

    def diverged(self, step: int, loss: float) -> None:
        kept = f"checkpoint step {self.last_checkpoint} is kept" if self.last_checkpoint else "no checkpoint"
        raise BaeError(
            f"training diverged at step {step}: the loss or its gradient is not finite "
            f"(loss {loss:.4g}); {kept}, no model/ was written; lower --lr, or check the store "
            "for non-finite rows"
        )

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        """A scalar averaged over the processes (every rank then takes the same dual step)."""
        if self.world == 1:
            return float(value)
        reduced = self.accelerator.reduce(value.reshape(1).to(self.accelerator.device), reduction="mean")
        return float(cast(torch.Tensor, reduced).item())

    def merge_due(self) -> bool:
        cfg, step = self.config, self.state.step
        return bool(
            cfg.merge_every
            and cfg.architecture == "bae"
            and cfg.k_bits == 1
            and self.entropy_start <= step < 0.9 * self.total_steps
            and (step + 1) % cfg.merge_every == 0
        )

    @torch.no_grad()
    def merge(self, bits: torch.Tensor) -> int:
        """Fold duplicate bits, judged on this step's bits of all processes (same on every rank)."""
        b = bits.float()
        n = torch.tensor([len(b)], dtype=b.dtype, device=b.device)
        stats = torch.cat([n, b.sum(0), exact_counts(b).to(b.dtype).flatten()])
        if self.world > 1:
            stats = cast(torch.Tensor, self.accelerator.reduce(stats, reduction="sum"))
        d = b.shape[1]
        corr = bit_correlation(int(stats[0]), stats[1 : d + 1], stats[d + 1 :].reshape(d, d)).cpu()
        model = self.state.model
        optimizer = self.state.optimizer if self.config.prune_reseed else None  # held off: moments reset
        return merge_duplicate_bits(
            corr, model.encoder, model.decoder, self.config.merge_threshold, optimizer
        )

    @torch.no_grad()
    def prune(self, x: torch.Tensor) -> int:
        """Switch off the bits that do not pay for themselves on this step's rows of all processes."""
        model = self.state.model
        stats = prune_statistics(model, x)
        if self.world > 1:
            stats = cast(torch.Tensor, self.accelerator.reduce(stats, reduction="sum"))
        return BitMoves(model, self.state.optimizer, self.entropy_weight(), self.state.variance).prune(stats)

    @torch.no_grad()
    def reseed(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Re-seed the bits idle over the firing window (all processes), then split working bits
        into the idle ones left (``BitMoves.split``) and, with ``join``, join correlated ones
        (``BitMoves.join``), on this step's rows of all processes (gathered in rank order, so every
        rank takes the same decisions): (re-seeded, split, joined)."""
        st = self.state
        idle_counts = torch.cat([st.window.counts.sum(0), st.window.rows.sum().reshape(1)])
        if self.world > 1:
            idle_counts = cast(torch.Tensor, self.accelerator.reduce(idle_counts, reduction="sum"))
            x = self.gather_rows(x)
        fired, rows = idle_counts[:-1], idle_counts[-1]
        idle = (fired == 0) | (fired == rows)
        moves = BitMoves(st.model, st.optimizer, self.entropy_weight(), st.variance)
        with one_cpu_thread(x.device):
            reseeded, split = moves.reseed(x, idle), moves.split(x, idle)
            return reseeded, split, moves.join(x) if self.config.join else 0

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows ``x`` (their counts may differ), concatenated in rank order."""
        count = torch.tensor([len(x)], device=x.device)
        counts = cast(torch.Tensor, self.accelerator.gather(count)).tolist()
        padded = cast(torch.Tensor, self.accelerator.pad_across_processes(x, dim=0))
        everything = cast(torch.Tensor, self.accelerator.gather(padded)).reshape(len(counts), -1, x.shape[1])
        return torch.cat([everything[r, :c] for r, c in enumerate(counts)])

    def log_step(self, x: torch.Tensor, out: Any, terms: dict[str, Any], bar: Any) -> None:
        """Train metrics of this batch, with the firing window, lr and throughput."""
        now, (t_log, tokens_log) = time.perf_counter(), self._clock
        st = self.state
        self.last_train = batch_metrics(st.model, x, out, terms)
        self.last_train.update(
            st.window.stats(),
            merged_bits=st.merged,
            pruned_bits=st.pruned,
            reseeded_bits=st.reseeded,
            split_bits=st.split,
            joined_groups=st.joined,
            lr=st.scheduler.get_last_lr()[0],
            tokens_per_s=(st.tokens - tokens_log) / max(now - t_log, 1e-9),
            entropy_on=st.step > self.entropy_start,
        )
        self._clock = (now, st.tokens)
        self.record(self.last_train)
        bar.set_postfix(fvu=f"{self.last_train['fvu']:.4g}", H=f"{self.last_train['batch_entropy']:.1f}")

    @torch.no_grad()
    def polish(self, rows: Callable[[], torch.Tensor]) -> None:
        """Polish the code on the typical ``rows()`` (read by the main process, which polishes and
        sends the weights to the others)."""
        model = self.state.model
        if self.main:
            x = model.normalize(rows().to(self.accelerator.device))
            typical = model.typical(x)
            x = x if typical is None else x[typical]
            report = polish(model, x, self.entropy_weight(), self.state.variance, self.state.optimizer)
            self.last_polish = report.metrics()
            self.record(self.last_polish)
        if self.world > 1:
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def stop_signal(self, stop: StopRequest) -> int:
        """The largest signal any process received (0: none)."""
        signum = stop.signum
        if self.world > 1:
            flag = torch.tensor([signum], device=self.accelerator.device)
            signum = int(cast(torch.Tensor, self.accelerator.reduce(flag, reduction="max")).item())
        return signum

    def after_step(self, x: torch.Tensor, out: Any, terms: dict[str, Any], bar: Any) -> None:
        """Log, validate and checkpoint when their intervals come round (and at the last step)."""
        step, last, cfg = self.state.step, self.state.step == self.total_steps, self.config
        if step % cfg.log_every == 0 or step % cfg.val_every == 0 or last:
            self.require_finite_so_far()
        if step % cfg.log_every == 0 or last:
            self.log_step(x, out, terms, bar)
        if last and self.polish_rows is not None:
            self.polish(self.polish_rows)
        if self.validate_fn is not None and (step % cfg.val_every == 0 or last):
            if self.main:
                self.last_val = self.validate_fn(self.state.model)
                self.record(self.last_val)
            self.accelerator.wait_for_everyone()
        if step % cfg.checkpoint_every == 0 or last:
            self.checkpoint()

    def fit(self, batches: Iterator[torch.Tensor], show_progress: bool = True) -> None:
        """Train on ``batches`` of raw rows until the budget is spent (or a signal stops it)."""
        st, device = self.state, self.accelerator.device
        bar = progress(
            self.total_steps, "train", unit="step", initial=st.step, disable=not (self.main and show_progress)
        )
        with StopRequest() as stop, bar, float32_matmuls(device, self.config.tf32):
            while st.step < self.total_steps:
                x = st.model.normalize(next(batches).to(device, non_blocking=True))
                x, out, terms = self.step(x)
                bar.update(1)
                self.after_step(x, out, terms, bar)
                signum = self.stop_signal(stop)
                if signum:
                    if self.last_checkpoint != st.step:
                        self.checkpoint()
                    if self.main:
                        print(
                            f"interrupted by {signal.Signals(signum).name} at step {st.step} of "
                            f"{self.total_steps}: checkpoint step {st.step} is kept in "
                            f"{self.config.out}; re-run the same command to resume",
                            file=sys.stderr,
                        )
                    raise SystemExit(128 + signum)
        if self.world > 1 and not ranks_agree(self.accelerator, st.model):
            raise BaeError("training processes ended with different weights")
