"""Corpus readers: text, JSONL/JSON, Parquet, saved `datasets`, ``staicc:`` datasets and the builtin
Python-docs corpus.

Every reader yields documents in a deterministic order; :func:`load_corpus` drops empty documents
(counting them), fingerprints the ordered result and collects per-document metadata columns.
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
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bae.common.errors import BaeError
from bae.pipeline.harvest.staicc import is_staicc_spec, staicc_documents

BUILTIN = "builtin"
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
_REPLACE_HANDLER = "bae-count-replace"


@dataclass
class Document:
    """One document: its text and its metadata (``source`` plus any extra record fields)."""

    text: str
    meta: dict[str, Any]


@dataclass
class Corpus:
    """The ordered, non-empty documents of one or more sources."""

    docs: list[Document]
    n_empty: int = 0
    n_replaced: int = 0
    sources: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """sha256 of the ordered documents, text and metadata."""
        h = hashlib.sha256()
        for doc in self.docs:
            h.update(json.dumps([doc.text, doc.meta], sort_keys=True, default=str).encode())
            h.update(b"\0")
        return h.hexdigest()

    def metadata_columns(self) -> dict[str, np.ndarray]:
        """One array per metadata field: int64/float64/bool when every value is one, else str."""
        names = sorted({k for doc in self.docs for k in doc.meta})
        columns = {}
        for name in names:
            values = [doc.meta.get(name) for doc in self.docs]
            columns[name] = _column(values)
        return columns


def _column(values: list[Any]) -> np.ndarray:
    if all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.float64)
    as_text = ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
    return np.array(as_text, dtype=str)


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

    def decode(self, data: bytes, path: Path, base_offset: int = 0) -> str:
        if self.errors == "replace":
            return data.decode("utf-8", errors=_REPLACE_HANDLER)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BaeError(
                f"corpus file {path}: undecodable UTF-8 bytes at byte offset {base_offset + exc.start}; "
                "fix the file or pass --encoding-errors replace"
            ) from None


def _decompress_zstd(data: bytes) -> bytes:
    import numcodecs

    return bytes(numcodecs.Zstd().decode(data))


# compressed corpus files are read transparently, recognized by their first bytes
DECOMPRESSORS: dict[bytes, tuple[str, Callable[[bytes], bytes]]] = {
    b"\x1f\x8b": ("gzip", gzip.decompress),
    b"BZh": ("bzip2", bz2.decompress),
    b"\xfd7zXZ\x00": ("xz", lzma.decompress),
    b"\x28\xb5\x2f\xfd": ("zstd", _decompress_zstd),
}
COMPRESSED_SUFFIXES = {".gz", ".bz2", ".xz", ".zst"}


def read_corpus_bytes(path: Path) -> bytes:
    """A corpus file's bytes, decompressed when it is gzip, bzip2, xz or zstd (by magic bytes)."""
    data = path.read_bytes()
    for magic, (kind, decompress) in DECOMPRESSORS.items():
        if data.startswith(magic):
            try:
                return decompress(data)
            except Exception as exc:  # each codec raises its own error type for damaged data
                raise BaeError(f"corpus file {path}: damaged {kind} data ({exc})") from None
    return data


