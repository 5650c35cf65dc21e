"""Local paths and fsspec URLs: one test of which is which."""

from __future__ import annotations


def is_local(url: str) -> bool:
    """True for a plain path or a ``file://`` URL; False for s3://, gs://, memory://, ..."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file://`` removed)."""
    return url.removeprefix("file://")
