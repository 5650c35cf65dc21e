"""Tokenisation into model input windows, and the choice of which rows of each window to store.

``packed`` mode joins documents with the tokenizer's separator (its EOS token) into windows of
``context_length`` tokens; ``document`` mode feeds each document alone, truncated. The BOS policy is
explicit: ``auto`` follows the tokenizer's own ``add_special_tokens`` behaviour, ``always`` starts
every window with BOS, ``never`` never does. BOS, separators and other special tokens are stored as
invalid rows. ``positions`` are positions in the window (= in the document, in document mode).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bae.common.errors import BaeError
from bae.common.selection import PositionChoice as Positions

Mode = Literal["packed", "document"]
BosPolicy = Literal["auto", "always", "never"]
_TOKENIZE_BATCH = 256


@dataclass
class Window:
    """One model input sequence (no padding) and the rows of it that go into the store."""

    input_ids: np.ndarray  # int32 [length]
    doc_ids: np.ndarray  # int64 [length]
    positions: np.ndarray  # int32 [length]
    valid: np.ndarray  # bool [length]
    keep: np.ndarray  # int64 indices of the stored rows, ascending

    @property
    def n_rows(self) -> int:
        return len(self.keep)


@dataclass
class Tokenized:
    """Windows in order, plus counts for the summary."""

    windows: list[Window]
    n_tokens: int  # tokens fed to the model
    n_docs_used: int
    n_truncated: int  # documents cut by the context length (document mode) or the token budget


def uses_bos(tokenizer: Any, policy: BosPolicy) -> bool:
    """Whether every window starts with the BOS token under ``policy``."""
    bos = tokenizer.bos_token_id
    if policy == "never":
        return False
    if policy == "always":
        if bos is None:
            raise BaeError("bos 'always': this tokenizer has no BOS token; use --bos never")
        return True
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def separator_id(tokenizer: Any) -> int:
    """The token placed between documents in packed mode: EOS, else BOS."""
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    raise BaeError("packed mode needs an EOS or BOS token to separate documents; use --mode document")


def _token_lists(tokenizer: Any, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids per text; texts are taken from ``texts`` a batch at a time, as they are needed."""
    remaining = iter(texts)
    while batch := list(itertools.islice(remaining, _TOKENIZE_BATCH)):
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def _keep(positions: np.ndarray, last: np.ndarray, select: Positions) -> np.ndarray:
    if select == "all":
        return np.arange(len(positions))
    if select == "last":
        return np.flatnonzero(last)
    return np.flatnonzero(np.isin(positions, np.asarray(select, dtype=np.int64)))


def _window(
    ids: np.ndarray,
    docs: np.ndarray,
    last: np.ndarray,
    bos: int | None,
    special: np.ndarray,
    select: Positions,
) -> Window:
    if bos is not None:
        ids = np.concatenate([[bos], ids])
        docs = np.concatenate([docs[:1], docs])
        last = np.concatenate([[False], last])
    positions = np.arange(len(ids), dtype=np.int32)
    valid = ~np.isin(ids, special)
    if bos is not None:
        valid[0] = False
    return Window(
        input_ids=ids.astype(np.int32),
        doc_ids=docs.astype(np.int64),
        positions=positions,
        valid=valid,
        keep=_keep(positions, last & valid, select),
    )


def tokenize_corpus(
    tokenizer: Any,
    texts: Iterable[str],
    context_length: int,
    mode: Mode = "packed",
    bos: BosPolicy = "auto",
    positions: Positions = "all",
    max_tokens: int | None = None,
) -> Tokenized:
    """Turn documents into windows; stop once ``max_tokens`` model input tokens are planned, having
    taken from ``texts`` (which may be read lazily) only the batches that took."""
    use_bos = uses_bos(tokenizer, bos)
    bos_id = int(tokenizer.bos_token_id) if use_bos else None
    room = context_length - int(use_bos)
    if room < 1:
        raise BaeError(f"context_length {context_length} leaves no room for text after BOS")
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    budget = max_tokens if max_tokens is not None else np.iinfo(np.int64).max
    if mode == "document":
        return _documents(tokenizer, texts, room, bos_id, special, positions, budget)
    return _packed(tokenizer, texts, room, bos_id, special, positions, budget, separator_id(tokenizer))


def _documents(
    tokenizer: Any,
    texts: Iterable[str],
    room: int,
    bos_id: int | None,
    special: np.ndarray,
    select: Positions,
    budget: int,
) -> Tokenized:
    windows, n_tokens, n_truncated, n_docs = [], 0, 0, 0
    for doc, ids in enumerate(_token_lists(tokenizer, texts)):
        if not ids:
            continue
        ids_arr = np.asarray(ids[:room], dtype=np.int64)
        length = len(ids_arr) + int(bos_id is not None)
        if n_tokens + length > budget:
            break
        n_truncated += len(ids) > room
        last = np.zeros(len(ids_arr), dtype=bool)
        last[-1] = True
        win = _window(ids_arr, np.full(len(ids_arr), doc), last, bos_id, special, select)
        n_tokens += length
        n_docs += 1
        if win.n_rows:
            windows.append(win)
    return Tokenized(windows, n_tokens, n_docs, n_truncated)


def _packed(
    tokenizer: Any,
    texts: Iterable[str],
    room: int,
    bos_id: int | None,
    special: np.ndarray,
    select: Positions,
    budget: int,
    sep: int,
) -> Tokenized:
    per_window = room + int(bos_id is not None)
    max_stream = (budget // per_window) * room + max(0, budget % per_window - int(bos_id is not None))
    ids_parts, doc_parts, last_parts = [], [], []
    stream_len, n_docs = 0, 0
    for doc, ids in enumerate(_token_lists(tokenizer, texts)):
        if stream_len >= max_stream:
            break
        if not ids:
            continue
        piece = ([sep] if stream_len else []) + ids
        last = np.zeros(len(piece), dtype=bool)
        last[-1] = True
        ids_parts.append(np.asarray(piece, dtype=np.int64))
        doc_parts.append(np.full(len(piece), doc, dtype=np.int64))
        last_parts.append(last)
        stream_len += len(piece)
        n_docs += 1
    stream = np.concatenate(ids_parts)[:max_stream]
    docs = np.concatenate(doc_parts)[:max_stream]
    last = np.concatenate(last_parts)[:max_stream]
    n_truncated = int(stream_len > len(stream))
    windows = []
    n_tokens = 0
    for start in range(0, len(stream), room):
        stop = start + room
        win = _window(stream[start:stop], docs[start:stop], last[start:stop], bos_id, special, select)
        n_tokens += len(win.input_ids)
        if win.n_rows:
            windows.append(win)
    return Tokenized(windows, n_tokens, n_docs, n_truncated)
