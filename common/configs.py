"""Stage configs: pydantic models loaded from YAML/TOML/JSON files, with CLI flags on top."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from bae.common.errors import BaeError, first_line

C = TypeVar("C", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config: unknown fields are errors, inf and NaN are refused, values are
    validated on assignment."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a mapping from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise BaeError(f"config file {path}: not found")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise BaeError(f"config file {path}: unknown suffix {suffix!r}, expected .yaml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise BaeError(f"config file {path}: cannot parse: {first_line(exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BaeError(f"config file {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming every bad field and what was expected."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif not err["loc"]:
            parts.append(err["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"field {loc!r}: {err['msg'].removeprefix('Value error, ')}")
    return f"{source}: " + "; ".join(parts)


def build_config(cls: type[C], data: dict[str, Any], source: str) -> C:
    """Validate ``data`` as ``cls``, turning pydantic's report into a one-line BaeError."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise BaeError(describe_validation_error(exc, source)) from exc


def comma_list(value: Any) -> Any:
    """``"4, 8"`` (a flag, or a string in a config file) -> ``["4", "8"]`` for the field's own type to
    parse; lists and other values pass through unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _layer_number(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


LayerRef = Annotated[int | str, BeforeValidator(_layer_number)]
"""A store layer: its index (``"6"`` is 6), or the name of a hook site it holds (``bae harvest --hook``)."""


def merge_nested(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s values on top; nested sections are merged field by field."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_nested(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[C], path: str | Path | None, overrides: dict[str, Any]) -> C:
    """File values, then the overrides that were given (not None) on top, validated as ``cls``."""
    data = read_config_file(path) if path else {}
    data = merge_nested(data, {k: v for k, v in overrides.items() if v is not None})
    return build_config(cls, data, f"config {path}" if path else "options")


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Fields that differ between two config dicts, as ``name: old -> new`` lines."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_diff(a, b, prefix=f"{name}."))
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs


def require_same_config(what: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to continue ``what`` with a config that differs from the recorded one."""
    diffs = config_diff(old, new)
    if diffs:
        raise BaeError(
            f"{what} was made with a different config ({'; '.join(diffs)}); "
            "use the same config to resume, or a new output path"
        )
