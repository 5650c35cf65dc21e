"""The ``bae`` command line: one command per pipeline stage, plus store tools."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from bae.stores import ActivationStore

from bae.errors import BaeError
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


def _not_implemented(stage: str) -> None:
    raise BaeError(f"`bae {stage}` is not implemented yet")


@app.command()
def harvest(config: ConfigOpt = None) -> None:
    """Run a causal LM over a corpus and cache hidden states of chosen layers in a Zarr store."""
    _not_implemented("harvest")


register_train(app)  # `bae train`: one flag per TrainConfig field (bae/trainer/command.py)


@app.command()
def entropy(config: ConfigOpt = None) -> None:
    """Feature-set entropy per token position (or another grouping) over a whole store."""
    _not_implemented("entropy")


StoreArg = Annotated[
    str | None, typer.Argument(help="Store path or fsspec URL (s3://, gs://, memory://).")
]


def _open_store(store: str | None, config: Path | None) -> ActivationStore:
    """The store named on the command line, or by the ``store`` field of a config file."""
    from bae.configs import load_config
    from bae.stores import ActivationStore
    from bae.stores.importer import StoreRef

    return ActivationStore.open(load_config(StoreRef, config, {"store": store}).store)


@store_app.command("info")
def store_info(store: StoreArg = None, config: ConfigOpt = None) -> None:
    """Summarize a store: model, layers, d_model, dtype, rows, units, bytes on disk."""
    from bae.console import print_summary
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
    layer: Annotated[int | None, typer.Option(help="Layer index to record [default: 0].")] = None,
    tensor: Annotated[str | None, typer.Option(help="Tensor name in a .safetensors file.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float16 (default), bfloat16 or float32.")] = None,
    unit_rows: Annotated[int | None, typer.Option(help="Rows per unit/chunk [default: 4096].")] = None,
    overflow: Annotated[str | None, typer.Option(help="error (default) or clamp.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Make a store from activations made elsewhere (each row its own document, position 0)."""
    from bae.configs import load_config
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
