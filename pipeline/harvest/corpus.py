"""Corpus readers: text, JSONL/JSON, Parquet, saved and streamed `datasets`, ``staicc:`` datasets and
the builtin Python-docs corpus, from local paths or fsspec URLs (s3://, gs://, https://, memory://).

Documents are read lazily, in a deterministic order: :class:`CorpusStream` yields the non-empty ones
(counting the empty ones) and fingerprints and collects the metadata of exactly the documents read,
so a harvest that stops at its token budget reads only as far as it needs, never the whole corpus.
Compressed files (gzip, bzip2, xz, zstd; recognized by their first bytes) are decompressed as they
are read. A plain text file read as one document and a ``.json`` list are read whole, one at a time.
"""

from __future__ import annotations

import ast
import bz2
import codecs
import glob
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import posixpath
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np

from bae.common.errors import BaeError, first_line
from bae.common.urls import is_local, local_path, url_filesystem
from bae.pipeline.harvest.staicc import is_staicc_spec, staicc_documents

BUILTIN = "builtin"
DATASETS_PREFIX = "datasets:"  # datasets:BUILDER:FILES, read by `datasets` in streaming mode
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
_REPLACE_HANDLER = "bae-count-replace"
_READ_BYTES = 1 << 18  # decompressed bytes read at a time
_PARQUET_ROWS = 1024  # Parquet rows decoded at a time


@dataclass
class Document:
    """One document: its text and its metadata (``source`` plus any extra record fields)."""

    text: str
    meta: dict[str, Any]


def _hash_document(h: Any, doc: Document) -> None:
    h.update(json.dumps([doc.text, doc.meta], sort_keys=True, default=str).encode())
    h.update(b"\0")


