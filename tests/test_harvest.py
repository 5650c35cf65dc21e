"""`bae harvest`: captured states equal HF hidden_states, resume after kill -9, 2-process torchrun,
packed/document modes, positions, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import zarr
from bae_testing.tiny_models import save_tiny_model

from bae.common.errors import BaeError
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.corpus import load_corpus
from bae.pipeline.harvest.plan import plan_units
from bae.pipeline.harvest.run import check_free_space, run_harvest
from bae.pipeline.harvest.windows import tokenize_corpus
from bae.pipeline.llm.capture import LayerCapture
from bae.pipeline.llm.load import load_model
from bae.stores import ActivationStore

WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"),
    *("binary", "autoencoders", "turn", "hidden", "states", "into", "bits"),
]


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """JSONL documents of 3..40 words, with a label and k field as metadata."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n_docs):
            words = rng.choice(WORDS, size=int(rng.integers(3, 40)))
            f.write(json.dumps({"text": " ".join(words), "label": f"L{i % 3}", "k": i % 5}) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("gpt2", "llama", "neox")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 40)


def harvest(tmp_path: Path, model: Path, corpus: Path, name: str = "store", **kw) -> ActivationStore:
    cfg = HarvestConfig(out=str(tmp_path / name), model=str(model), corpus=[str(corpus)], **kw)
    result = run_harvest(cfg, show_progress=False)
    assert not result.interrupted
    return result.store


def reference(cfg: HarvestConfig, layers: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Expected layer rows, token ids and positions: each window alone through output_hidden_states."""
    loaded = load_model(cfg.model, "float32")
    docs = load_corpus(cfg.corpus, cfg.text_field).docs
    toks = tokenize_corpus(
        loaded.tokenizer,
        [d.text for d in docs],
        cfg.context_length,
        cfg.mode,
        cfg.bos,
        cfg.positions,
        cfg.max_tokens,
    )
    plan = plan_units(toks.windows, cfg.rows_per_unit)
    out = {layer: [] for layer in layers}
    ids, positions = [], []
    for unit in plan.units:
        n = 0
        for i in unit:
            win = plan.windows[i]
            with torch.no_grad():
                hs = loaded.model(
                    torch.from_numpy(win.input_ids)[None].long(), output_hidden_states=True
                ).hidden_states
            for layer in layers:
                out[layer].append(hs[layer][0, win.keep].numpy())
            ids.append(win.input_ids[win.keep])
            positions.append(win.positions[win.keep])
            n += win.n_rows
        if unit is not plan.units[-1]:
            for layer in layers:
                out[layer].append(np.zeros((plan.unit_rows - n, loaded.d_model), np.float32))
            ids.append(np.full(plan.unit_rows - n, -1))
            positions.append(np.full(plan.unit_rows - n, -1))
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(ids), np.concatenate(positions)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_capture_equals_output_hidden_states(kind, models):
    """Hooks (with early stop) give exactly HF's hidden_states[L], padded batch included."""
    loaded = load_model(str(models[kind]), "float32")
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = loaded.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layers in ([0], [1], [2], [3], [0, 2, 3]):
        with LayerCapture(loaded.model, layers) as cap:
            got = cap.run(ids, mask)
        for layer in layers:
            torch.testing.assert_close(got[layer], ref[layer], rtol=0, atol=0)


def test_forward_stops_after_deepest_layer(models):
    loaded = load_model(str(models["llama"]), "float32")
    ran = []
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
        for i, b in enumerate(loaded.model.model.layers)
    ]
    with LayerCapture(loaded.model, [1]) as cap:
        cap.run(torch.randint(3, 300, (1, 5)))
    for h in handles:
        h.remove()
    assert ran == [0]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_store_equals_hidden_states(kind, models, corpus, tmp_path):
    """A whole harvest (packed, several units, last layer with the final norm) matches the reference."""
    layers = [0, 2, 3]
    store = harvest(
        tmp_path,
        models[kind],
        corpus,
        layers="0,2,3",
        context_length=24,
        unit_rows=48,
        batch_tokens=60,
        store_dtype="float32",
    )
    cfg = HarvestConfig.model_validate(store.meta["config"])
    expected, ids, positions = reference(cfg, layers)
    assert store.n_units > 2 and store.done_mask().all()
    for layer in layers:
        np.testing.assert_allclose(
            store.read_layer(layer, 0, store.n_rows), expected[layer], atol=2e-5, rtol=1e-5
        )
    rows = store.read_rows(0, store.n_rows)
    np.testing.assert_array_equal(rows["token_ids"], ids)
    np.testing.assert_array_equal(rows["positions"], positions)
    docs = store.documents()
    assert list(docs["k"][:5]) == [0, 1, 2, 3, 4] and docs["label"][1] == "L1"
    assert store.meta["packing_mode"] == "packed" and store.meta["context_length"] == 24


