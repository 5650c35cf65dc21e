"""Local paths and fsspec URLs: one test of which is which."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bae.common.errors import BaeError


def is_local(url: str) -> bool:
    """True for a plain path or a ``file://`` URL; False for s3://, gs://, memory://, ..."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file://`` removed)."""
    return url.removeprefix("file://")


def resolved(url: str) -> str:
    """A local path made absolute (symlinks resolved; ``file://`` removed); other URLs unchanged.
    Two spellings of one local file compare equal after this."""
    return str(Path(local_path(url)).resolve()) if is_local(url) else url


def with_resolved_paths(data: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """``data`` with its path ``fields`` (a path, a list of paths, or None) resolved, for comparing
    a recorded config with a new one however either spelled its paths."""
    out = dict(data)
    for name in fields:
        value = out.get(name)
        if isinstance(value, str):
            out[name] = resolved(value)
        elif isinstance(value, list):
            out[name] = [resolved(v) if isinstance(v, str) else v for v in value]
    return out


def url_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a URL, made with ``storage_options`` (endpoint, credentials; the
    backend's environment variables apply where these say nothing); one line when its protocol's
    package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:  # fsspec names the package, e.g. "Install s3fs to access S3"
        raise BaeError(f"{url}: {exc} (pip install it next to bae)") from None
    except ValueError as exc:  # an unknown protocol
        raise BaeError(f"{url}: {exc}") from None
