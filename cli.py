"""The ``bae`` command line: one command per pipeline stage, plus store tools.

Every command's flags are generated from its pydantic config (``bae.common.command``), so a flag,
its ``--config`` file field and its help text are one declaration.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from bae.common.command import config_command, switch
from bae.common.configs import load_config
from bae.common.errors import BaeError
from bae.common.outputs import describe_os_error
from bae.interop.checkpoint_config import ExportCheckpointConfig, ImportCheckpointConfig
from bae.interop.dashboard_config import DashboardExportConfig
from bae.pipeline.entropy.calibrate import CalibrateConfig
from bae.pipeline.entropy.config import EntropyConfig
from bae.pipeline.evaluate.config import EvaluateConfig
from bae.pipeline.features.config import SCAN_FIELDS, FeaturesConfig
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.icl import IclPromptsConfig
from bae.stores.importer import ImportConfig, StoreRef
from bae.trainer.config import TrainConfig

app = typer.Typer(
    name="bae",
    help=(
        "Binary Autoencoders for LLM hidden states.\n\n"
        "Stages: `bae harvest` caches a causal LM's hidden states in a Zarr store, "
        "`bae train` fits a Binary Autoencoder on a store, `bae entropy` measures "
        "feature-set entropy per token position (or other groupings), `bae features` "
        "finds dense/dead features and interprets them, `bae evaluate` measures what splicing a "
        "reconstruction into the model costs. `bae store` inspects stores."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect, verify and import activation stores.", no_args_is_help=True)
features_app = typer.Typer(
    help="Dense/dead features, top contexts, ComSem interpretation, and BAE vs SAE comparison.",
    no_args_is_help=True,
)
export_app = typer.Typer(
    help="Write a checkpoint or its features in another tool's format (SAELens, sparsify, dashboards).",
    no_args_is_help=True,
)
app.add_typer(store_app, name="store")
app.add_typer(features_app, name="features")
app.add_typer(export_app, name="export")


def _harvest(config: HarvestConfig, show_progress: bool) -> int:
    from bae.pipeline.harvest.run import harvest_command

    return harvest_command(config, show_progress)


def _icl_prompts(config: IclPromptsConfig) -> None:
    from bae.pipeline.harvest.icl import write_icl_prompts

    write_icl_prompts(config)


def _train(config: TrainConfig, show_progress: bool) -> None:
    from bae.trainer.run import train

    train(config, show_progress)


def _entropy(config: EntropyConfig, show_progress: bool) -> None:
    from bae.pipeline.entropy.run import run_entropy

    run_entropy(config, show_progress)


app.command("harvest")(
    config_command(
        HarvestConfig,
        _harvest,
        "Run a causal LM over a corpus and cache hidden states of chosen layers in a Zarr store.\n\n"
        "Re-running the same command resumes; launch with `torchrun --nproc_per_node N` for data parallel.",
    )
)
app.command("icl-prompts")(
    config_command(
        IclPromptsConfig,
        _icl_prompts,
        "Write in-context-learning prompts (k demonstrations + a query) from a staicc dataset as JSONL.\n\n"
        "Harvest them with `bae harvest --corpus prompts.jsonl --text-field prompt --mode document "
        "--positions last`; group by `k` in `bae entropy`.",
        progress=False,
    )
)
app.command("train")(
    config_command(
        TrainConfig,
        _train,
        "Fit a Binary Autoencoder (or a baseline SAE) on a store layer; re-run to resume.",
    )
)


def _evaluate(config: EvaluateConfig, show_progress: bool) -> int:
    from bae.pipeline.evaluate.run import evaluate_command

    return evaluate_command(config, show_progress)


app.command("evaluate")(
    config_command(
        EvaluateConfig,
        _evaluate,
        "Splice each checkpoint's reconstruction into the LLM at its layer over held-out documents: CE loss "
        "clean, spliced, zero- and mean-ablated, CE recovered, KL and JSD with bootstrap intervals, FVU.\n\n"
        "Re-running the same command resumes; launch with `torchrun --nproc_per_node N` for data parallel.",
    )
)


def _calibrate(config: CalibrateConfig, show_progress: bool) -> None:
    from bae.pipeline.entropy.calibrate import run_calibrate

    run_calibrate(config, show_progress)


def entropy_group(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` as the callback of the ``entropy`` group: it runs when no subcommand is given, so
    ``bae entropy --store ... --checkpoint ...`` is today's command and ``bae entropy calibrate``
    a subcommand beside it."""

    def callback(ctx: typer.Context, **given: Any) -> None:
        if ctx.invoked_subcommand is None:
            command(**given)

    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    params = [ctx, *inspect.signature(command).parameters.values()]
    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__doc__ = command.__doc__
    return callback


