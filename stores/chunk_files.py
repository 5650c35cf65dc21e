"""Whole-chunk reads and writes straight to the chunk files of a local store, in Zarr's own encoding.

Zarr's codec pipeline copies every chunk a few times on its way to and from disk (into a chunk
buffer, again to append the checksum, again from ``read_bytes``); for the store's hot paths (a
harvest writing whole units, the sampler reading them) that overhead is most of the cost. For a
local store whose arrays use only the ``bytes`` codec (little-endian) and optionally ``crc32c``,
a chunk file is exactly the raw little-endian values followed by their CRC32C, so this module
writes it with one ``writev`` of (values, checksum), and reads it with one ``readinto`` a caller's
buffer. The files are byte-identical to Zarr's (a test
holds it to that), so any Zarr reader reads them. Arrays with other codecs, or stores on other
filesystems, go through Zarr.
"""

from __future__ import annotations

import os
import sys
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from bae.common.errors import BaeError

_PARALLEL_CHECKSUM_BYTES = 1 << 20  # from this chunk size on, checksum and write run side by side
_CHECKSUMS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bae-crc32c")


TEMPORARY_SUFFIX = ".partial"  # of a chunk file being written (renamed when complete)


class ChunkFiles:
    """Direct access to the chunk files of one Zarr v3 array; see :meth:`for_array`."""

    def __init__(self, array: zarr.Array, root: Path, checksum: bool):
        self.array = array
        self.root = root / array.path
        self.checksum = checksum
        self.chunk_shape: tuple[int, ...] = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype)
        self.nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self._templates: set[Path] = set()  # flag templates known to exist

    @classmethod
    def for_array(cls, array: zarr.Array) -> ChunkFiles | None:
        """Direct access if the array is local, unsharded, and encoded as raw bytes [+ crc32c]."""
        store = array.store
        if not isinstance(store, LocalStore) or sys.byteorder != "little" or array.metadata.zarr_format != 3:
            return None
        codecs = list(array.metadata.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec) or array.shards is not None:
            return None
        if codecs[0].endian is not None and codecs[0].endian.value != "little":
            return None
        rest = codecs[1:]
        if rest and not (len(rest) == 1 and isinstance(rest[0], Crc32cCodec)):
            return None
        return cls(array, Path(store.root), checksum=bool(rest))

    def path(self, chunk: tuple[int, ...]) -> Path:
        return self.root / self.array.metadata.encode_chunk_key(chunk)

    def _raw(self, values: np.ndarray) -> np.ndarray:
        """A chunk's raw little-endian bytes (an edge chunk padded with the fill value, as Zarr does)."""
        values = np.asarray(values, dtype=self.dtype)
        if values.shape != self.chunk_shape:
            full = np.full(self.chunk_shape, self.array.metadata.fill_value, dtype=self.dtype)
            full[tuple(slice(0, n) for n in values.shape)] = values
            values = full
        return np.ascontiguousarray(values).reshape(-1).view(np.uint8)

    def _encode(self, values: np.ndarray) -> list[np.ndarray | bytes]:
        """A chunk's file contents: the raw values, then their CRC32C if the array has one."""
        data = self._raw(values)
        return [data, _crc_bytes(data)] if self.checksum else [data]

    def write(
        self, chunk: tuple[int, ...], values: np.ndarray, atomic: bool = True, omit_fill: bool = False
    ) -> None:
        """Write one chunk's file; a large chunk's checksum is computed on another thread while its
        values are written.

        ``atomic``: write a temporary sibling and rename it into place, so a reader sees the old file
        or the new one. ``atomic=False`` rewrites the file in place (as fast as a plain ``tofile``):
        only for chunks that nobody reads before their completion is recorded elsewhere.
        ``omit_fill``: a chunk holding only the fill value is not stored (its file is removed), which
        Zarr reads back as the fill value.
        """
        if omit_fill and bool((np.asarray(values) == self.array.metadata.fill_value).all()):
            self.path(chunk).unlink(missing_ok=True)
            return
        if not self.checksum or self.nbytes < _PARALLEL_CHECKSUM_BYTES:
            self._write_file(self.path(chunk), self._encode(values), atomic)
            return
        data = self._raw(values)
        checksum = _CHECKSUMS.submit(_crc_bytes, data)
        self._write_file(self.path(chunk), [data], atomic, trailer=checksum)

    def write_flag(self, chunk: tuple[int, ...], values: np.ndarray) -> None:
        """Write a tiny chunk whose bytes many chunks share (a completion flag) as a hard link to one
        file holding those bytes: atomic, and no new data to allocate. Where the filesystem has no
        hard links, or the chunk's file exists, it is an atomic write instead."""
        parts = self._encode(values)
        content = b"".join(bytes(p) for p in parts)
        template = self.root / f".bae-flag-{content.hex()}"
        path = self.path(chunk)
        try:
            if template not in self._templates:
                self._write_file(template, parts, atomic=True)
                self._templates.add(template)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(template, path)
        except OSError:
            self._write_file(path, parts, atomic=True)

    @staticmethod
    def _write_file(
        path: Path, parts: list[np.ndarray | bytes], atomic: bool, trailer: Future[bytes] | None = None
    ) -> None:
        """Write ``parts`` (then the bytes ``trailer`` resolves to) to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        target = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}") if atomic else path
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if atomic else os.O_TRUNC)
        fd = os.open(target, flags, 0o666)  # permissions: as the umask says
        try:
            try:
                _write_all(fd, parts)
                if trailer is not None:
                    _write_all(fd, [trailer.result()])
            finally:
                os.close(fd)
            if atomic:
                os.replace(target, path)
        except BaseException:
            if atomic:
                target.unlink(missing_ok=True)
            raise

    def read(self, chunk: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """One whole chunk, read into ``out`` (C-contiguous, the chunk's shape and dtype) if given.

        A missing file, a file of the wrong size or a checksum mismatch is an error naming the file.
        """
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype)
        elif out.shape != self.chunk_shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous {self.dtype} array of shape {self.chunk_shape}")
        path = self.path(chunk)
        flat = out.reshape(-1).view(np.uint8)
        # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
        view = memoryview(flat)  # pyright: ignore[reportArgumentType]
        try:
            with open(path, "rb", buffering=0) as f:
                got = 0
                while got < self.nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
                tail = f.read(5)
        except FileNotFoundError:
            raise BaeError(f"chunk file {path} is missing") from None
        want_tail = 4 if self.checksum else 0
        if got != self.nbytes or len(tail) != want_tail:
            raise BaeError(
                f"chunk file {path} has {got + len(tail)} bytes, expected {self.nbytes + want_tail}"
            )
        if self.checksum and google_crc32c.value(flat) != int.from_bytes(tail, "little"):
            raise BaeError(f"chunk file {path}: checksum mismatch (the data is corrupted)")
        return out


def _crc_bytes(data: np.ndarray) -> bytes:
    return np.uint32(google_crc32c.value(data)).tobytes()


def _write_all(fd: int, parts: list[np.ndarray | bytes]) -> None:
    """``writev`` all of ``parts``, continuing after a short write."""
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
    views = [memoryview(p).cast("B") for p in parts]  # pyright: ignore[reportArgumentType]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if views:
            views[0] = views[0][n:]
