"""Corpus readers: formats, metadata, deterministic order, empty docs, bad bytes, the builtin corpus."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bae.common.errors import BaeError
from bae.pipeline.harvest.corpus import load_corpus


def test_text_files_directory_and_glob_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third")
    (tmp_path / "empty.txt").write_text("   \n")
    corpus = load_corpus([str(tmp_path)])
    assert [d.text for d in corpus.docs] == ["first", "second", "third"]
    assert [d.meta["source"] for d in corpus.docs] == ["a.txt", "b.txt", "sub/c.md"]
    assert corpus.n_empty == 1
    globbed = load_corpus([str(tmp_path / "*.txt")])
    assert [d.text for d in globbed.docs] == ["first", "second"]


def test_line_docs(tmp_path):
    (tmp_path / "lines.txt").write_text("one\n\ntwo\nthree\n")
    corpus = load_corpus([str(tmp_path / "lines.txt")], line_docs=True)
    assert [d.text for d in corpus.docs] == ["one", "two", "three"]
    assert [d.meta["line"] for d in corpus.docs] == [0, 2, 3]
    assert corpus.n_empty == 1


def test_jsonl_json_and_parquet_keep_metadata(tmp_path):
    records = [{"prompt": "a b", "k": 1, "label": "x"}, {"prompt": "c", "k": 2, "label": "y"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "d.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        corpus = load_corpus([str(tmp_path / name)], text_field="prompt")
        assert [d.text for d in corpus.docs] == ["a b", "c"]
        cols = corpus.metadata_columns()
        assert cols["k"].dtype == np.int64 and list(cols["k"]) == [1, 2]
        assert list(cols["label"]) == ["x", "y"] and list(cols["source"]) == [name, name]


def test_unknown_text_field_names_the_fields(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(BaeError, match=r"line 1: no text field 'text' \(fields: body, id\)"):
        load_corpus([str(tmp_path / "d.jsonl")])
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "d.parquet")
    with pytest.raises(BaeError, match="no text column 'text'"):
        load_corpus([str(tmp_path / "d.parquet")])


def test_invalid_jsonl_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(BaeError, match="line 2: invalid JSON"):
        load_corpus([str(tmp_path / "d.jsonl")])


def test_undecodable_bytes_error_names_file_and_offset_or_are_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe here\n")
    with pytest.raises(BaeError, match=r"bad\.txt: undecodable UTF-8 bytes at byte offset 14"):
        load_corpus([str(path)])
    with pytest.raises(BaeError, match="byte offset 14"):
        load_corpus([str(path)], line_docs=True)
    corpus = load_corpus([str(path)], encoding_errors="replace")
    assert corpus.n_replaced == 2 and "\ufffd" in corpus.docs[0].text


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(BaeError, match="no such file, directory or glob"):
        load_corpus([str(tmp_path / "nope")])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(BaeError, match=r"no non-empty documents \(1 empty ones skipped\)"):
        load_corpus([str(tmp_path / "e.txt")])


def test_fingerprint_tracks_text_metadata_and_order(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "k": 1}\n{"text": "y", "k": 2}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "x", "k": 1}\n{"text": "y", "k": 3}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "y", "k": 2}\n{"text": "x", "k": 1}\n')
    fps = {load_corpus([str(tmp_path / f"{n}.jsonl")]).fingerprint for n in "abc"}
    assert len(fps) == 3
    assert (
        load_corpus([str(tmp_path / "a.jsonl")]).fingerprint
        == load_corpus([str(tmp_path / "a.jsonl")]).fingerprint
    )


def test_builtin_corpus_is_python_docs_and_deterministic():
    first, second = load_corpus([]), load_corpus(["builtin"])
    assert first.fingerprint == second.fingerprint
    sources = {d.meta["source"] for d in first.docs}
    assert sources == {"pydoc_data.topics", "stdlib docstrings"}
    assert sum(len(d.text) for d in first.docs) > 1_000_000


def test_saved_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "hello", "n": 1}, {"text": "", "n": 2}]).save_to_disk(
        tmp_path / "ds"
    )
    corpus = load_corpus([str(tmp_path / "ds")])
    assert (
        [d.text for d in corpus.docs] == ["hello"] and corpus.docs[0].meta["n"] == 1 and corpus.n_empty == 1
    )
