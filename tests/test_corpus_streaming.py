"""Corpora at scale and object storage: documents read lazily (bounded memory, only as far as the
token budget needs), `datasets` corpora, and corpora and stores on a real S3-compatible server (moto)
on 127.0.0.1, its endpoint given by environment variables or by ``storage_options``."""

from __future__ import annotations

import gzip
import importlib.util
import json
import socket
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from bae_testing.stores import assert_stores_identical
from bae_testing.tiny_models import save_tiny_model
from typer.testing import CliRunner

from bae.cli import app
from bae.common.errors import BaeError
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.corpus import CorpusStream, load_corpus
from bae.pipeline.harvest.run import run_harvest
from bae.pipeline.harvest.windows import tokenize_corpus
from bae.pipeline.llm.load import load_model
from bae.stores import ActivationStore

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "binary", "bits"]
BUCKET = "bae-corpora"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bae-test-key", "AWS_SECRET_ACCESS_KEY": "bae-test-secret"}
HARVEST = {"context_length": 16, "layers": [1], "store_dtype": "float32", "unit_rows": 32}


def records(n: int, seed: int = 0) -> list[dict]:
    """``n`` documents of 3..30 words with metadata (``source`` included, so that the same records
    read from differently named files or datasets give the same documents)."""
    rng = np.random.default_rng(seed)
    return [
        {"text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))), "k": i % 5, "source": "s"}
        for i in range(n)
    ]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server on a free port of 127.0.0.1, with one bucket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(endpoint_url=url, key="k", secret="s", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield url
    server.stop()


@pytest.fixture
def aws_env(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The endpoint and credentials as the environment variables s3fs (botocore) reads."""
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached file system would keep an old endpoint
    return env


def upload(endpoint: str, key: str, data: bytes) -> str:
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s", skip_instance_cache=True)
    fs.pipe(f"{BUCKET}/{key}", data)
    return f"s3://{BUCKET}/{key}"


def harvest(out: Path | str, model: Path, corpus: list[str], **kw) -> ActivationStore:
    cfg = HarvestConfig(out=str(out), model=str(model), corpus=corpus, **{**HARVEST, **kw})
    result = run_harvest(cfg, show_progress=False)
    assert not result.interrupted
    return result.store


def test_url_corpus_harvests_to_the_same_store_as_the_local_file(
    tmp_path, model, endpoint, aws_env, monkeypatch
):
    data = gzip.compress(jsonl_bytes(records(60)))
    (tmp_path / "corpus.jsonl.gz").write_bytes(data)
    url = upload(endpoint, "corpora/corpus.jsonl.gz", data)
    local = harvest(tmp_path / "local.zarr", model, [str(tmp_path / "corpus.jsonl.gz")])
    harvest(tmp_path / "env.zarr", model, [url])  # endpoint from AWS_ENDPOINT_URL
    assert_stores_identical(local.url, tmp_path / "env.zarr", config_except=("corpus",))

    for name in aws_env:  # now only the config field says where the server is and who we are
        monkeypatch.delenv(name)
    s3fs.S3FileSystem.clear_instance_cache()
    options = {"endpoint_url": endpoint, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"]}
    options["secret"] = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    harvest(tmp_path / "field.zarr", model, [url], storage_options=options)
    assert_stores_identical(local.url, tmp_path / "field.zarr", config_except=("corpus",))
    written = "".join(p.read_text() for p in (tmp_path / "field.zarr").rglob("zarr.json"))
    assert "storage_options" not in written and options["secret"] not in written and endpoint not in written


def bae(*args: str) -> None:
    """Run a ``bae`` command in this process (so it sees this test's environment)."""
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)


def test_store_on_s3_written_by_harvest_read_by_train_and_entropy(tmp_path, model, endpoint, aws_env):
    """The commands find the server through the environment alone."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(jsonl_bytes(records(40)))
    store = f"s3://{BUCKET}/stores/acts.zarr"
    flags = ["--context-length", "16", "--layers", "1", "--store-dtype", "float32", "--unit-rows", "128"]
    bae("harvest", "-o", store, "-m", str(model), "--corpus", str(corpus), *flags)
    harvest(tmp_path / "local.zarr", model, [str(corpus)], unit_rows=128)
    assert_stores_identical(store, tmp_path / "local.zarr")

    run, entropy = tmp_path / "run", tmp_path / "entropy"
    bae("train", "-s", store, "--layer", "1", "--steps", "10", "--batch-size", "32", "--out", str(run))
    bae("entropy", "-s", store, "-a", str(run), "--out", str(entropy))
    assert pq.read_table(entropy / "entropy.parquet").num_rows > 0


def big_corpus(path: Path, n_docs: int) -> Path:
    """A gzipped JSONL corpus of ``n_docs`` documents, written in blocks."""
    with gzip.open(path, "wb", compresslevel=1) as f:
        for start in range(0, n_docs, 10_000):
            f.write(
                jsonl_bytes(
                    [
                        {"text": f"document {i} " + " ".join(WORDS), "i": i}
                        for i in range(start, start + 10_000)
                    ]
                )
            )
    return path


def test_a_budgeted_harvest_reads_only_what_it_needs_in_bounded_memory(tmp_path, model):
    path = big_corpus(tmp_path / "big.jsonl.gz", 20_000)  # 1.6 MB of JSON, ~9 MiB as documents
    loaded = load_model(str(model), "float32")

    def peak_bytes(read) -> tuple[int, object]:
        tracemalloc.start()
        try:
            result = read()
            return tracemalloc.get_traced_memory()[1], result
        finally:
            tracemalloc.stop()

    def streamed() -> CorpusStream:
        stream = CorpusStream([str(path)])
        tokens = tokenize_corpus(loaded.tokenizer, stream.texts(), 16, max_tokens=2_000)
        assert tokens.n_tokens == 2_000
        return stream

    stream_peak, stream = peak_bytes(streamed)
    whole_peak, corpus = peak_bytes(lambda: load_corpus([str(path)]))
    assert isinstance(stream, CorpusStream) and stream.n_read <= 512 and not stream.exhausted
    assert len(corpus.docs) == 20_000  # type: ignore[attr-defined]
    assert stream_peak < 4 * 2**20 < whole_peak, (stream_peak, whole_peak)

    store = harvest(tmp_path / "s.zarr", model, [str(path)], max_tokens=2_000)
    assert cast(zarr.Array, store.group["documents/i"]).shape == (
        stream.n_read,
    )  # metadata of the documents read only
    assert ActivationStore.open(tmp_path / "s.zarr").done_mask().all()


def test_a_resumed_budgeted_harvest_writes_the_same_store(tmp_path, model):
    """A store whose later units are not done, resumed: the store of one uninterrupted run."""
    path = big_corpus(tmp_path / "big.jsonl.gz", 20_000)
    whole = harvest(tmp_path / "whole.zarr", model, [str(path)], max_tokens=600)
    partial = harvest(tmp_path / "partial.zarr", model, [str(path)], max_tokens=600)
    cast(zarr.Array, partial.group["units/done"])[1:] = 0  # as if killed after unit 0
    resumed = harvest(tmp_path / "partial.zarr", model, [str(path)], max_tokens=600)
    assert resumed.done_mask().all()
    assert_stores_identical(whole.url, tmp_path / "partial.zarr")


def test_saved_and_streamed_datasets_harvest_like_the_same_jsonl(tmp_path, model):
    """A saved dataset harvests to the jsonl's store; the streamed one reads the very same documents
    (a harvest is a function of them, as the saved dataset's shows)."""
    datasets = pytest.importorskip("datasets")
    rows = records(50)
    (tmp_path / "docs.jsonl").write_bytes(jsonl_bytes(rows))
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    reference = harvest(tmp_path / "jsonl.zarr", model, [str(tmp_path / "docs.jsonl")])
    harvest(tmp_path / "saved.zarr", model, [str(tmp_path / "saved")])
    assert_stores_identical(reference.url, tmp_path / "saved.zarr", config_except=("corpus",))
    jsonl, streamed = (
        load_corpus([str(tmp_path / "docs.jsonl")]),
        load_corpus([f"datasets:json:{tmp_path}/*.jsonl"]),
    )
    assert streamed.docs == jsonl.docs and streamed.fingerprint == jsonl.fingerprint


def test_bad_sources_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(BaeError, match="expected datasets:BUILDER:FILES"):
        list(CorpusStream(["datasets:json"]))
    with pytest.raises(BaeError, match="no text field 'text'"):
        (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
        list(CorpusStream([f"datasets:json:{tmp_path / 'd.jsonl'}"]))
    with pytest.raises(BaeError, match="no such file, directory or glob match"):
        CorpusStream(["memory://bae-empty/nothing.jsonl"])
    damaged = gzip.compress(jsonl_bytes(records(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(damaged[: len(damaged) // 2])
    with pytest.raises(BaeError, match=r"cut\.jsonl\.gz: damaged gzip data"):
        list(CorpusStream([str(tmp_path / "cut.jsonl.gz")]))
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(BaeError, match="gcsfs"):
            CorpusStream(["gs://bae-bucket/corpus.jsonl.gz"])
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(BaeError, match="needs the `datasets` package"):
        list(CorpusStream([f"datasets:json:{tmp_path / 'd.jsonl'}"]))


def test_malformed_storage_options_are_refused_without_quoting_them():
    result = CliRunner().invoke(app, ["harvest", "--storage-options", '{"secret": "s3cr3t"'])
    assert isinstance(result.exception, BaeError), result.output
    message = str(result.exception)
    assert "storage_options" in message and "not a JSON object" in message and "s3cr3t" not in message


def test_memory_url_directory_corpus_reads_like_the_local_directory(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    (tmp_path / "sub").mkdir()
    for name, seed in (("b.jsonl", 1), ("a.jsonl", 2), ("sub/c.jsonl", 3)):
        rows = [{"text": r["text"], "k": r["k"]} for r in records(3, seed)]  # source: the file's name
        fs.pipe(f"/bae-dir/{name}", jsonl_bytes(rows))
        (tmp_path / name).write_bytes(jsonl_bytes(rows))
    remote, local = load_corpus(["memory://bae-dir"]), load_corpus([str(tmp_path)])
    assert [d.text for d in remote.docs] == [d.text for d in local.docs] and len(local.docs) == 9
    assert [d.meta["source"] for d in remote.docs] == ["a.jsonl"] * 3 + ["b.jsonl"] * 3 + ["sub/c.jsonl"] * 3
    assert remote.fingerprint == local.fingerprint


def test_read_to_end_gives_the_whole_corpus_fingerprint_of_earlier_stores(tmp_path):
    """What `bae evaluate` compares with a store harvested (with a token budget) by an earlier bae."""
    path = big_corpus(tmp_path / "c.jsonl.gz", 10_000)
    stream = CorpusStream([str(path)])
    texts = stream.texts()
    assert next(texts).startswith("document 0 ")
    whole = load_corpus([str(path)])
    assert stream.fingerprint != whole.fingerprint and not stream.exhausted
    assert stream.read_to_end() == whole.fingerprint and stream.n_read == 10_000
