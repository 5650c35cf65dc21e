"""Whole-or-nothing file writes: write a temporary sibling, then rename it over the target."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shareable(path: str | Path, directory: bool = False) -> None:
    """Give a file or directory made by ``tempfile`` (0600/0700) the usual permissions under the umask,
    so results on a shared volume are readable by the team, as any normally created file would be."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def temporary_dir(target: Path) -> Path:
    """A fresh sibling directory of ``target`` to fill and then rename onto it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    shareable(tmp, directory=True)
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any | None:
    """The parsed file, or None if it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def atomic_savefig(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure atomically (format from the suffix)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())
