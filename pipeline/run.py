"""`bae run`: harvest -> train -> entropy -> evaluate from one pipeline file, each stage resuming from
its output.

A pipeline file has a ``workdir`` and one section per stage, each holding that stage's own config
fields (as in ``bae harvest/train/entropy/evaluate --config``). The paths that link the stages are
derived from the workdir: ``<workdir>/activations.zarr``, ``<workdir>/bae-layer<L>/`` (and
``bae-layer<L>-seed<S>/`` for each further training), ``<workdir>/entropy/``, ``<workdir>/evaluate/``.
Each layer is trained ``trainings`` times (seeds ``seed``, ``seed`` + 1, ...): the entropy stage reads
them together, so its intervals hold the spread between trainings as well as the documents'
sampling (on the default job the spread between two trainings exceeded the bootstrap intervals).
With no file, the embedded default runs: SmolLM2-135M on AG News (``staicc:agnews``, thousands of
news texts, so each position group holds thousands of rows), one middle layer, a short training run
of the normalized objective, entropy per token position against shuffled-group nulls, and what
splicing each trained model into SmolLM2 costs on the held-out documents.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from bae.common.configs import StrictModel, build_config
from bae.common.console import print_summary
from bae.common.errors import BaeError
from bae.pipeline.entropy.config import EntropyConfig
from bae.pipeline.evaluate.config import EvaluateConfig
from bae.pipeline.harvest.config import HarvestConfig
from bae.trainer.config import TrainConfig
from bae.trainer.run_folder import RunFolder

Stage = Literal["harvest", "train", "entropy", "evaluate"]
LAYER_RUN_PREFIX = "bae-layer"
STAGES: tuple[Stage, ...] = ("harvest", "train", "entropy", "evaluate")

# The embedded default: document mode so that positions are positions in a document (entropy per
# position needs it), 32 positions of ~4000 news texts (every position group has thousands of rows,
# enough to resolve codes of up to ~9 bits), and a training run of a few minutes on a laptop CPU.
DEFAULT_HARVEST = {
    "corpus": ["staicc:agnews"],
    "mode": "document",
    "context_length": 32,
    "max_tokens": 160_000,
}
DEFAULT_TRAIN = {
    "steps": 1000,
    "batch_size": 512,
    "val_every": 500,
    "checkpoint_every": 100,
    "log_every": 50,
}
# position 0 is the attention-sink token: every row of it lies outside the BAE's typical radius (its
# code was never fitted: verdict `atypical`), and random null groups drawn with it would hold ~3% of
# those rows, whose few codes lower their plug-in by ~0.1 bits; the default reads positions 1-31,
# with bootstrap intervals over documents (~10 s more) so that every point carries one
DEFAULT_ENTROPY = {"group_by": "position", "positions": list(range(1, 32)), "bootstrap": 32}


class PipelineConfig(StrictModel):
    """One file for the whole pipeline: a workdir and each stage's own options."""

    workdir: str = Field(default="runs/default", description="where the store, checkpoints and results go")
    stages: list[Stage] = Field(default=list(STAGES), description="stages to run, in pipeline order")
    trainings: int = Field(
        default=3,
        ge=1,
        description="BAEs trained per layer (seeds seed, seed + 1, ...), read together by the entropy stage",
    )
    harvest: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_HARVEST))
    train: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_TRAIN))
    entropy: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_ENTROPY))
    evaluate: dict[str, Any] = Field(default_factory=dict)


def _linked(section: dict[str, Any], stage: str, links: dict[str, Any]) -> dict[str, Any]:
    """A stage's section plus the paths that link it to the others (set by the pipeline, not the file)."""
    clash = sorted(set(section) & set(links))
    if clash:
        raise BaeError(f"pipeline: {stage}.{clash[0]} is set by the pipeline from 'workdir'; remove it")
    return {**section, **links}


def layer_run(workdir: Path, layer: int, seed: int | None = None) -> RunFolder:
    """The run folder ``bae run`` trains one layer into (a further training: ``seed`` given)."""
    suffix = "" if seed is None else f"-seed{seed}"
    return RunFolder.at(workdir / f"{LAYER_RUN_PREFIX}{layer}{suffix}")


def _harvest_config(cfg: PipelineConfig, store_path: str) -> HarvestConfig:
    return build_config(
        HarvestConfig, _linked(cfg.harvest, "harvest", {"out": store_path}), "pipeline harvest"
    )


def _train_config(
    cfg: PipelineConfig, store_path: str, layer: int, out: Path, seed: int | None = None
) -> TrainConfig:
    section = {k: v for k, v in cfg.train.items() if k != "layer"}
    if seed is not None:
        section["seed"] = seed
    links = {"store": store_path, "layer": layer, "out": str(out)}
    return build_config(TrainConfig, _linked(section, "train", links), "pipeline train")


def _layer_trainings(
    cfg: PipelineConfig, store_path: str, workdir: Path, layer: int
) -> list[tuple[RunFolder, TrainConfig]]:
    """A layer's trainings: the first into ``bae-layer<L>`` with the section's seed, the i-th
    further one into ``bae-layer<L>-seed<S>`` with seed S = the section's seed + i."""
    first = _train_config(cfg, store_path, layer, layer_run(workdir, layer).root)
    runs = [(layer_run(workdir, layer), first)]
    for seed in range(first.seed + 1, first.seed + cfg.trainings):
        run = layer_run(workdir, layer, seed)
        runs.append((run, _train_config(cfg, store_path, layer, run.root, seed)))
    return runs


