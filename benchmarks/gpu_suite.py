"""The GPU suite: harvest, training, the pair penalties and entropy on one device, each against a
baseline measured in the same run (docs/benchmarks.md, "GPU suite"). No download: the LLMs are
random-weight Llama-3.2-1B- and 3B-shaped models (transformers' LlamaConfig, bf16) with a word-level
tokenizer over a generated corpus; the activation store is standard normal rows.

    python benchmarks/gpu_suite.py [--device auto] [--json PATH] [--tiny] [--no-tf32]

Lines (targets in brackets):
  gemm      the device's measured matmul rate per dtype (the reference for the training line)
  harvest   `run_harvest` tok/s vs the bare model forward truncated at the same layer [>= 0.95x]
  train     `bae train` (paper objective, from a Zarr store) rows/s at d=2048, d'=8192, batch 4096
            vs the same step on tensors already on the device [>= 0.95x]; and the step's GEMM FLOP/s
            as a fraction of the measured rate of the precision it runs in
  penalty   share of an in-memory step taken by the covariance (paper) / redundancy (normalized)
            term at d'=8192 and 12288 (step time with the term on vs off)
  entropy   `bae entropy`'s Σ H_b reduction rows/s vs a bare encode matmul on the device [>= 0.8x]
Each line also gives the peak device memory of its phase (torch.cuda.max_memory_allocated), or on a
CPU the process's peak RSS so far. ``--tiny``: tiny shapes, on a CPU in well under a minute (a test
runs it). The harvest runs where ``bae harvest`` runs (the GPU when one is visible).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import bae` sets it, before torch loads

import argparse
import contextlib
import dataclasses
import io
import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_train import make_store  # the benchmarks folder is the script's path

from bae.common.devices import DEVICE_HELP, resolve_device
from bae.trainer.loop import float32_matmuls

LLAMA_SHAPES = {  # Llama-3.2 1B and 3B (their config.json), vocabulary aside
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        intermediate_size=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}
TINY_SHAPES = {
    "tiny-4x64": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
    "tiny-6x96": dict(
        hidden_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
    ),
}


@dataclass(frozen=True)
class Sizes:
    """How big each part of the suite runs."""

    shapes: dict[str, dict[str, Any]]
    vocab: int  # words of the generated corpus (+3 specials): the models' vocabulary
    harvest_tokens: int
    context: int
    batch_tokens: int
    d: int  # training and entropy width
    features: int  # d'
    batch: int
    train_steps: int
    store_rows: int
    penalty_features: tuple[int, ...]
    penalty_steps: int
    gemm_size: int


FULL = Sizes(
    shapes=LLAMA_SHAPES,
    vocab=32_000,
    harvest_tokens=262_144,
    context=1024,
    batch_tokens=32_768,
    d=2048,
    features=8192,
    batch=4096,
    train_steps=60,
    store_rows=131_072,
    penalty_features=(8192, 12288),
    penalty_steps=10,
    gemm_size=8192,
)
TINY = Sizes(
    shapes=TINY_SHAPES,
    vocab=500,
    harvest_tokens=2048,
    context=64,
    batch_tokens=512,
    d=64,
    features=256,
    batch=256,
    train_steps=16,
    store_rows=8192,
    penalty_features=(256, 384),
    penalty_steps=4,
    gemm_size=256,
)


@dataclass
class Line:
    """One measured comparison."""

    part: str
    what: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    target: float | None = None
    peak_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline else self.value / self.baseline


# -- the device ---------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak device memory since ``reset_peak`` (CUDA), else the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(device: torch.device, fn: Callable[[], Any], repeats: int = 1, warmup: int = 1) -> float:
    """Seconds per call of ``fn`` (``warmup`` untimed calls first), the device drained around."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeats


def gemm_rates(device: torch.device, size: int) -> dict[str, float]:
    """FLOP/s of a square matmul per input precision (TF32: float32 inputs on its tensor cores)."""
    kinds = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False)}
    if device.type == "cuda":
        kinds |= {"tf32": (torch.float32, True), "float16": (torch.float16, False)}
    rates = {}
    for name, (dtype, tf32) in kinds.items():
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        with float32_matmuls(device, tf32):
            seconds = timed(device, lambda a=a, b=b: a @ b, repeats=5 if device.type == "cuda" else 2)
        rates[name] = 2 * size**3 / seconds
    return rates


# -- harvest ------------------------------------------------------------------------------------


