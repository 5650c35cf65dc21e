"""The ``bae train`` command: one CLI flag per ``TrainConfig`` field, generated from the model."""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bae.common.configs import load_config
from bae.trainer.config import TrainConfig


def _flag_type(annotation: Any) -> Any:
    """The Optional[...] type typer should parse a field's flag as (Literal -> str)."""
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(base) is typing.Literal:
        base = str  # every Literal field of TrainConfig is a choice of strings
    return Optional[base]  # noqa: UP045 (typer needs a typing.Optional)


def _field_help(field: Any) -> str:
    annotation = field.annotation
    description = field.description or ""
    text = description[:1].upper() + description[1:] + "."
    if typing.get_origin(annotation) is typing.Literal:
        text += f" One of: {', '.join(map(str, typing.get_args(annotation)))}."
    if not field.is_required():
        text += f" (default: {field.default})"
    return text.strip()


def train_command(
    out: Path,
    config: Optional[Path] = None,  # noqa: UP045
    progress: bool = True,
    **flags: Any,
) -> None:
    """Fit a Binary Autoencoder (or a baseline SAE) on a store layer; re-run to resume."""
    from bae.trainer.loop import train

    train(load_config(TrainConfig, config, flags), out, show_progress=progress)


def _signature() -> inspect.Signature:
    params = [
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[Path, typer.Option("--out", "-o", help="Output run directory.")],
        ),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Optional[Path],  # noqa: UP045
                typer.Option("--config", "-c", help="YAML/TOML/JSON file of options; flags given here win."),
            ],
        ),
        inspect.Parameter(
            "progress",
            inspect.Parameter.KEYWORD_ONLY,
            default=True,
            annotation=Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")],
        ),
    ]
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if field.annotation is bool else [flag]
        option = typer.Option(*decls, help=_field_help(field), show_default=False)
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[_flag_type(field.annotation), option],
            )
        )
    return inspect.Signature(params)


def _command(**kwargs: Any) -> None:
    train_command(**kwargs)


_command.__signature__ = _signature()  # type: ignore[attr-defined]
_command.__doc__ = train_command.__doc__


def register(app: typer.Typer) -> None:
    """Add ``train`` to the ``bae`` app."""
    app.command(name="train")(_command)
