"""The ``bae`` command line: one command per pipeline stage, plus store tools."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from bae.errors import BaeError

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


@app.command()
def train(config: ConfigOpt = None) -> None:
    """Fit a Binary Autoencoder on a store's hidden states (streaming, resumable)."""
    _not_implemented("train")


@app.command()
def entropy(config: ConfigOpt = None) -> None:
    """Feature-set entropy per token position (or another grouping) over a whole store."""
    _not_implemented("entropy")


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