def _entropy_config(cfg: PipelineConfig, store_path: str, checkpoints: list[str], out: Path) -> EntropyConfig:
    links = {"store": store_path, "checkpoints": checkpoints, "out": str(out)}
    return build_config(EntropyConfig, _linked(cfg.entropy, "entropy", links), "pipeline entropy")


def _evaluate_config(
    cfg: PipelineConfig, store_path: str, checkpoints: list[str], out: Path
) -> EvaluateConfig:
    links = {"store": store_path, "checkpoints": checkpoints, "out": str(out)}
    return build_config(EvaluateConfig, _linked(cfg.evaluate, "evaluate", links), "pipeline evaluate")


def _harvest(cfg: PipelineConfig, store_path: str) -> str:
    from bae.pipeline.harvest.run import run_harvest
    from bae.stores import ActivationStore

    harvest_cfg = _harvest_config(cfg, store_path)
    if Path(store_path).exists():
        store = ActivationStore.open(store_path)
        if store.meta.get("config") == harvest_cfg.recorded() and store.done_mask().all():
            return f"reused {store_path} ({store.n_rows} rows, layers {store.layers})"
    result = run_harvest(harvest_cfg)
    if result.interrupted:
        raise BaeError("harvest interrupted; completed units are recorded, re-run `bae run` to resume")
    return f"{store_path}: {result.units_written} units written, {result.units_skipped} reused"


def _train(cfg: PipelineConfig, store_path: str, workdir: Path) -> list[RunFolder]:
    from bae.stores import ActivationStore
    from bae.trainer.run import train

    if not Path(store_path).exists():
        raise BaeError(f"pipeline: no store at {store_path}; run the harvest stage first")
    store = ActivationStore.open(store_path)
    layers = [cfg.train["layer"]] if "layer" in cfg.train else store.layers
    runs = []
    for layer in layers:
        for run, config in _layer_trainings(cfg, store_path, workdir, layer):
            train(config)
            runs.append(run)
    return runs


def _trained(runs: list[RunFolder], workdir: Path) -> list[str]:
    """The final models of ``runs`` (BaeError naming the train stage when one is missing)."""
    missing = [str(r.root) for r in runs if not r.finished]
    if not runs or missing:
        raise BaeError(
            f"pipeline: no trained model in {', '.join(missing) or workdir}; run the train stage first"
        )
    return [str(r.model_dir) for r in runs]


def _entropy(cfg: PipelineConfig, store_path: str, runs: list[RunFolder], workdir: Path) -> Path:
    from bae.pipeline.entropy.run import run_entropy

    models = _trained(runs, workdir)
    return run_entropy(_entropy_config(cfg, store_path, models, workdir / "entropy")).plot


def _evaluate(cfg: PipelineConfig, store_path: str, runs: list[RunFolder], workdir: Path) -> str:
    from bae.pipeline.evaluate.run import run_evaluate

    models = _trained(runs, workdir)
    result = run_evaluate(_evaluate_config(cfg, store_path, models, workdir / "evaluate"))
    if result.interrupted:
        raise BaeError("evaluate interrupted; completed units are recorded, re-run `bae run` to resume")
    spliced = [r for r in result.rows if r["checkpoint"]]
    return "; ".join(
        _spliced_text(layer, [r for r in spliced if r["layer"] == layer])
        for layer in sorted({r["layer"] for r in spliced})
    )


def _spliced_text(layer: int, rows: list[dict[str, Any]]) -> str:
    """A layer's CE recovered and KL: the value, or the range over its trainings."""
    parts = []
    for key, what in (("ce_recovered", "CE recovered"), ("kl", "KL")):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            low, high = min(values), max(values)
            parts.append(f"{what} {low:.4f}" + (f"..{high:.4f}" if len(values) > 1 else ""))
    trainings = f" over {len(rows)} trainings" if len(rows) > 1 else ""
    return f"layer {layer}: {', '.join(parts) or 'no spliced result'}{trainings}"


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages in order; each one skips or resumes what its output holds."""
    if [s for s in STAGES if s in cfg.stages] != cfg.stages:
        raise BaeError(f"pipeline: stages {cfg.stages} must be a subset of {list(STAGES)}, in that order")
    workdir = Path(cfg.workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BaeError(f"pipeline: cannot create workdir {workdir}: {exc.strerror}") from exc
    if not _writable(workdir):
        raise BaeError(f"pipeline: workdir {workdir} is not writable (a read-only volume?)")
    store_path = str(workdir / "activations.zarr")
    # every section is checked before any work starts
    _harvest_config(cfg, store_path)
    _train_config(cfg, store_path, 0, layer_run(workdir, 0).root)
    _entropy_config(cfg, store_path, ["model"], workdir / "entropy")
    _evaluate_config(cfg, store_path, ["model"], workdir / "evaluate")
    began = time.perf_counter()
    summary: dict[str, Any] = {"workdir": str(workdir)}
    if "harvest" in cfg.stages:
        summary["harvest"] = _harvest(cfg, store_path)
    if "train" in cfg.stages:
        runs = _train(cfg, store_path, workdir)
    else:
        runs = [RunFolder.at(p) for p in sorted(workdir.glob(f"{LAYER_RUN_PREFIX}*"))]
    summary["models"] = ", ".join(str(r.model_dir) for r in runs) or "(none)"
    if "entropy" in cfg.stages:
        summary["entropy plot"] = str(_entropy(cfg, store_path, runs, workdir))
    if "evaluate" in cfg.stages:
        summary["evaluate"] = _evaluate(cfg, store_path, runs, workdir)
    summary["wall time"] = f"{time.perf_counter() - began:.0f} s"
    print_summary("bae run", summary)
    return summary


def _writable(path: Path) -> bool:
    probe = path / ".bae-write-probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError:
        return False
    return True