def metadata_columns(metas: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One array per metadata field: int64/float64/bool when every value is one, else str."""
    names = sorted({k for meta in metas for k in meta})
    return {name: _column([meta.get(name) for meta in metas]) for name in names}


def _column(values: list[Any]) -> np.ndarray:
    if all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.float64)
    as_text = ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
    return np.array(as_text, dtype=str)


@dataclass
class Corpus:
    """A whole corpus in memory: the ordered, non-empty documents of one or more sources."""

    docs: list[Document]
    n_empty: int = 0
    n_replaced: int = 0
    sources: list[str] = field(default_factory=list)
    fingerprint: str = ""  # sha256 of the ordered documents, text and metadata

    def metadata_columns(self) -> dict[str, np.ndarray]:
        return metadata_columns([doc.meta for doc in self.docs])


class _Decoder:
    """Decodes file bytes, failing with file and offset, or replacing and counting bad bytes."""

    def __init__(self, errors: str):
        if errors not in ("strict", "replace"):
            raise BaeError(f"encoding_errors {errors!r}: expected 'strict' or 'replace'")
        self.errors = errors
        self.replaced = 0
        codecs.register_error(_REPLACE_HANDLER, self._replace)

    def _replace(self, exc: UnicodeError) -> tuple[str, int]:
        assert isinstance(exc, UnicodeDecodeError)
        self.replaced += exc.end - exc.start
        return "\ufffd", exc.end

    def decode(self, data: bytes, shown: str, base_offset: int = 0) -> str:
        if self.errors == "replace":
            return data.decode("utf-8", errors=_REPLACE_HANDLER)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BaeError(
                f"corpus file {shown}: undecodable UTF-8 bytes at byte offset {base_offset + exc.start}; "
                "fix the file or pass --encoding-errors replace"
            ) from None


def _zstd_reader(raw: IO[bytes]) -> Any:
    import pyarrow as pa

    return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")


# compressed corpus files are decompressed as they are read, recognized by their first bytes
DECOMPRESSORS: dict[bytes, tuple[str, Callable[[IO[bytes]], Any]]] = {
    b"\x1f\x8b": ("gzip", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    b"BZh": ("bzip2", bz2.BZ2File),
    b"\xfd7zXZ\x00": ("xz", lzma.LZMAFile),
    b"\x28\xb5\x2f\xfd": ("zstd", _zstd_reader),
}
COMPRESSED_SUFFIXES = {".gz", ".bz2", ".xz", ".zst"}


@dataclass(frozen=True)
class CorpusFile:
    """One corpus file on a local or fsspec file system."""

    fs: Any  # an fsspec file system
    path: str  # on ``fs``
    shown: str  # in messages: the path or URL as the user spelled it
    name: str  # the documents' ``source`` metadata

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, decompressed, in blocks; damaged compressed data is one line."""
        with self.fs.open(self.path, "rb") as raw:
            head = raw.read(8)
            raw.seek(0)
            kind, stream = None, raw
            for magic, (codec, wrap) in DECOMPRESSORS.items():
                if head.startswith(magic):
                    kind, stream = codec, wrap(raw)
            while True:
                try:
                    block = stream.read(_READ_BYTES)
                except (OSError, EOFError, ValueError) as exc:  # each codec's error for damaged data
                    what = f"damaged {kind} data" if kind else "cannot read it"
                    raise BaeError(f"corpus file {self.shown}: {what} ({first_line(exc)})") from None
                if not block:
                    return
                yield block

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def lines(self) -> Iterator[bytes]:
        """The decompressed file split after each newline (the last line may lack one)."""
        rest = b""
        for block in self.chunks():
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            for part in parts:
                yield part + b"\n"
        if rest:
            yield rest

    @property
    def format_suffix(self) -> str:
        """The suffix that names the format, under any compression suffix (a.jsonl.gz -> .jsonl)."""
        suffixes = [s.lower() for s in Path(posixpath.basename(self.path)).suffixes]
        if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
            suffixes.pop()
        return suffixes[-1] if suffixes else ""


def _text_docs(file: CorpusFile, decoder: _Decoder, line_docs: bool) -> Iterator[Document]:
    if not line_docs:
        yield Document(decoder.decode(file.read(), file.shown), {"source": file.name})
        return
    offset = 0
    for i, line in enumerate(file.lines()):
        text = decoder.decode(line, file.shown, offset).rstrip("\r\n")
        yield Document(text, {"source": file.name, "line": i})
        offset += len(line)


def _record_doc(record: Any, where: str, text_field: str, name: str) -> Document:
    if not isinstance(record, dict):
        raise BaeError(
            f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise BaeError(f"{where}: no text field {text_field!r} (fields: {fields}); pass --text-field NAME")
    text = record[text_field]
    if not isinstance(text, str):
        raise BaeError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    meta = {k: v for k, v in record.items() if k != text_field}
    meta.setdefault("source", name)
    return Document(text, meta)


def _json_docs(file: CorpusFile, decoder: _Decoder, text_field: str) -> Iterator[Document]:
    if file.format_suffix == ".json":
        try:
            records = json.loads(decoder.decode(file.read(), file.shown))
        except json.JSONDecodeError as exc:
            raise BaeError(
                f"corpus file {file.shown}: invalid JSON at line {exc.lineno}: {exc.msg}"
            ) from None
        if not isinstance(records, list):
            raise BaeError(
                f"corpus file {file.shown}: expected a JSON list of objects, got {type(records).__name__}"
            )
        for i, record in enumerate(records):
            yield _record_doc(record, f"corpus file {file.shown} item {i}", text_field, file.name)
        return
    offset = 0
    for lineno, raw in enumerate(file.lines(), start=1):
        line = decoder.decode(raw, file.shown, offset)
        offset += len(raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BaeError(f"corpus file {file.shown} line {lineno}: invalid JSON: {exc.msg}") from None
        yield _record_doc(record, f"corpus file {file.shown} line {lineno}", text_field, file.name)


def _parquet_docs(file: CorpusFile, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    with file.fs.open(file.path, "rb") as raw:
        try:
            parquet = pq.ParquetFile(raw)
        except Exception as exc:
            raise BaeError(f"corpus file {file.shown}: cannot read as Parquet ({first_line(exc)})") from None
        if text_field not in parquet.schema_arrow.names:
            fields = ", ".join(parquet.schema_arrow.names)
            raise BaeError(
                f"corpus file {file.shown}: no text column {text_field!r} (columns: {fields}); "
                "pass --text-field NAME"
            )
        row = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS):
            for record in batch.to_pylist():
                yield _record_doc(record, f"corpus file {file.shown} row {row}", text_field, file.name)
                row += 1


def _import_datasets(corpus: str) -> Any:
    try:
        import datasets  # pyright: ignore[reportMissingImports]  # optional: only for `datasets` corpora
    except ImportError:
        raise BaeError(
            f"corpus {corpus}: reading it needs the `datasets` package (pip install datasets)"
        ) from None
    return datasets


def _dataset_rows(rows: Iterable[Any], shown: str, name: str, text_field: str) -> Iterator[Document]:
    for i, record in enumerate(rows):
        yield _record_doc(dict(record), f"corpus {shown} row {i}", text_field, name)


def _saved_dataset_docs(
    file: CorpusFile, text_field: str, storage_options: dict[str, Any] | None
) -> Iterator[Document]:
    """Rows of a directory written by ``Dataset.save_to_disk`` (its ``train`` split, else the first),
    memory-mapped by `datasets`."""
    datasets = _import_datasets(file.shown)
    location = file.path if is_local(file.shown) else file.fs.unstrip_protocol(file.path)
    ds = datasets.load_from_disk(location, storage_options=storage_options)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if text_field not in ds.column_names:
        raise BaeError(
            f"corpus {file.shown}: no text column {text_field!r} (columns: {', '.join(ds.column_names)}); "
            "pass --text-field NAME"
        )
    yield from _dataset_rows(ds, file.shown, file.name, text_field)


def _streamed_dataset_docs(
    spec: str, text_field: str, storage_options: dict[str, Any] | None
) -> Iterator[Document]:
    """Rows of ``datasets:BUILDER:FILES`` (e.g. ``datasets:csv:data/*.csv``), loaded by `datasets` in
    streaming mode: its files are read as rows are asked for."""
    builder, _, files = spec.removeprefix(DATASETS_PREFIX).partition(":")
    if not builder or not files:
        raise BaeError(f"corpus {spec!r}: expected datasets:BUILDER:FILES, e.g. datasets:json:data/*.jsonl")
    datasets = _import_datasets(spec)
    try:
        ds = datasets.load_dataset(
            builder, data_files=files, split="train", streaming=True, storage_options=storage_options
        )
    except Exception as exc:  # `datasets` raises many types for a missing file or an unknown builder
        raise BaeError(f"corpus {spec}: `datasets` cannot stream it ({first_line(exc)})") from None
    yield from _dataset_rows(ds, spec, spec, text_field)


def _file_docs(file: CorpusFile, decoder: _Decoder, text_field: str, line_docs: bool) -> Iterator[Document]:
    suffix = file.format_suffix
    if suffix in JSON_SUFFIXES:
        return _json_docs(file, decoder, text_field)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_docs(file, text_field)
    return _text_docs(file, decoder, line_docs)


def _is_saved_dataset(fs: Any, path: str) -> bool:
    return fs.isdir(path) and any(
        fs.exists(posixpath.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json")
    )


def _expand_local(source: str) -> list[CorpusFile]:
    """A local file, directory (recursive, sorted), saved dataset or glob -> its corpus files."""
    import fsspec

    fs = fsspec.filesystem("file")
    path = Path(local_path(source))
    if path.is_file() or _is_saved_dataset(fs, str(path)):
        return [CorpusFile(fs, str(path), str(path), path.name)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [CorpusFile(fs, str(p), str(p), str(p.relative_to(path))) for p in files]
    matches = [
        m for m in sorted(glob.glob(source, recursive=True)) if os.path.isfile(m) or _is_saved_dataset(fs, m)
    ]
    return [CorpusFile(fs, m, m, m) for m in matches]


def _expand_url(source: str, storage_options: dict[str, Any] | None) -> list[CorpusFile]:
    """An fsspec URL of a file, directory (recursive, sorted), saved dataset or glob -> its files."""
    fs, path = url_filesystem(source, storage_options)
    try:
        if fs.isfile(path) or _is_saved_dataset(fs, path):
            return [CorpusFile(fs, path, source, posixpath.basename(path))]
        if fs.isdir(path):
            files = [p for p in sorted(fs.find(path)) if not posixpath.basename(p).startswith(".")]
            return [CorpusFile(fs, p, fs.unstrip_protocol(p), posixpath.relpath(p, path)) for p in files]
        matches = [p for p in sorted(fs.glob(path)) if fs.isfile(p) or _is_saved_dataset(fs, p)]
    except BaeError:
        raise
    except Exception as exc:  # each fsspec backend raises its own network and auth errors
        raise BaeError(
            f"corpus {source}: cannot reach it ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    return [CorpusFile(fs, p, fs.unstrip_protocol(p), fs.unstrip_protocol(p)) for p in matches]


def _stdlib_docstrings(tree: ast.Module) -> list[str]:
    parts = [ast.get_docstring(tree) or ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            parts.append(ast.get_docstring(node) or "")
            if isinstance(node, ast.ClassDef):
                methods = (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
                parts.extend(ast.get_docstring(m) or "" for m in methods)
    return [p for p in parts if p.strip()]


def builtin_docs() -> Iterator[Document]:
    """Python's own documentation: every ``pydoc_data.topics`` entry, then stdlib docstrings.

    Modules are parsed, never imported; order is sorted by name, so the corpus is deterministic for
    a given Python version.
    """
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(topics[key], {"source": "pydoc_data.topics", "name": key})
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_"):
            continue
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        origin = spec.origin if spec else None
        if not origin or not origin.endswith(".py") or not os.path.exists(origin):
            continue
        try:
            tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        parts = _stdlib_docstrings(tree)
        if parts:
            yield Document("\n\n".join(parts), {"source": "stdlib docstrings", "name": module})


DocumentReader = Callable[[], Iterator[Document]]


class CorpusStream:
    """The non-empty documents of ``sources``, read lazily and in order, for one pass.

    Sources are ``builtin`` (the docs corpus), ``staicc:NAME[:SPLIT]`` (a dataset of the ``staicc``
    package, label metadata per document), ``datasets:BUILDER:FILES`` (`datasets` streaming mode),
    and local paths or fsspec URLs of files, directories, globs or saved `datasets`. Files are listed
    when the stream is made, so a missing one is reported before any work; they are read as documents
    are asked for. ``fingerprint``, ``n_read``, ``n_empty``, ``n_replaced`` and ``metadata_columns()``
    describe the documents read so far; ``exhausted`` says whether that was all of them.
    """

    def __init__(
        self,
        sources: Sequence[str],
        text_field: str = "text",
        line_docs: bool = False,
        encoding_errors: str = "strict",
        storage_options: dict[str, Any] | None = None,
    ):
        self.sources = list(sources or [BUILTIN])
        self._decoder = _Decoder(encoding_errors)
        self._readers = [
            reader
            for source in self.sources
            for reader in self._source_readers(source, text_field, line_docs, storage_options)
        ]
        self._hash = hashlib.sha256()
        self._metas: list[dict[str, Any]] = []
        self.n_empty = 0
        self.exhausted = False
        self._documents: Iterator[Document] | None = None

    def _source_readers(
        self, source: str, text_field: str, line_docs: bool, storage_options: dict[str, Any] | None
    ) -> list[DocumentReader]:
        if source == BUILTIN:
            return [builtin_docs]
        if is_staicc_spec(source):
            return [lambda: (Document(text, meta) for text, meta in staicc_documents(source))]
        if source.startswith(DATASETS_PREFIX):
            return [partial(_streamed_dataset_docs, source, text_field, storage_options)]
        files = _expand_local(source) if is_local(source) else _expand_url(source, storage_options)
        if not files:
            raise BaeError(f"corpus {source!r}: no such file, directory or glob match")
        return [
            partial(_saved_dataset_docs, f, text_field, storage_options)
            if _is_saved_dataset(f.fs, f.path)
            else partial(_file_docs, f, self._decoder, text_field, line_docs)
            for f in files
        ]

    def __iter__(self) -> Iterator[Document]:
        if self._metas or self.n_empty:
            raise RuntimeError("a CorpusStream is read once")
        for read in self._readers:
            for doc in read():
                if not doc.text.strip():
                    self.n_empty += 1
                    continue
                _hash_document(self._hash, doc)
                self._metas.append(doc.meta)
                yield doc
        self.exhausted = True
        if not self._metas:
            shown = ", ".join(self.sources)
            raise BaeError(f"corpus {shown}: no non-empty documents ({self.n_empty} empty ones skipped)")

    def texts(self) -> Iterator[str]:
        """The documents' texts, read as they are asked for."""
        self._documents = iter(self)
        return (doc.text for doc in self._documents)

    def read_to_end(self) -> str:
        """Read the documents that :meth:`texts` did not reach, for the fingerprint of the whole
        corpus (what bae recorded before it read corpora lazily); returns that fingerprint."""
        for _ in self._documents or self:
            pass
        return self.fingerprint

    @property
    def n_read(self) -> int:
        return len(self._metas)

    @property
    def n_replaced(self) -> int:
        return self._decoder.replaced

    @property
    def fingerprint(self) -> str:
        """sha256 of the documents read, in order, text and metadata."""
        return self._hash.hexdigest()

    def metadata_columns(self) -> dict[str, np.ndarray]:
        """Metadata of the documents read, one array per field (see :func:`metadata_columns`)."""
        return metadata_columns(self._metas)


def load_corpus(
    sources: Sequence[str],
    text_field: str = "text",
    line_docs: bool = False,
    encoding_errors: str = "strict",
    storage_options: dict[str, Any] | None = None,
) -> Corpus:
    """Read every document of ``sources`` into memory (a :class:`CorpusStream` read to its end)."""
    stream = CorpusStream(sources, text_field, line_docs, encoding_errors, storage_options)
    docs = list(stream)
    return Corpus(docs, stream.n_empty, stream.n_replaced, stream.sources, stream.fingerprint)