def format_suffix(path: Path) -> str:
    """The suffix that names a corpus file's format, under any compression suffix (a.jsonl.gz -> .jsonl)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _text_docs(path: Path, name: str, decoder: _Decoder, line_docs: bool) -> Iterator[Document]:
    data = read_corpus_bytes(path)
    if not line_docs:
        yield Document(decoder.decode(data, path), {"source": name})
        return
    offset = 0
    for i, line in enumerate(data.splitlines(keepends=True)):
        yield Document(decoder.decode(line, path, offset).rstrip("\r\n"), {"source": name, "line": i})
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


def _json_docs(path: Path, name: str, decoder: _Decoder, text_field: str) -> Iterator[Document]:
    text = decoder.decode(read_corpus_bytes(path), path)
    if format_suffix(path) == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BaeError(f"corpus file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(records, list):
            raise BaeError(
                f"corpus file {path}: expected a JSON list of objects, got {type(records).__name__}"
            )
        for i, record in enumerate(records):
            yield _record_doc(record, f"corpus file {path} item {i}", text_field, name)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BaeError(f"corpus file {path} line {lineno}: invalid JSON: {exc.msg}") from None
        yield _record_doc(record, f"corpus file {path} line {lineno}", text_field, name)


def _parquet_docs(path: Path, name: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise BaeError(f"corpus file {path}: cannot read as Parquet ({exc})") from None
    if text_field not in table.column_names:
        fields = ", ".join(table.column_names)
        raise BaeError(
            f"corpus file {path}: no text column {text_field!r} (columns: {fields}); pass --text-field NAME"
        )
    for i, record in enumerate(table.to_pylist()):
        yield _record_doc(record, f"corpus file {path} row {i}", text_field, name)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _dataset_docs(path: Path, name: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets  # pyright: ignore[reportMissingImports]  # optional: only for saved datasets
    except ImportError:
        raise BaeError(
            f"corpus {path} is a saved `datasets` dataset; install the `datasets` package to read it"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        ds = ds["train"] if "train" in ds else ds[splits[0]]
    if text_field not in ds.column_names:
        fields = ", ".join(ds.column_names)
        raise BaeError(
            f"corpus {path}: no text column {text_field!r} (columns: {fields}); pass --text-field NAME"
        )
    for i, record in enumerate(ds):
        yield _record_doc(dict(record), f"corpus {path} row {i}", text_field, name)


def _file_docs(
    path: Path, name: str, decoder: _Decoder, text_field: str, line_docs: bool
) -> Iterator[Document]:
    suffix = format_suffix(path)
    if suffix in JSON_SUFFIXES:
        return _json_docs(path, name, decoder, text_field)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_docs(path, name, text_field)
    return _text_docs(path, name, decoder, line_docs)


def _expand(source: str) -> list[tuple[Path, str]]:
    """A file, directory (recursive, sorted) or glob -> (path, name shown in metadata) pairs."""
    path = Path(source)
    if path.is_file() or _is_saved_dataset(path):
        return [(path, path.name)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [(p, str(p.relative_to(path))) for p in files]
    matches = sorted(glob.glob(source, recursive=True))
    files = [Path(m) for m in matches if Path(m).is_file() or _is_saved_dataset(Path(m))]
    if not files:
        raise BaeError(f"corpus {source!r}: no such file, directory or glob match")
    return [(p, str(p)) for p in files]


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


def iter_documents(
    sources: Sequence[str], text_field: str = "text", line_docs: bool = False, decoder: _Decoder | None = None
) -> Iterator[Document]:
    """Documents of every source in order (empty ones included); ``builtin`` names the docs corpus,
    ``staicc:NAME[:SPLIT]`` a dataset of the ``staicc`` package (label metadata per document)."""
    decoder = decoder or _Decoder("strict")
    for source in sources or [BUILTIN]:
        if source == BUILTIN:
            yield from builtin_docs()
            continue
        if is_staicc_spec(source):
            yield from (Document(text, meta) for text, meta in staicc_documents(source))
            continue
        for path, name in _expand(source):
            if _is_saved_dataset(path):
                yield from _dataset_docs(path, name, text_field)
            else:
                yield from _file_docs(path, name, decoder, text_field, line_docs)


def load_corpus(
    sources: Sequence[str],
    text_field: str = "text",
    line_docs: bool = False,
    encoding_errors: str = "strict",
) -> Corpus:
    """Read every source; skip and count empty documents; refuse a corpus with none left."""
    decoder = _Decoder(encoding_errors)
    docs, n_empty = [], 0
    for doc in iter_documents(sources, text_field, line_docs, decoder):
        if doc.text.strip():
            docs.append(doc)
        else:
            n_empty += 1
    shown = ", ".join(sources) if sources else BUILTIN
    if not docs:
        raise BaeError(f"corpus {shown}: no non-empty documents ({n_empty} empty ones skipped)")
    return Corpus(docs=docs, n_empty=n_empty, n_replaced=decoder.replaced, sources=list(sources or [BUILTIN]))