def test_packed_rows_join_documents_with_separator(models, corpus, tmp_path):
    store = harvest(tmp_path, models["llama"], corpus, layers="1", context_length=16, unit_rows=64)
    loaded = load_model(str(models["llama"]), "float32")
    texts = [d.text for d in load_corpus([str(corpus)]).docs]
    stream = []
    for i, text in enumerate(texts):
        stream += ([2] if i else []) + loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = store.read_rows(0, store.n_rows)
    real = rows["positions"] >= 0
    np.testing.assert_array_equal(rows["token_ids"][real], stream)
    assert not rows["valid"][real][np.asarray(stream) == 2].any()  # separators are invalid rows
    assert rows["valid"][real][np.asarray(stream) != 2].all()
    assert set(rows["positions"][real]) == set(range(16))


def test_document_mode_positions_and_bos(models, corpus, tmp_path):
    store = harvest(
        tmp_path, models["gpt2"], corpus, layers="2", mode="document", bos="always", context_length=20
    )
    loaded = load_model(str(models["gpt2"]), "float32")
    texts = [d.text for d in load_corpus([str(corpus)]).docs]
    rows = store.read_rows(0, store.n_rows)
    for doc, text in enumerate(texts):
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:19]
        mine = rows["doc_ids"] == doc
        assert list(rows["token_ids"][mine]) == [1, *ids]  # BOS, then the (truncated) document
        assert list(rows["positions"][mine]) == list(range(len(ids) + 1))
        assert list(rows["valid"][mine]) == [False] + [True] * len(ids)


def test_positions_last_keeps_each_documents_last_token(models, corpus, tmp_path):
    store = harvest(
        tmp_path,
        models["neox"],
        corpus,
        layers="3",
        mode="document",
        positions="last",
        context_length=64,
        store_dtype="float32",
    )
    loaded = load_model(str(models["neox"]), "float32")
    texts = [d.text for d in load_corpus([str(corpus)]).docs]
    rows = store.read_rows(0, store.n_rows)
    keep = rows["valid"]
    assert keep.sum() == len(texts) and list(rows["doc_ids"][keep]) == list(range(len(texts)))
    got = store.read_layer(3, 0, store.n_rows)[keep]
    for doc in (0, 7, len(texts) - 1):
        ids = loaded.tokenizer(texts[doc], add_special_tokens=False, return_tensors="pt")["input_ids"][:, :64]
        with torch.no_grad():
            ref = loaded.model(ids, output_hidden_states=True).hidden_states[3][0, -1]
        np.testing.assert_allclose(got[doc], ref.numpy(), atol=2e-5)
        assert rows["positions"][keep][doc] == ids.shape[1] - 1


def test_positions_list(models, corpus, tmp_path):
    store = harvest(
        tmp_path, models["llama"], corpus, layers="1", mode="document", positions="0,5", context_length=32
    )
    rows = store.read_rows(0, store.n_rows)
    assert set(rows["positions"][rows["valid"]]) == {0, 5}


