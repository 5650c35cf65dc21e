"""Typer commands generated from pydantic configs: one flag per config field, help from its description.

A field declares how it appears on the command line with ``json_schema_extra=cli(...)``: a short flag,
a different flag name, hidden aliases kept for old scripts, or a positional argument. Every flag
defaults to "not given", so only the flags a user typed override the ``--config`` file's values.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.markup import escape

from bae.common.configs import build_config, comma_list, merge_nested, read_config_file

C = TypeVar("C", bound=BaseModel)
CLI_KEY = "cli"


def cli(
    short: str | None = None,
    *,
    flag: str | None = None,
    hidden: Sequence[str] = (),
    argument: bool = False,
) -> dict[str, Any]:
    """Command-line spelling of a config field, for ``Field(json_schema_extra=cli(...))``."""
    return {CLI_KEY: {"short": short, "flag": flag, "hidden": list(hidden), "argument": argument}}


@dataclass(frozen=True)
class FieldFlag:
    """One config field (``path`` inside nested sections) as a command-line parameter."""

    path: tuple[str, ...]
    field: FieldInfo

    @property
    def param(self) -> str:
        return "__".join(self.path)

    @property
    def spec(self) -> dict[str, Any]:
        extra = self.field.json_schema_extra
        return (extra or {}).get(CLI_KEY, {}) if isinstance(extra, dict) else {}  # type: ignore[return-value]

    @property
    def flag(self) -> str:
        return self.spec.get("flag") or "--" + self.path[-1].replace("_", "-")

    def parameters(self) -> list[inspect.Parameter]:
        """The typer parameter of this field, and one hidden parameter per old alias."""
        spec, kind = self.spec, inspect.Parameter.KEYWORD_ONLY
        flag_type = _flag_type(self.field.annotation)
        if spec.get("argument"):
            info: Any = typer.Argument(help=field_help(self.field), show_default=False)
            return [inspect.Parameter(self.param, kind, default=None, annotation=Annotated[flag_type, info])]
        decls = [self.flag] + ([spec["short"]] if spec.get("short") else [])
        if _base(self.field.annotation) is bool:
            decls = [f"{self.flag}/--no-{self.flag[2:]}", *decls[1:]]
        main = typer.Option(*decls, help=field_help(self.field), show_default=False)
        params = [inspect.Parameter(self.param, kind, default=None, annotation=Annotated[flag_type, main])]
        for i, alias in enumerate(spec.get("hidden", [])):
            hidden = typer.Option(alias, hidden=True, show_default=False)
            params.append(
                inspect.Parameter(
                    f"{self.param}__alias{i}", kind, default=None, annotation=Annotated[flag_type, hidden]
                )
            )
        return params


def _base(annotation: Any) -> Any:
    """The annotation without ``None`` in a union."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _flag_type(annotation: Any) -> Any:
    """What typer parses a field's flag as: lists of strings repeat, other composites are strings."""
    base = _base(annotation)
    if base in (bool, int, float, str, Path):
        return Optional[base]  # noqa: UP045 (typer needs typing.Optional)
    if typing.get_origin(base) is list and typing.get_args(base) == (str,):
        return Optional[list[str]]  # noqa: UP045
    return Optional[str]  # noqa: UP045 (Literal choices, int lists, unions: the config parses them)


def _is_number_list(annotation: Any) -> bool:
    base = _base(annotation)
    return typing.get_origin(base) is list and typing.get_args(base) in ((int,), (float,))


def _default_text(field: FieldInfo) -> str | None:
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or value == [] or isinstance(value, BaseModel):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def field_help(field: FieldInfo) -> str:
    """The field's description as a sentence, its choices and its real default."""
    description = field.description or ""
    text = description[:1].upper() + description[1:] + ("." if description else "")
    base = _base(field.annotation)
    if typing.get_origin(base) is typing.Literal:
        text += f" One of: {', '.join(map(str, typing.get_args(base)))}."
    default = _default_text(field)
    if default is not None:
        text += f" [default: {default}]"
    return escape(text.strip())


def field_flags(cls: type[BaseModel], only: Iterable[str] | None = None) -> list[FieldFlag]:
    """A flag per field of ``cls`` (nested config sections flattened), in declaration order.

    ``only`` names the fields to expose, dotted for nested ones (``interpret.model``); default all
    top-level fields that are not config sections.
    """
    wanted = None if only is None else set(only)
    own = set(getattr(cls, "__annotations__", {}))
    names = sorted(cls.model_fields, key=lambda n: n not in own)  # the command's own fields first
    if only is not None:
        order = {name.split(".")[0]: i for i, name in enumerate(only)}
        names = sorted(names, key=lambda n: order.get(n, len(order)))
    flags = []
    for name in names:
        field = cls.model_fields[name]
        nested = _base(field.annotation)
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            for sub, sub_field in nested.model_fields.items():
                if wanted is not None and f"{name}.{sub}" in wanted:
                    flags.append(FieldFlag((name, sub), sub_field))
        elif wanted is None or name in wanted:
            flags.append(FieldFlag((name,), field))
    return flags


CONFIG_PARAM = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--config", "-c", help="YAML/TOML/JSON file of options; flags given here win."),
    ],
)
PROGRESS_PARAM = inspect.Parameter(
    "progress",
    inspect.Parameter.KEYWORD_ONLY,
    default=True,
    annotation=Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")],
)


def switch(name: str, decl: str, help: str, default: bool = False) -> inspect.Parameter:
    """An on/off option of a command that is not a config field (passed to its run function)."""
    option = typer.Option(decl, help=help)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[bool, option]
    )


def flag_values(flags: list[FieldFlag], given: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of the flags that were given (a hidden alias counts when the flag is absent)."""
    data: dict[str, Any] = {}
    for f in flags:
        value = given.get(f.param)
        for i in range(len(f.spec.get("hidden", []))):
            alias = given.get(f"{f.param}__alias{i}")
            value = alias if value is None else value
        if value is None or value == []:
            continue
        if _is_number_list(f.field.annotation):
            value = comma_list(value)  # "0.1,0.2" -> the config parses each
        node = data
        for key in f.path[:-1]:
            node = node.setdefault(key, {})
        node[f.path[-1]] = value
    return data


def config_command(
    cls: type[C],
    run: Callable[..., Any],
    doc: str,
    only: Iterable[str] | None = None,
    extras: Sequence[inspect.Parameter] = (),
    progress: bool = True,
    config_file: bool = True,
) -> Callable[..., Any]:
    """A typer command whose flags are ``cls``'s fields; it calls ``run(config, **extras)``.

    ``extras`` are parameters that are not config fields (switches of the command itself); with
    ``progress`` a ``--progress/--no-progress`` switch is passed as ``show_progress``.
    """
    flags = field_flags(cls, only)
    params = [p for f in flags for p in f.parameters()]
    params += [CONFIG_PARAM] if config_file else []
    params += [*extras] + ([PROGRESS_PARAM] if progress else [])
    extra_names = {p.name for p in extras}

    def command(**given: Any) -> None:
        path = given.get("config")
        data = merge_nested(read_config_file(path) if path else {}, flag_values(flags, given))
        config = build_config(cls, data, f"config {path}" if path else "options")
        kwargs = {k: given[k] for k in extra_names}
        if progress:
            kwargs["show_progress"] = given["progress"]
        status = run(config, **kwargs)
        if isinstance(status, int) and status:
            raise typer.Exit(status)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command
