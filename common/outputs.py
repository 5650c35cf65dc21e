"""Output locations: which may be URLs, how a directory is made, and the temporaries a kill leaves.

Stores (``bae harvest``, ``bae store import``) may be written to any fsspec URL: a unit counts as
written once its ``units/done`` flag is set, after its chunks. Run directories (``bae train``,
``bae entropy``, ``bae features``, calibration) record completion by renaming a finished file or
directory into place, which object stores cannot do atomically, so they are local paths only
(``file://`` URLs included); write them to a local or mounted volume and copy them up after.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from bae.common.errors import BaeError
from bae.common.urls import is_local, local_path

# what ``tempfile`` names in ``atomic_files`` and what ``replace_dir`` moves aside: dot-prefixed
TEMPORARY_PATTERNS = (".*.tmp-*", ".*.tmp", ".*.old-*")


def local_output(value: str) -> str:
    """A run directory's or file's local path; URLs other than ``file://`` are refused (see above)."""
    if is_local(value):
        return local_path(value)
    raise ValueError(
        f"{value} is a URL, but this output must be local (its files are completed by atomic "
        "renames, which object stores lack); write to a local or mounted path and copy it up afterwards"
    )


LocalOutput = Annotated[str, AfterValidator(local_output)]


def check_replaceable(out: Path, written: Callable[[str], bool]) -> Path:
    """An output directory a command replaces whole: refused in one line if it holds an entry the
    command does not write (``written(name)`` false: it is not an earlier output of that command and
    would be lost), or cannot be made; its parent is made."""
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not written(p.name))
        if foreign:
            raise BaeError(
                f"output {out}: holds {foreign[0]!r}, not an export; it would be replaced: name a new "
                "directory or an earlier output of this command"
            )
    make_output_dir(out.parent)
    return check_output_dir(out)


def check_output_dir(path: str | Path) -> Path:
    """Refuse, in one line, a directory to be made at ``path`` that cannot be: a file is there or
    on the way, or the nearest existing directory is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BaeError(f"output {path}: exists and is not a directory; choose another --out")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BaeError(f"output {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        reason = "read-only file system" if is_read_only(ancestor) else "permission denied"
        raise BaeError(f"output {path}: cannot write in {ancestor} ({reason})")
    return path


def make_output_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) for writing, or one line saying why it cannot be."""
    path = check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a race with another process, or a file system that refuses
        raise BaeError(f"output {path}: cannot create it ({exc.strerror})") from None
    return path


def is_read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def sweep_temporaries(directories: Iterable[Path]) -> None:
    """Remove what a killed write left in ``directories`` (temporary files and directories, and
    directories moved aside for replacement)."""
    for directory in directories:
        if not directory.is_dir():
            continue
        for pattern in TEMPORARY_PATTERNS:
            for stray in directory.glob(pattern):
                if stray.is_dir():
                    shutil.rmtree(stray, ignore_errors=True)
                else:
                    stray.unlink(missing_ok=True)


# errors of the machine rather than of the program: reported in one line, not as a traceback
SYSTEM_ERRNOS = {
    errno.ENOSPC: "no space left on the device; free space and re-run the same command: it resumes "
    "from its last complete unit or checkpoint",
    errno.EDQUOT: "disk quota exceeded; free space and re-run the same command: it resumes from its "
    "last complete unit or checkpoint",
    errno.EROFS: "read-only file system; choose a writable --out",
    errno.EACCES: "permission denied",
    errno.EFBIG: "file larger than this process may write (ulimit -f); raise the limit and re-run the "
    "same command: it resumes from its last complete unit or checkpoint",
}


def describe_os_error(exc: OSError) -> str | None:
    """A one-line message for an OSError the user can act on (None for other errors)."""
    advice = SYSTEM_ERRNOS.get(exc.errno or 0)
    if advice is None:
        return None
    return f"{exc.filename}: {advice}" if exc.filename is not None else advice


LOCK_FILE = ".lock"
UNLOCKABLE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # no flock on this file system


@contextlib.contextmanager
def exclusive_output(path: Path, command: str) -> Iterator[Path]:
    """Hold ``path`` (an output directory, made if needed) for one process of ``command``: a second
    process on the same output is refused in one line; the lock dies with its process (kill -9
    included), and the temporaries an earlier killed run left are swept once it is held. A directory
    made here that a failing run left holding only the lock is removed again (no empty output)."""
    created = not path.exists()
    path = make_output_dir(path)
    with open(path / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise BaeError(
                f"output {path} is in use by another `{command}` (it holds {path / LOCK_FILE}); "
                "wait for it to finish or choose another --out"
            ) from None
        except OSError as exc:
            if exc.errno not in UNLOCKABLE:
                raise
            locked = False  # a file system without locks (some network mounts): run unguarded
        try:
            yield path
        except BaseException:
            if created and [p.name for p in path.iterdir()] == [LOCK_FILE]:
                (path / LOCK_FILE).unlink()
                path.rmdir()
            raise
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