def save_tokenizer(path: Path, vocab: int) -> int:
    """A word-level tokenizer over words w0..w{vocab-1} (one token a word); returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    words = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab)])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # pyright: ignore[reportAttributeAccessIssue]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(path)
    return len(words)


def write_corpus(path: Path, words: int, vocab: int, doc_words: int = 4096) -> None:
    """JSONL documents of random words (Zipf-like frequencies), ``words`` in all."""
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.2, size=words) - 1, vocab - 1)
    with path.open("w") as f:
        for start in range(0, words, doc_words):
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in ids[start : start + doc_words])}) + "\n")


def save_llama(path: Path, shape: dict[str, Any], vocab: int, context: int, device: torch.device) -> None:
    """A random-weight Llama of ``shape``, bf16, initialised on ``device``, saved with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = save_tokenizer(path, vocab)
    config = LlamaConfig(
        vocab_size=size,
        max_position_embeddings=context,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # pyright: ignore[reportArgumentType]
    model.save_pretrained(path)
    del model


def harvest_line(name: str, shape: dict[str, Any], sizes: Sizes, tmp: Path) -> Line:
    """``run_harvest`` at layer n_layers // 2 vs the same model's forward cut after that block, on
    the harvest's device, batches of the same shape and as many tokens."""
    from transformers import AutoModelForCausalLM

    from bae.pipeline.harvest.config import HarvestConfig
    from bae.pipeline.harvest.run import process_state, run_harvest

    device = torch.device(process_state().device or "cpu")
    model_dir, corpus = tmp / name, tmp / f"{name}.jsonl"
    save_llama(model_dir, shape, sizes.vocab, sizes.context, device)
    write_corpus(corpus, int(sizes.harvest_tokens * 1.05), sizes.vocab)
    layer = shape["num_hidden_layers"] // 2
    reset_peak(device)
    config = HarvestConfig(
        out=str(tmp / f"{name}.zarr"),
        model=str(model_dir),
        model_dtype="bfloat16",
        corpus=[str(corpus)],
        context_length=sizes.context,
        max_tokens=sizes.harvest_tokens,
        batch_tokens=sizes.batch_tokens,
        layers=[layer],
    )
    result = run_harvest(config, show_progress=False)
    rate, harvest_peak = result.tokens / result.seconds, peak_bytes(device)
    del result
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.to(device)  # pyright: ignore[reportArgumentType]
    model.eval()
    model.model.layers = model.model.layers[:layer]
    model.config.num_hidden_layers = layer
    rows = max(1, sizes.batch_tokens // sizes.context)
    batches = math.ceil(sizes.harvest_tokens / (rows * sizes.context))
    ids = torch.randint(3, sizes.vocab, (rows, sizes.context), device=device)
    reset_peak(device)
    with torch.inference_mode():
        seconds = timed(device, lambda: model.model(input_ids=ids, use_cache=False), repeats=batches)
    return Line(
        "harvest",
        f"{name} layer {layer}/{shape['num_hidden_layers']}",
        rate,
        "tok/s",
        rows * sizes.context / seconds,
        "forward cut after that block",
        0.95,
        harvest_peak,
        {"baseline_peak_bytes": peak_bytes(device), "device": str(device)},
    )


# -- training -----------------------------------------------------------------------------------


def train_config(store: Path, out: Path, sizes: Sizes, device: torch.device, tf32: bool, **options: Any):
    """The suite's ``bae train`` config (paper objective unless ``options`` say otherwise)."""
    from bae.trainer.config import TrainConfig

    options = {"objective": "paper", "expansion": sizes.features // sizes.d, **options}
    return TrainConfig(
        store=str(store),
        out=str(out),
        layer=1,
        steps=sizes.train_steps,
        batch_size=sizes.batch,
        val_fraction=0.0,
        log_every=max(1, sizes.train_steps // 2),
        checkpoint_every=10**9,
        entropy_start_steps=0,
        buffer_rows=min(65_536, sizes.store_rows),
        cpu=device.type == "cpu",
        tf32=tf32,
        **options,
    )


def memory_step_seconds(config: Any, data: torch.Tensor, device: torch.device, steps: int) -> float:
    """Seconds per optimizer step of ``config``'s model and objective on batches sliced from
    ``data`` (already on the device): forward, loss, backward, Adam; nothing else."""
    from bae.trainer.loop import make_objective
    from bae.trainer.models import build_autoencoder

    torch.manual_seed(config.seed)
    model = build_autoencoder(config.autoencoder_config(data.shape[1])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    objective = make_objective(config, float(data.shape[1]))
    weight = float((config.lambda_entropy if config.objective == "paper" else config.beta) or 0.0)
    order = torch.randperm(len(data), device=device)
    batch, turn = config.batch_size, [0]

    def step() -> None:
        start = (turn[0] * batch) % (len(data) - batch + 1)
        turn[0] += 1
        x = data[order[start : start + batch]]
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(x, model(x), weight)
        loss.backward()
        optimizer.step()

    with float32_matmuls(device, config.tf32):
        return timed(device, step, repeats=steps, warmup=3)


def train_lines(
    store: Path, sizes: Sizes, device: torch.device, tf32: bool, rates: dict, tmp: Path
) -> list[Line]:
    """The real loop from the store vs the same step in memory, and the step's share of the GEMM rate."""
    from bae.stores import ActivationStore
    from bae.trainer.loop import last_record_with
    from bae.trainer.run import train
    from bae.trainer.run_folder import LOG_FILE

    config = train_config(store, tmp / "run", sizes, device, tf32)
    reset_peak(device)
    train(config, show_progress=False)
    loop_peak = peak_bytes(device)
    record = last_record_with(tmp / "run" / LOG_FILE, "tokens_per_s")
    source = ActivationStore.open(str(store))
    data = torch.from_numpy(source.read_layer(1, 0, source.n_rows)).to(device, torch.float32)
    reset_peak(device)
    seconds = memory_step_seconds(config, data, device, sizes.train_steps)
    memory_peak = peak_bytes(device)
    del data
    shape = f"d={sizes.d} d'={sizes.features} batch {sizes.batch}"
    precision = "tf32" if tf32 and device.type == "cuda" else "float32"
    flops = 5 * 2 * sizes.batch * sizes.d * sizes.features  # bench_train.step_gemm_flops at this shape
    return [
        Line(
            "train",
            f"bae train from the store, {shape}",
            record["tokens_per_s"],
            "rows/s",
            sizes.batch / seconds,
            "same step on tensors on the device",
            0.95,
            loop_peak,
            {"baseline_peak_bytes": memory_peak, "step_ms": seconds * 1e3},
        ),
        Line(
            "train",
            f"step GEMM FLOP/s ({precision}) vs the measured {precision} rate",
            flops / seconds,
            "FLOP/s",
            rates[precision],
            f"{precision} {sizes.gemm_size}² matmul",
            extra={"bfloat16_rate": rates.get("bfloat16")},
        ),
    ]


def penalty_lines(sizes: Sizes, device: torch.device, tf32: bool, tmp: Path) -> list[Line]:
    """The pair term's share of an in-memory step: step time with it on vs off, at each width."""
    lines = []
    data = torch.randn(4 * sizes.batch, sizes.d, device=device)
    for features in sizes.penalty_features:
        for objective, off, term in (
            ("paper", {"lambda_covariance": 0.0}, "covariance"),
            ("normalized", {"gamma": 0.0}, "redundancy"),
        ):
            seconds = {}
            reset_peak(device)
            for name, options in (("on", {}), ("off", off)):
                config = train_config(
                    tmp,
                    tmp / "unused",
                    sizes,
                    device,
                    tf32,
                    objective=objective,
                    expansion=features // sizes.d,
                    **options,
                )
                seconds[name] = memory_step_seconds(config, data, device, sizes.penalty_steps)
            lines.append(
                Line(
                    "penalty",
                    f"{term} ({objective}) share of the step, d'={features}",
                    100 * (seconds["on"] - seconds["off"]) / seconds["on"],
                    "% of step",
                    peak_bytes=peak_bytes(device),
                    extra={"step_ms": seconds["on"] * 1e3, "step_ms_without": seconds["off"] * 1e3},
                )
            )
    return lines


# -- entropy ------------------------------------------------------------------------------------


def entropy_line(store: Path, sizes: Sizes, device: torch.device, tmp: Path) -> Line:
    """The Σ H_b reduction (read, decode, encode, per-position counts) vs the bare encode matmul
    over the same rows already on the device, in batches of 4096."""
    from bae.pipeline.entropy.counts import CountSpec, RowKey, count_groups
    from bae.stores import ActivationStore, RowFilter
    from bae.trainer import ModelConfig, build_autoencoder
    from bae.trainer.provenance import Provenance

    torch.manual_seed(0)
    model = build_autoencoder(
        ModelConfig(d_model=sizes.d, expansion=sizes.features // sizes.d), Provenance(layer=1)
    )
    model.save_pretrained(tmp / "bae")
    source = ActivationStore.open(str(store))
    units, checkpoint = tuple(range(source.n_units)), str(tmp / "bae")

    def spec(which: tuple[int, ...]) -> CountSpec:
        every_row = RowFilter()
        return CountSpec(
            source.url, checkpoint, 1, every_row, RowKey("positions"), which, joint=False, device=str(device)
        )

    count_groups(spec(units[:1]), show_progress=False)  # warm-up: imports, compilation, the device
    reset_peak(device)
    t0 = time.perf_counter()
    counts = count_groups(spec(units), show_progress=False)
    synchronize(device)
    rows, seconds = int(counts.rows.sum()), time.perf_counter() - t0
    reduction_peak = peak_bytes(device)
    x = torch.from_numpy(source.read_layer(1, 0, source.n_rows)).to(device, torch.float32)
    w, b = model.encoder.weight.detach().to(device), model.encoder.bias.detach().to(device)

    def encode() -> None:
        for start in range(0, len(x), 4096):
            torch.addmm(b, x[start : start + 4096], w.T)

    reset_peak(device)
    bare = len(x) / timed(device, encode)
    return Line(
        "entropy",
        f"Σ H_b reduction, d={sizes.d} d'={sizes.features}, {rows} rows",
        rows / seconds,
        "rows/s",
        bare,
        "encode matmul on the device",
        0.8,
        reduction_peak,
        {"baseline_peak_bytes": peak_bytes(device)},
    )


# -- report -------------------------------------------------------------------------------------


def human(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale and unit != "% of step":
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def print_table(lines: list[Line], header: str) -> None:
    print(header)
    rows = [("part", "what", "result", "baseline (same run)", "ratio", "target", "peak mem")]
    for line in lines:
        ratio = line.ratio
        rows.append(
            (
                line.part,
                line.what,
                human(line.value, line.unit),
                f"{human(line.baseline, line.unit)} {line.baseline_what}" if line.baseline else "-",
                f"{ratio:.3f}x" if ratio is not None else "-",
                f">= {line.target}x" if line.target else "-",
                f"{line.peak_bytes / 2**20:,.0f} MiB" if line.peak_bytes else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip())


def describe(device: torch.device) -> str:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    return f"device {device} ({name}), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes (a CPU runs it in well under a minute)"
    )
    parser.add_argument("--json", type=Path, help="also write the lines as JSON to this file")
    parser.add_argument(
        "--no-tf32", action="store_true", help="train in plain float32 (default: --tf32 on CUDA)"
    )
    parser.add_argument("--dir", type=Path, help="where the temporary stores and models go [system temp]")
    args = parser.parse_args(argv)
    from bae.common.errors import BaeError

    try:
        device = resolve_device(args.device)
    except BaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes, tf32 = TINY if args.tiny else FULL, not args.no_tf32
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bae-gpu-suite-", dir=args.dir) as name:
        tmp, store = Path(name), Path(name) / "rows.zarr"
        rates = gemm_rates(device, sizes.gemm_size)
        lines = [
            Line("gemm", f"{kind} {sizes.gemm_size}² matmul", rate, "FLOP/s") for kind, rate in rates.items()
        ]
        parts: list[tuple[str, Callable[[], Any]]] = [
            *(
                (f"harvest {n}", lambda n=n, shape=shape: [harvest_line(n, shape, sizes, tmp)])
                for n, shape in sizes.shapes.items()
            ),
            ("store", lambda: make_store(store, sizes.store_rows, sizes.d) or []),
            ("train", lambda: train_lines(store, sizes, device, tf32, rates, tmp)),
            ("penalty", lambda: penalty_lines(sizes, device, tf32, tmp)),
            ("entropy", lambda: [entropy_line(store, sizes, device, tmp)]),
        ]
        for part, run in parts:
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the stages' own summaries
                lines += run()
            print(
                f"[{time.perf_counter() - began:5.0f} s] {part}: {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
            )
    wall = time.perf_counter() - began
    header = f"bae GPU suite{' (--tiny)' if args.tiny else ''}: {describe(device)}, {wall:.0f} s"
    print_table(lines, header)
    if args.json:
        payload = {
            "header": header,
            "device": str(device),
            "tiny": args.tiny,
            "tf32": tf32,
            "lines": [{**dataclasses.asdict(line), "ratio": line.ratio} for line in lines],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