entropy_app = typer.Typer(invoke_without_command=True)
entropy_app.callback()(
    entropy_group(
        config_command(
            EntropyConfig,
            _entropy,
            "Feature-set entropy per token position (or another grouping) over a whole store.\n\n"
            "`bae entropy calibrate` first measures how close training and the estimators get to a known "
            "entropy on synthetic data of the store's scale.",
        )
    )
)
entropy_app.command("calibrate")(
    config_command(
        CalibrateConfig,
        _calibrate,
        "Train and measure on synthetic stores of known code entropy at a store layer's d and scale; "
        "a table of truth vs estimate (run it before trusting an entropy number).\n\n"
        "Takes every `bae train` option, applied to each synthetic set as given; re-running resumes.",
    )
)
app.add_typer(entropy_app, name="entropy")

SCAN = [*SCAN_FIELDS, "out", "batch_rows", "scheduler", "device"]
LLM = ["interpret.backend", "interpret.model", "interpret.base_url", "interpret.threshold"]
LLM += ["interpret.max_features"]


def _frequency(config: FeaturesConfig, show_progress: bool) -> None:
    from bae.pipeline.features.frequency import run_frequency

    run_frequency(config, show_progress)


def _contexts(config: FeaturesConfig, show_progress: bool) -> None:
    from bae.pipeline.features.contexts import run_contexts

    run_contexts(config, show_progress)


def _interpret(config: FeaturesConfig, show_progress: bool) -> None:
    from bae.pipeline.features.interpret import run_interpret

    run_interpret(config, show_progress)


def _compare(config: FeaturesConfig, interpret: bool, evaluate: bool, show_progress: bool) -> None:
    from bae.pipeline.features.compare import run_compare

    run_compare(config, interpret, show_progress, evaluate)


CONTEXTS = [*SCAN, "seed", "top_k", "z_score", "tokenizer", "context_before", "context_after"]
features_app.command("frequency")(
    config_command(
        FeaturesConfig,
        _frequency,
        "Firing frequency of every feature: dense counts, dead features, histogram, JSON/CSV table.",
        only=[*SCAN, "dense_thresholds"],
    )
)
features_app.command("contexts")(
    config_command(
        FeaturesConfig,
        _contexts,
        "Top contexts per feature (seeded tie-breaking) as contexts.json and an offline report.html.",
        only=CONTEXTS,
    )
)
features_app.command("interpret")(
    config_command(
        FeaturesConfig,
        _interpret,
        "ComSem: explain features with an LLM, judge further samples yes/no; cached, re-runs are free.",
        only=[*CONTEXTS, *LLM],
    )
)
features_app.command("compare")(
    config_command(
        FeaturesConfig,
        _compare,
        "Checkpoints on the same store side by side: dense/dead counts, FVU, mean L0, spliced CE, CE "
        "recovered and KL (`bae evaluate`), interpretable count.",
        only=[*(f for f in SCAN if f != "checkpoint"), "checkpoints", "dense_thresholds", *LLM],
        extras=[
            switch("interpret", "--interpret/--no-interpret", "Also run ComSem on each checkpoint."),
            switch(
                "evaluate",
                "--evaluate/--no-evaluate",
                "Splice each checkpoint into the store's LLM over its held-out documents (`bae evaluate`).",
                default=True,
            ),
        ],
    )
)


def _export_dashboard(config: DashboardExportConfig) -> None:
    from bae.interop.dashboard import export_dashboard

    export_dashboard(config)


export_app.command("dashboard")(
    config_command(
        DashboardExportConfig,
        _export_dashboard,
        "Features of a `bae features contexts` output as SAEDashboard / Neuronpedia batch-<n>.json files: "
        "frequency, decoder alignment, top contexts with a value per token, ComSem explanations.",
        progress=False,
    )
)