def read_all(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name in ("token_ids", "doc_ids", "positions", "valid", "units/done", "units/clamped"):
        out[name] = cast(zarr.Array, group[name])[:]
    for name in cast(zarr.Group, group["layers"]).array_keys():
        out[f"layers/{name}"] = cast(zarr.Array, group[f"layers/{name}"])[:]
    for name in cast(zarr.Group, group["documents"]).array_keys():
        out[f"documents/{name}"] = cast(zarr.Array, group[f"documents/{name}"])[:]
    return out


def assert_same_store(a: Path, b: Path) -> None:
    left, right = read_all(a), read_all(b)
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
    meta_a, meta_b = (dict(ActivationStore.open(p).meta) for p in (a, b))
    for meta in (meta_a, meta_b):
        meta["config"] = {k: v for k, v in meta["config"].items() if k != "out"}
    assert meta_a == meta_b


FLAGS = [
    *("--layers", "1,3", "--context-length", "16", "--unit-rows", "64"),
    "--batch-tokens",
    "32",
    "--no-progress",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bae.cli", "harvest", *args]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("big") / "big.jsonl", 60, seed=1)


@pytest.fixture(scope="module")
def uninterrupted(models, big_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "store"
    subprocess.run(
        cli("--model", str(models["llama"]), "--corpus", str(big_corpus), "-o", str(out), *FLAGS),
        check=True,
        capture_output=True,
    )
    return out


def done_count(store: Path) -> int:
    folder = store / "units" / "done" / "c"
    return len(list(folder.iterdir())) if folder.exists() else 0


def start_and_wait(cmd: list[str], store: Path, min_done: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while done_count(store) < min_done and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    return proc


def test_resume_after_kill9_equals_uninterrupted(models, big_corpus, uninterrupted, tmp_path):
    out = tmp_path / "store"
    cmd = cli("--model", str(models["llama"]), "--corpus", str(big_corpus), "-o", str(out), *FLAGS)
    proc = start_and_wait(cmd, out, min_done=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ActivationStore.open(out)
    assert 0 < store.done_mask().sum() < store.n_units  # a partial store never looks complete
    subprocess.run(cmd, check=True, capture_output=True)
    assert_same_store(out, uninterrupted)


def test_sigterm_stops_cleanly_and_resumes(models, big_corpus, uninterrupted, tmp_path):
    out = tmp_path / "store"
    cmd = cli("--model", str(models["llama"]), "--corpus", str(big_corpus), "-o", str(out), *FLAGS)
    proc = start_and_wait(cmd, out, min_done=3)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "re-run the same command to resume" in stdout
    done = ActivationStore.open(out).done_mask()
    assert done.sum() < len(done)
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert f"{done.sum()} already done" in result.stdout or "were done" in result.stdout
    assert_same_store(out, uninterrupted)


def test_torchrun_two_processes_equal_single(models, big_corpus, uninterrupted, tmp_path):
    out = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "bae.cli",
        "harvest",
        "--model",
        str(models["llama"]),
        "--corpus",
        str(big_corpus),
        "-o",
        str(out),
        *FLAGS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    n_units = ActivationStore.open(out).n_units
    assert f"{(n_units + 1) // 2} written now" in result.stdout  # rank 0 wrote only its half
    assert_same_store(out, uninterrupted)


def test_a_moved_store_resumes_where_it_is(models, corpus, tmp_path):
    first = harvest(tmp_path, models["gpt2"], corpus, layers="1", context_length=16, max_tokens=200)
    n_units = first.n_units
    (tmp_path / "store").rename(tmp_path / "moved")
    again = run_harvest(
        HarvestConfig(
            out=str(tmp_path / "moved"),
            model=str(models["gpt2"]),
            corpus=[str(corpus)],
            layers="1",  # pyright: ignore[reportArgumentType]  # parsed by a before-validator, as from the CLI
            context_length=16,
            max_tokens=200,
        ),
        show_progress=False,
    )
    assert again.units_written == 0 and again.units_skipped == n_units
    assert "out" not in again.store.meta["config"]


def test_changed_config_on_existing_store_is_refused(models, corpus, tmp_path):
    harvest(tmp_path, models["gpt2"], corpus, layers="1", context_length=16)
    with pytest.raises(BaeError, match="context_length: 16 -> 24"):
        harvest(tmp_path, models["gpt2"], corpus, layers="1", context_length=24)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"corpus": ["{tmp}/missing.jsonl"]}, "no such file, directory or glob"),
        ({"corpus": ["{tmp}/empty.txt"]}, "no non-empty documents"),
        ({"layers": [7]}, r"layers \[7\] out of range: this model has layers 0\.\.3"),
        ({"context_length": 4096}, "exceeds the model's maximum of 128 positions"),
        ({"model": "no-such-org/no-such-model"}, "cannot be found offline.*local model directory"),
        ({"text_field": "body"}, "no text field 'body'"),
    ],
)
def test_bad_input_is_one_clear_error_and_no_store(kw, message, models, corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    fields = {"out": str(tmp_path / "store"), "model": str(models["gpt2"]), "corpus": [str(corpus)]}
    fields["context_length"] = 64  # within the model's limit, so each case meets only its own error
    fields.update(
        {k: [v.format(tmp=tmp_path) for v in val] if k == "corpus" else val for k, val in kw.items()}
    )
    with pytest.raises(BaeError, match=message) as info:
        run_harvest(HarvestConfig(**fields), show_progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "store").exists()


def test_cli_bad_input_exits_nonzero_with_one_line(models, tmp_path):
    result = subprocess.run(
        cli("--model", str(models["gpt2"]), "--corpus", str(tmp_path / "nope"), "-o", str(tmp_path / "s")),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: corpus '{tmp_path / 'nope'}': no such file, directory or glob match"
    ]


def test_preflight_refuses_when_disk_is_too_small(tmp_path):
    with pytest.raises(BaeError, match=r"needs .* but only .* is free"):
        check_free_space(str(tmp_path / "store"), needed=1 << 62)


def test_embedded_smollm2_harvest_matches_hidden_states(tmp_path):
    """The default model (GGUF converted and cached once) on the builtin corpus, layer 15."""
    cfg = HarvestConfig(out=str(tmp_path / "s"), max_tokens=96, context_length=32, store_dtype="float32")
    store = run_harvest(cfg, show_progress=False).store
    assert (
        store.layers == [15]
        and store.n_rows == 96
        and store.meta["model"]["revision"].startswith("gguf-sha256:")
    )
    loaded = load_model(None, "float32")
    ids = torch.from_numpy(store.read_rows(0, 32)["token_ids"]).long()[None]
    with torch.no_grad():
        ref = loaded.model(ids, output_hidden_states=True).hidden_states[15][0]
    np.testing.assert_allclose(store.read_layer(15, 0, 32), ref.numpy(), atol=1e-4, rtol=1e-4)
