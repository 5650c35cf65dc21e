"""The ``bae features`` sub-commands: frequency, contexts, interpret, compare (all take ``--config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

features_app = typer.Typer(
    help="Dense/dead features, top contexts, ComSem interpretation, and BAE vs SAE comparison.",
    no_args_is_help=True,
)


def _opt(*decls: str, help: str) -> Any:
    return typer.Option(*decls, help=help, show_default=False)


ConfigOpt = Annotated[Path | None, _opt("--config", "-c", help="YAML/TOML/JSON file of options; flags win.")]
StoreOpt = Annotated[str | None, _opt("--store", "-s", help="Activation store (path or URL).")]
CheckpointOpt = Annotated[str | None, _opt("--checkpoint", "-m", help="Autoencoder dir or `bae train` out.")]
OutOpt = Annotated[str | None, _opt("--out", "-o", help="Output directory (default: features).")]
LayerOpt = Annotated[int | None, _opt("--layer", help="Store layer (default: the checkpoint's).")]
MaxRowsOpt = Annotated[int | None, _opt("--max-rows", help="Use only the first units up to this many rows.")]
SeedOpt = Annotated[int | None, _opt("--seed", help="Tie-breaking and sampling seed (default: 0).")]
SchedulerOpt = Annotated[
    str | None, _opt("--scheduler", help="dask scheduler address (default: local threads).")
]
TopKOpt = Annotated[int | None, _opt("--top-k", help="Contexts kept per feature (default: 20).")]
ZScoreOpt = Annotated[bool | None, _opt("--z-score/--no-z-score", help="SAE scores z-scored per feature.")]
TokenizerOpt = Annotated[
    str | None, _opt("--tokenizer", help="Tokenizer to decode with (default: the store's model).")
]
BackendOpt = Annotated[str | None, _opt("--backend", help="openai|transformers (default: openai).")]
LlmOpt = Annotated[str | None, _opt("--llm", help="Chat model name or local model (default: gpt-4o-mini).")]
BaseUrlOpt = Annotated[
    str | None, _opt("--base-url", help="OpenAI-compatible …/v1 (default: $BAE_LLM_BASE_URL).")
]
ThresholdOpt = Annotated[
    float | None, _opt("--threshold", help="Interpretable: score > this (default: 0.5).")
]
MaxFeaturesOpt = Annotated[
    int | None, _opt("--max-features", help="Interpret a seeded sample of N features.")
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


_INTERPRET_FLAGS = {
    "backend": "backend",
    "llm": "model",
    "base_url": "base_url",
    "threshold": "threshold",
    "max_features": "max_features",
}
_NOT_CONFIG = {"config", "progress", "interpret"}  # compare's --interpret is a switch, not a field


def _config(params: dict[str, Any]) -> Any:
    """A command's FeaturesConfig from its parameters: the ``--config`` file's values, then the flags
    given on top (the ComSem flags into the file's ``interpret`` section)."""
    from bae.common.configs import build_config, read_config_file
    from bae.pipeline.features.config import FeaturesConfig

    config = params["config"]
    data = read_config_file(config) if config else {}
    for name, value in params.items():
        if value is None or name in _NOT_CONFIG:
            continue
        if name in _INTERPRET_FLAGS:
            data["interpret"] = {**(data.get("interpret") or {}), _INTERPRET_FLAGS[name]: value}
        else:
            data[name] = value
    return build_config(FeaturesConfig, data, f"config {config}" if config else "options")


@features_app.command("frequency")
def frequency(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    checkpoint: CheckpointOpt = None,
    out: OutOpt = None,
    layer: LayerOpt = None,
    max_rows: MaxRowsOpt = None,
    scheduler: SchedulerOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Firing frequency of every feature: dense counts, dead features, histogram, JSON/CSV table."""
    params = dict(locals())
    from bae.pipeline.features.frequency import run_frequency

    run_frequency(_config(params), progress)


@features_app.command("contexts")
def contexts(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    checkpoint: CheckpointOpt = None,
    out: OutOpt = None,
    layer: LayerOpt = None,
    max_rows: MaxRowsOpt = None,
    seed: SeedOpt = None,
    scheduler: SchedulerOpt = None,
    top_k: TopKOpt = None,
    z_score: ZScoreOpt = None,
    tokenizer: TokenizerOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Top contexts per feature (seeded tie-breaking) as contexts.json and an offline report.html."""
    params = dict(locals())
    from bae.pipeline.features.contexts import run_contexts

    run_contexts(_config(params), progress)


@features_app.command("interpret")
def interpret(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    checkpoint: CheckpointOpt = None,
    out: OutOpt = None,
    layer: LayerOpt = None,
    max_rows: MaxRowsOpt = None,
    seed: SeedOpt = None,
    scheduler: SchedulerOpt = None,
    z_score: ZScoreOpt = None,
    tokenizer: TokenizerOpt = None,
    backend: BackendOpt = None,
    llm: LlmOpt = None,
    base_url: BaseUrlOpt = None,
    threshold: ThresholdOpt = None,
    max_features: MaxFeaturesOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """ComSem: explain features with an LLM, judge further samples yes/no; cached, re-runs are free."""
    params = dict(locals())
    from bae.pipeline.features.interpret import run_interpret

    run_interpret(_config(params), progress)


@features_app.command("compare")
def compare(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    checkpoints: Annotated[
        list[str] | None, _opt("--checkpoint", "-m", help="A checkpoint; repeat it.")
    ] = None,
    out: OutOpt = None,
    layer: LayerOpt = None,
    max_rows: MaxRowsOpt = None,
    scheduler: SchedulerOpt = None,
    interpret: Annotated[
        bool, typer.Option("--interpret/--no-interpret", help="Also run ComSem on each checkpoint.")
    ] = False,
    backend: BackendOpt = None,
    llm: LlmOpt = None,
    base_url: BaseUrlOpt = None,
    threshold: ThresholdOpt = None,
    max_features: MaxFeaturesOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Checkpoints on the same store side by side: dense/dead counts, FVU, mean L0, interpretable count."""
    params = dict(locals())
    from bae.pipeline.features.compare import run_compare

    run_compare(_config(params), interpret, progress)


def register(app: typer.Typer) -> None:
    """Add ``features`` to the ``bae`` app."""
    app.add_typer(features_app, name="features")