@app.command("run")
def run_pipeline_command(
    pipeline: Annotated[
        Path | None, typer.Argument(help="Pipeline file (YAML/TOML/JSON); none = the embedded default.")
    ] = None,
    workdir: Annotated[str | None, typer.Option(help="Where outputs go [runs/default].")] = None,
) -> None:
    """Run harvest -> train -> entropy -> evaluate from one pipeline file, each stage resuming."""
    from bae.pipeline.run import PipelineConfig, run_pipeline

    run_pipeline(load_config(PipelineConfig, pipeline, {"workdir": workdir}))


def _store_info(config: StoreRef) -> None:
    from bae.common.console import print_summary
    from bae.stores import ActivationStore
    from bae.stores.info import store_summary

    print_summary("activation store", store_summary(ActivationStore.open(config.store)))


def _store_verify(config: StoreRef) -> int:
    from bae.stores import ActivationStore
    from bae.stores.verify import verify_store

    opened = ActivationStore.open(config.store)
    report = verify_store(opened)
    for unit, problems in sorted(report.problems.items()):
        start, stop = opened.unit_range(unit)
        print(f"unit {unit} (rows {start}..{stop}): {'; '.join(problems)}")
    if report.temporaries:
        print(
            f"{len(report.temporaries)} stray temporary file(s) left by killed writes, never read "
            f"(safe to delete while no harvest or import runs), e.g. {report.temporaries[0]}"
        )
    status = "OK" if report.ok else f"{len(report.problems)} bad unit(s)"
    print(f"{opened.url}: {status}; {report.checked} units checked, {len(report.incomplete)} not yet written")
    return 0 if report.ok else 1


def _store_import(config: ImportConfig, show_progress: bool) -> None:
    from bae.stores.importer import import_activations

    import_activations(config, show_progress)


store_app.command("info")(
    config_command(
        StoreRef,
        _store_info,
        "Summarize a store: model, layers, d_model, dtype, rows, units, bytes on disk.",
        progress=False,
    )
)
store_app.command("verify")(
    config_command(
        StoreRef,
        _store_verify,
        "Check every recorded unit: readable, right shapes and dtypes, finite, consistent row arrays.",
        progress=False,
    )
)
store_app.command("import")(
    config_command(
        ImportConfig,
        _store_import,
        "Make a store from activations made elsewhere: (N, d) rows, each its own document at position 0; "
        "(batch, seq, d) caches with token ids and a padding mask, document = batch index and position = "
        "seq index; or a SAELens activation cache, with its token ids and hook name.",
        only=[
            *("src", "out", "layer", "tensor", "tokens", "mask", "lengths", "doc_ids", "special_tokens"),
            *("hook", "model", "dtype", "unit_rows", "overflow"),
        ],
    )
)


def _export_saelens(config: ExportCheckpointConfig) -> None:
    from bae.interop.saelens import export_saelens

    export_saelens(config)


def _export_sparsify(config: ExportCheckpointConfig) -> None:
    from bae.interop.sparsify import export_sparsify

    export_sparsify(config)


def _import_checkpoint(config: ImportCheckpointConfig) -> None:
    from bae.interop.checkpoint_import import import_checkpoint

    import_checkpoint(config)


export_app.command("saelens")(
    config_command(
        ExportCheckpointConfig,
        _export_saelens,
        "Write a checkpoint as a SAELens 6.x SAE directory: relu_sae as `standard`, topk_sae as `topk`, "
        "bae as the `bae` architecture of bae.interop.saelens_bae; input standardization folded in.",
        progress=False,
    )
)
export_app.command("sparsify")(
    config_command(
        ExportCheckpointConfig,
        _export_sparsify,
        "Write a topk_sae checkpoint as a sparsify run (<out>/<hookpoint>/cfg.json + sae.safetensors).",
        progress=False,
    )
)
app.command("import-checkpoint")(
    config_command(
        ImportCheckpointConfig,
        _import_checkpoint,
        "Turn a SAELens (standard, topk, bae) or sparsify SAE into a bae checkpoint that `bae features "
        "compare` and `bae evaluate` take beside a BAE (give --store to record its store).",
        progress=False,
    )
)


def main() -> None:
    """Console entry point: user-facing errors become one line on stderr and exit status 2."""
    try:
        app()
    except BaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        message = describe_os_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
