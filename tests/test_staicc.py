"""staicc datasets as a corpus source, the restricted unpickler, ICL prompts and ``bae icl-prompts``.

Offline; the datasets come from the installed ``staicc`` wheel (``pip install --no-deps staicc``), and
the tests that read them are skipped when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from bae.common.errors import BaeError
from bae.pipeline.harvest import staicc
from bae.pipeline.harvest.corpus import load_corpus
from bae.pipeline.harvest.icl import DEFAULT_KS, IclPromptsConfig, build_prompts


def _installed() -> bool:
    try:
        staicc.data_dir()
    except BaeError:
        return False
    return True


needs_staicc = pytest.mark.skipif(not _installed(), reason=f"staicc not installed ({staicc.INSTALL})")

EXPECTED = {  # records per label in StaICC 0.1.1's files
    "agnews": [31900, 31900, 31900, 31900],
    "financial_phrasebank": [303, 1391, 570],
    "hate_speech_18": [9504, 1194, 73, 168],
    "rotten_tomatoes": [4265, 4265],
    "sst2": [29780, 37569],
    "sst5": [1092, 2218, 1624, 2322, 1288],
    "subjective": [3967, 4033],
    "trec": [95, 1344, 1300, 1288, 916, 1009],
    "tweet_eval_emotion": [2118, 1163, 445, 1326],
    "tweet_eval_hate": [5217, 3783],
}

TRIPPED: list[tuple] = []


def _tripwire(*args: object) -> None:
    TRIPPED.append(args)


class _Calls:
    """Unpickling this calls ``_tripwire`` (with an ordinary unpickler)."""

    def __reduce__(self):
        return (_tripwire, ("called",))


@cache
def records(name: str) -> list[staicc.Record]:
    return staicc.load_staicc(name)


# -- the restricted unpickler ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(os.system, protocol=0),  # GLOBAL
        pickle.dumps(os.system, protocol=4),  # STACK_GLOBAL
        b"cos\nsystem\n(S'echo pwned'\ntR.",  # hand-written GLOBAL + REDUCE
        pickle.dumps([(["x"], 1), _Calls()], protocol=2),
        pickle.dumps([(["x"], 1), _Calls()], protocol=5),
        pickle.dumps(Counter()),
    ],
)
def test_unpickler_refuses_every_global_and_calls_nothing(payload, monkeypatch) -> None:
    called: list[tuple] = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    TRIPPED.clear()
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        staicc.safe_loads(payload)
    assert called == [] and TRIPPED == []


def test_the_tripwire_would_fire_with_plain_pickle() -> None:
    TRIPPED.clear()
    pickle.loads(pickle.dumps(_Calls()))
    assert TRIPPED == [("called",)]
    TRIPPED.clear()


def test_unpickler_reads_builtins() -> None:
    data = [(["a"], 1), {"k": [1.5, None, True]}, "s", b"b", {1, 2}]
    assert staicc.safe_loads(pickle.dumps(data, protocol=4)) == data


def test_a_dataset_file_with_a_global_is_refused(tmp_path, monkeypatch) -> None:
    (tmp_path / "evil.dataset").write_bytes(pickle.dumps([(["t"], 0), _Calls()]))
    (tmp_path / "bad.dataset").write_bytes(pickle.dumps([(["t"], 0), ("no list", 1)]))
    (tmp_path / "cut.dataset").write_bytes(pickle.dumps([(["t"], 0)])[:-3])
    monkeypatch.setenv(staicc.DATA_DIR_ENV, str(tmp_path))
    TRIPPED.clear()
    with pytest.raises(BaeError, match="refusing to load global"):
        load_corpus(["staicc:evil"])
    assert TRIPPED == []
    with pytest.raises(BaeError, match=r"record 1: expected \(\[text\], int label\)"):
        staicc.load_staicc("bad")
    with pytest.raises(BaeError, match="cannot read"):
        staicc.load_staicc("cut")


# -- locating and reading the shipped datasets --------------------------------------------------------


@needs_staicc
def test_located_without_importing_staicc(monkeypatch) -> None:
    monkeypatch.delenv(staicc.DATA_DIR_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "StaICC", raising=False)
    assert staicc.data_dir().name == "cached_dataset"
    assert "StaICC" not in sys.modules


def test_missing_package_names_the_install_line(monkeypatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv(staicc.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(staicc.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(staicc.importlib.metadata, "distribution", not_installed)
    with pytest.raises(BaeError, match="pip install --no-deps staicc") as err:
        load_corpus(["staicc:sst2"])
    assert "\n" not in str(err.value)


@needs_staicc
def test_available() -> None:
    assert staicc.available() == sorted(EXPECTED) == sorted(staicc.LABELS)


@needs_staicc
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_dataset_reads_with_the_expected_counts(name: str) -> None:
    recs = records(name)
    assert Counter(r.label for r in recs) == dict(enumerate(EXPECTED[name]))
    assert [r.index for r in recs] == list(range(len(recs)))
    assert all(isinstance(r.text, str) for r in recs)
    labels = staicc.LABELS[name]
    assert len(labels.names) == len(labels.words) == len(EXPECTED[name])
    assert {r.label_name for r in recs} == set(labels.names)
    test = [r for r in recs if r.split == "test"]
    train = [r for r in recs if r.split == "train"]
    assert len(train) + len(test) == len(recs) and 0.15 < len(test) / len(recs) < 0.25
    assert not {r.text for r in train} & {r.text for r in test}


@needs_staicc
def test_split_filter_matches_the_derived_split() -> None:
    assert staicc.load_staicc("trec", "test") == [r for r in records("trec") if r.split == "test"]
    assert staicc.load_staicc("trec", "train") == [r for r in records("trec") if r.split == "train"]


def test_parse_spec() -> None:
    assert staicc.parse_spec("staicc:agnews") == ("agnews", None)
    assert staicc.parse_spec("staicc:sst2:train") == ("sst2", "train")
    assert not staicc.is_staicc_spec("corpus/file.jsonl")
    for bad in ("staicc:", "staicc:sst2:dev", "staicc:a:b:c", "staicc::test"):
        with pytest.raises(BaeError):
            staicc.parse_spec(bad)


# -- staicc: corpus sources ----------------------------------------------------------------------------


@needs_staicc
def test_staicc_corpus_documents_and_metadata_columns() -> None:
    corpus = load_corpus(["staicc:trec:test"])
    expected = [r for r in records("trec") if r.split == "test" and r.text.strip()]
    assert [d.text for d in corpus.docs] == [r.text for r in expected]
    cols = corpus.metadata_columns()
    assert {"source", "dataset", "label", "label_name", "split", "index"} <= set(cols)
    assert cols["label"].dtype == np.int64 and cols["index"].dtype == np.int64
    np.testing.assert_array_equal(cols["label"], [r.label for r in expected])
    assert set(cols["split"]) == {"test"} and set(cols["dataset"]) == {"trec"}
    assert set(cols["label_name"]) == set(staicc.LABELS["trec"].names)
    assert set(cols["source"]) == {"staicc:trec:test"}


@needs_staicc
def test_staicc_mixed_with_files_and_fingerprinted(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a file doc", "label": "x"}) + "\n")
    mixed = load_corpus([str(tmp_path / "d.jsonl"), "staicc:subjective:test"])
    assert mixed.docs[0].text == "a file doc" and mixed.docs[0].meta == {"label": "x", "source": "d.jsonl"}
    assert {d.meta["dataset"] for d in mixed.docs[1:]} == {"subjective"}
    cols = mixed.metadata_columns()
    assert cols["dataset"][0] == "" and cols["label"][0] == "x" and cols["label"][1] in ("0", "1")
    again = load_corpus([str(tmp_path / "d.jsonl"), "staicc:subjective:test"])
    assert again.fingerprint == mixed.fingerprint
    other = load_corpus([str(tmp_path / "d.jsonl"), "staicc:subjective:train"])
    assert other.fingerprint != mixed.fingerprint


@needs_staicc
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("staicc:nope", "no staicc dataset 'nope'; available: agnews, financial_phrasebank,"),
        ("staicc:sst2:dev", "split 'dev' is not one of train, test"),
        ("staicc:", "expected staicc:NAME or staicc:NAME:SPLIT"),
    ],
)
def test_bad_staicc_spec_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(BaeError) as err:
        load_corpus([spec])
    assert message in str(err.value) and "\n" not in str(err.value)


# -- ICL prompts ---------------------------------------------------------------------------------------


def _prompts(**kw) -> list[dict]:
    return build_prompts(IclPromptsConfig(**({"dataset": "sst5", "n": 20, "seed": 3, "max_chars": 120} | kw)))


@needs_staicc
def test_prompt_layout_demos_and_queries() -> None:
    recs = _prompts(label_prefix="Sentiment:", instruction="Rate it.\\n\\n")
    assert Counter(r["k"] for r in recs) == {k: 20 for k in DEFAULT_KS}
    words = staicc.LABELS["sst5"].words
    texts = {r.index: r.text.strip()[:120].rstrip() for r in records("sst5")}
    splits = {r.index: r.split for r in records("sst5")}
    for r in recs:
        assert r["prompt"].startswith("Rate it.\n\n") and r["prompt"].endswith("\nSentiment:")
        assert r["prompt"].count("\nSentiment: ") == r["k"]
        demos = [int(i) for i in r["demo_indices"].split(",")] if r["k"] else []
        labels = [int(lab) for lab in r["demo_labels"].split(",")] if r["k"] else []
        assert len(demos) == len(set(demos)) == r["k"]
        assert splits[r["query_index"]] == "test" and {splits[d] for d in demos} <= {"train"}
        assert texts[r["query_index"]] not in {texts[d] for d in demos}
        assert all(f"{texts[d]}\nSentiment: {words[lab]}\n\n" in r["prompt"] for d, lab in zip(demos, labels))
        assert r["prompt"].endswith(f"{texts[r['query_index']]}\nSentiment:")
    assert len({r["prompt_id"] for r in recs}) == len(recs)
    assert len({r["query_index"] for r in recs}) == 20  # the same 20 queries for every k


@needs_staicc
def test_prompts_are_deterministic() -> None:
    assert _prompts() == _prompts()
    assert _prompts() != _prompts(seed=4)
    only_four = _prompts(ks=[4])
    assert only_four == [r for r in _prompts() if r["k"] == 4]


@needs_staicc
def test_label_balance() -> None:
    recs = _prompts(dataset="trec", balanced_queries=True, n=12)
    for r in recs:
        counts = Counter(r["demo_labels"].split(",")) if r["k"] else Counter()
        assert not counts or max(counts.values()) - min(counts.values()) <= 1
        assert r["k"] < 6 or len(counts) == 6
    assert Counter(r["query_label"] for r in recs if r["k"] == 0) == {label: 2 for label in range(6)}
    unbalanced = _prompts(dataset="hate_speech_18", demo_labels="random", n=50, ks=[8])
    assert Counter(lab for r in unbalanced for lab in r["demo_labels"].split(","))["0"] > 250


@needs_staicc
def test_prompt_errors_are_bae_errors() -> None:
    with pytest.raises(BaeError, match=r"100000 needed, only \d+ available"):
        _prompts(dataset="trec", n=100_000)
    with pytest.raises(BaeError, match="no staicc dataset 'nope'; available: agnews"):
        _prompts(dataset="nope")
    with pytest.raises(ValueError, match="distinct non-negative"):
        IclPromptsConfig(dataset="sst2", ks="1,1")  # type: ignore[arg-type]
    assert IclPromptsConfig(dataset="sst2", ks="0, 3,5").ks == [0, 3, 5]  # type: ignore[arg-type]


# -- the CLI -------------------------------------------------------------------------------------------


def _bae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bae.cli", "icl-prompts", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@needs_staicc
def test_cli_writes_a_corpus_harvest_reads(tmp_path) -> None:
    (tmp_path / "icl.yaml").write_text("dataset: trec\nks: 0,2\nseed: 1\nlabel_prefix: 'Type:'\n")
    proc = _bae("--config", "icl.yaml", "-n", "4", "-o", "out/prompts.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out" / "prompts.jsonl"
    assert "8 (4 queries x k = 0,2)" in proc.stdout and os.listdir(out.parent) == ["prompts.jsonl"]
    corpus = load_corpus([str(out)], text_field="prompt")
    cols = corpus.metadata_columns()
    assert cols["k"].dtype == np.int64 and Counter(cols["k"].tolist()) == {0: 4, 2: 4}
    assert all(d.text.endswith("\nType:") for d in corpus.docs)
    expected = build_prompts(IclPromptsConfig(dataset="trec", n=4, ks=[0, 2], seed=1, label_prefix="Type:"))
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected


@needs_staicc
def test_cli_bad_dataset_is_one_error_line(tmp_path) -> None:
    proc = _bae("nope", "-o", "p.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no staicc dataset 'nope'; available: agnews, ")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "p.jsonl").exists()
