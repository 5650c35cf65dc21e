"""The ``bae`` command line: one command per pipeline stage, plus store tools."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from bae.stores import ActivationStore

from bae.common.errors import BaeError
from bae.pipeline.features_command import register as register_features
from bae.trainer.command import register as register_train

app = typer.Typer(
    name="bae",
    help=(
        "Binary Autoencoders for LLM hidden states.\n\n"
        "Stages: `bae harvest` caches a causal LM's hidden states in a Zarr store, "
        "`bae train` fits a Binary Autoencoder on a store, `bae entropy` measures "
        "feature-set entropy per token position (or other groupings), `bae features` "
        "finds dense/dead features and interprets them. `bae store` inspects stores."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect, verify and import activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML/TOML/JSON file of options; flags given here win."),
]


def _opt(*decls: str, help: str) -> typer.models.OptionInfo:
    return typer.Option(*decls, help=help, show_default=False)


_Str = str | None
_Int = int | None


@app.command()
def harvest(
    config: ConfigOpt = None,
    output: Annotated[_Str, _opt("--output", "-o", help="Store path or URL [activations.zarr].")] = None,
    model: Annotated[_Str, _opt("--model", "-m", help="Hub id, local dir, .gguf [SmolLM2].")] = None,
    model_dtype: Annotated[_Str, _opt("--model-dtype", help="auto|float32|float16|bfloat16.")] = None,
    device_map: Annotated[_Str, _opt("--device-map", help="accelerate device_map, e.g. auto.")] = None,
    corpus: Annotated[
        list[str] | None, _opt("--corpus", help="File, dir, glob or saved dataset; repeatable [builtin].")
    ] = None,
    text_field: Annotated[_Str, _opt("--text-field", help="JSON/Parquet text field [text].")] = None,
    line_docs: Annotated[bool | None, _opt("--line-docs/--file-docs", help="A document per line.")] = None,
    encoding_errors: Annotated[_Str, _opt("--encoding-errors", help="strict|replace [strict].")] = None,
    mode: Annotated[_Str, _opt("--mode", help="packed|document [packed].")] = None,
    context_length: Annotated[_Int, _opt("--context-length", help="Tokens per window [512].")] = None,
    bos: Annotated[_Str, _opt("--bos", help="auto|always|never: BOS at window start [auto].")] = None,
    positions: Annotated[_Str, _opt("--positions", help="all|last|list, e.g. 0,8,16 [all].")] = None,
    layers: Annotated[_Str, _opt("--layers", help="hidden_states indices, e.g. 3,6,9 [n_layers//2].")] = None,
    store_dtype: Annotated[_Str, _opt("--store-dtype", help="float16|bfloat16|float32 [float16].")] = None,
    overflow: Annotated[_Str, _opt("--overflow", help="error|clamp beyond the dtype range [error].")] = None,
    compressor: Annotated[_Str, _opt("--compressor", help="none|zstd [none].")] = None,
    unit_rows: Annotated[_Int, _opt("--unit-rows", help="Rows per unit/chunk [~4096].")] = None,
    batch_tokens: Annotated[_Int, _opt("--batch-tokens", help="Tokens per forward batch [8192].")] = None,
    max_tokens: Annotated[_Int, _opt("--max-tokens", help="Input token budget [all; builtin 65536].")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Run a causal LM over a corpus and cache hidden states of chosen layers in a Zarr store.

    Re-running the same command resumes; launch with `torchrun --nproc_per_node N` for data parallel.
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "progress")}
    from bae.common.configs import load_config
    from bae.pipeline.harvest.run import HarvestConfig, harvest_command

    status = harvest_command(load_config(HarvestConfig, config, flags), show_progress=progress)
    if status:
        raise typer.Exit(status)


register_train(app)  # `bae train`: one flag per TrainConfig field (bae/trainer/command.py)
register_features(app)  # `bae features frequency|contexts|interpret|compare` (pipeline/features_command.py)


@app.command()
def entropy(
    config: ConfigOpt = None,
    store: Annotated[_Str, _opt("--store", "-s", help="Activation store (path or URL).")] = None,
    checkpoint: Annotated[
        list[str] | None,
        _opt("--checkpoint", help="Autoencoder dir; repeatable: one per layer or per (layer, positions)."),
    ] = None,
    out: Annotated[_Str, _opt("--out", "-o", help="Output directory (default: entropy).")] = None,
    group_by: Annotated[
        _Str, _opt("--group-by", help="position|document|token|all|a per-document field (default: position).")
    ] = None,
    positions: Annotated[_Str, _opt("--positions", help="Only these positions, e.g. 0-63 or 0,8,16.")] = None,
    split: Annotated[_Str, _opt("--split", help="train|val split of the documents (default: all).")] = None,
    bootstrap: Annotated[_Int, _opt("--bootstrap", help="Bootstrap replicates over documents [0].")] = None,
    joint_max_bits: Annotated[_Int, _opt("--joint-max-bits", help="Joint plug-in up to d' bits [20].")] = (
        None
    ),
    batch_rows: Annotated[_Int, _opt("--batch-rows", help="Rows encoded at once [4096].")] = None,
    scheduler: Annotated[_Str, _opt("--scheduler", help="dask scheduler (default: local threads).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Feature-set entropy per token position (or another grouping) over a whole store."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "progress", "checkpoint")}
    from bae.common.configs import load_config
    from bae.pipeline.entropy.run import EntropyConfig, run_entropy

    flags["checkpoints"] = checkpoint or None
    run_entropy(load_config(EntropyConfig, config, flags), show_progress=progress)


@app.command("run")
def run_pipeline_command(
    pipeline: Annotated[
        Path | None, typer.Argument(help="Pipeline file (YAML/TOML/JSON); none = the embedded default.")
    ] = None,
    workdir: Annotated[str | None, typer.Option(help="Where outputs go (default: runs/default).")] = None,
) -> None:
    """Run harvest -> train -> entropy from one pipeline file, each stage resuming from its output."""
    from bae.common.configs import load_config
    from bae.pipeline.run import PipelineConfig, run_pipeline

    run_pipeline(load_config(PipelineConfig, pipeline, {"workdir": workdir}))


StoreArg = Annotated[str | None, typer.Argument(help="Store path or fsspec URL (s3://, gs://, memory://).")]


def _open_store(store: str | None, config: Path | None) -> ActivationStore:
    """The store named on the command line, or by the ``store`` field of a config file."""
    from bae.common.configs import load_config
    from bae.stores import ActivationStore
    from bae.stores.importer import StoreRef

    return ActivationStore.open(load_config(StoreRef, config, {"store": store}).store)


@store_app.command("info")
def store_info(store: StoreArg = None, config: ConfigOpt = None) -> None:
    """Summarize a store: model, layers, d_model, dtype, rows, units, bytes on disk."""
    from bae.common.console import print_summary
    from bae.stores.info import store_summary

    print_summary("activation store", store_summary(_open_store(store, config)))


@store_app.command("verify")
def store_verify(store: StoreArg = None, config: ConfigOpt = None) -> None:
    """Check every recorded unit: readable, right shapes and dtypes, finite, consistent row arrays."""
    from bae.stores.verify import verify_store

    opened = _open_store(store, config)
    report = verify_store(opened)
    for unit, problems in sorted(report.problems.items()):
        start, stop = opened.unit_range(unit)
        print(f"unit {unit} (rows {start}..{stop}): {'; '.join(problems)}")
    status = "OK" if report.ok else f"{len(report.problems)} bad unit(s)"
    print(f"{opened.url}: {status}; {report.checked} units checked, {len(report.incomplete)} not yet written")
    if not report.ok:
        raise typer.Exit(1)


@store_app.command("import")
def store_import(
    src: Annotated[
        str | None, typer.Argument(help=".npy, .safetensors or Zarr array of shape [N, d].")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Store to create.")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer index to record (default: 0).")] = None,
    tensor: Annotated[str | None, typer.Option(help="Tensor name in a .safetensors file.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float16 (default), bfloat16 or float32.")] = None,
    unit_rows: Annotated[int | None, typer.Option(help="Rows per unit/chunk (default: 4096).")] = None,
    overflow: Annotated[str | None, typer.Option(help="error (default) or clamp.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Make a store from activations made elsewhere (each row its own document, position 0)."""
    from bae.common.configs import load_config
    from bae.stores.importer import ImportConfig, import_activations

    flags = dict(src=src, out=out, layer=layer, tensor=tensor, dtype=dtype, unit_rows=unit_rows)
    import_activations(load_config(ImportConfig, config, {**flags, "overflow": overflow}))


def main() -> None:
    """Console entry point: user-facing errors become one line on stderr and exit status 2."""
    try:
        app()
    except BaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
