"""`bae store import` of [batch, seq, d] caches and SAELens activation caches: rows, token ids and
positions as a harvest records them, padding dropped, resume, and bad inputs in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import transformers
import zarr
from bae_testing.entropy import save_bae
from bae_testing.stores import run_bae
from bae_testing.tiny_models import save_tiny_model
from safetensors.torch import save_file

from bae import cli
from bae.common.console import format_summary
from bae.pipeline.analysis.token_text import TokenText, load_store_tokenizer
from bae.pipeline.entropy.run import EntropyConfig, run_entropy
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.run import run_harvest
from bae.stores import ActivationStore
from bae.stores.importer import ImportConfig, import_activations
from bae.stores.info import store_summary

WORDS = [*("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"), *("binary", "codes", "bits")]
ROWS = ("token_ids", "doc_ids", "positions", "valid")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


def all_rows(store: ActivationStore, layer: int) -> dict[str, np.ndarray]:
    return {**store.read_rows(0, store.n_rows), "values": store.read_layer(layer, 0, store.n_rows)}


def to_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A harvest store's rows back as a right-padded [batch, seq, d] cache (one document per item)."""
    docs, starts, lengths = np.unique(rows["doc_ids"], return_index=True, return_counts=True)
    batch, seq, d = len(docs), int(lengths.max()), rows["values"].shape[1]
    out = {
        "acts": np.zeros((batch, seq, d), np.float32),
        "tokens": np.zeros((batch, seq), np.int64),
        "mask": np.zeros((batch, seq), np.int64),
    }
    for b, (start, length) in enumerate(zip(starts, lengths)):
        assert (rows["positions"][start : start + length] == np.arange(length)).all()
        out["acts"][b, :length] = rows["values"][start : start + length]
        out["tokens"][b, :length] = rows["token_ids"][start : start + length]
        out["mask"][b, :length] = 1
    out["acts"][out["mask"] == 0] = 1e6  # padding that would overflow float16 if it were stored
    out["docs"] = docs
    return out


def test_batch_cache_of_a_harvest_imports_as_the_harvest_store(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(2, 14))))}) for _ in range(18)]
    corpus.write_text("\n".join(lines) + "\n")
    harvested = run_harvest(
        HarvestConfig(
            out=str(tmp_path / "harvest"),
            model=str(model_dir),
            corpus=[str(corpus)],
            layers=[1],
            mode="document",
            bos="always",
            context_length=24,
        ),
        show_progress=False,
    ).store
    ref = all_rows(harvested, 1)
    cache = to_batch(ref)
    for name, values in cache.items():
        np.save(tmp_path / f"{name}.npy", values)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    special = ",".join(map(str, tokenizer.all_special_ids))
    run_bae(
        *("store", "import", str(tmp_path / "acts.npy"), "-o", str(tmp_path / "imported"), "--layer", "1"),
        *("--tokens", str(tmp_path / "tokens.npy"), "--mask", str(tmp_path / "mask.npy")),
        *("--doc-ids", str(tmp_path / "docs.npy"), "--special-tokens", special, "--unit-rows", "37"),
        *("--model", str(model_dir), "--no-progress"),
        check=True,
    )
    imported = ActivationStore.open(str(tmp_path / "imported"))
    got = all_rows(imported, 1)
    for name in (*ROWS, "values"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert not ref["valid"][ref["positions"] == 0].any()  # BOS rows: stored, invalid, in both
    assert imported.meta["context_length"] == cache["acts"].shape[1]
    assert imported.meta["source"]["shape"] == list(cache["acts"].shape)
    bae = save_bae(tmp_path / "bae", d=imported.d_model, layer=1, identity=False)
    tables = [
        run_entropy(
            EntropyConfig(
                store=store.url, checkpoints=[str(bae)], out=str(tmp_path / f"e{i}"), null_groups=0
            ),
            show_progress=False,
        ).table.to_pydict()
        for i, store in enumerate((harvested, imported))
    ]
    assert len(tables[0]["position"]) > 5
    np.testing.assert_equal(tables[0], tables[1])  # NaN == NaN (no FVU recorded)
    first = got["token_ids"][got["doc_ids"] == got["doc_ids"][0]].tolist()  # what features contexts shows
    assert TokenText(load_store_tokenizer(imported)).decode(first) == tokenizer.decode(first)
    info = format_summary("store", store_summary(imported))
    assert f"npy {tmp_path / 'acts.npy'} [{'x'.join(map(str, cache['acts'].shape))}] float32" in info
    assert f"model            {model_dir}\n" in info


def left_padded(batch: int, seq: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TransformerLens-style cache: left-padded sequences of random lengths, bfloat16 activations."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] >= seq - lengths[:, None]).long()
    return {
        "blocks.0.hook_resid_post": torch.randn(batch, seq, d, generator=gen).to(torch.bfloat16),
        "input_ids": torch.randint(3, 300, (batch, seq), generator=gen) * mask,
        "attention_mask": mask,
    }


def expected_rows(cache: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Row by row, independently of the importer: each kept position in batch-major order."""
    acts = cache["blocks.0.hook_resid_post"]
    rows: dict[str, list] = {"values": [], "token_ids": [], "doc_ids": [], "positions": []}
    for b in range(acts.shape[0]):
        position = 0
        for s in range(acts.shape[1]):
            if mask[b, s]:
                rows["values"].append(acts[b, s].float().numpy())
                rows["token_ids"].append(int(cache["input_ids"][b, s]))
                rows["doc_ids"].append(b)
                rows["positions"].append(position)
                position += 1
    return {k: np.array(v) for k, v in rows.items()}


def pt_config(src: Path, out: Path, **kw) -> ImportConfig:
    """Import a ``left_padded`` cache saved with torch.save, by its keys."""
    names = {"tensor": "blocks.0.hook_resid_post", "tokens": "input_ids", "mask": "attention_mask"}
    return ImportConfig.model_validate({"src": str(src), "out": str(out), **names, **kw})


def test_pt_cache_weights_only_left_padding_dropped(tmp_path):
    cache = left_padded(batch=9, seq=11, d=6)
    torch.save(cache, tmp_path / "cache.pt")
    cfg = pt_config(tmp_path / "cache.pt", tmp_path / "s", dtype="bfloat16", unit_rows=16)
    store = import_activations(cfg, show_progress=False)
    want = expected_rows(cache, cache["attention_mask"])
    got = all_rows(store, 1)  # blocks.0.hook_resid_post = hidden_states[1]
    assert store.layers == [1] and store.meta["source"]["hook"] == "blocks.0.hook_resid_post"
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got["valid"].all() and store.meta["n_docs"] == 9


def test_safetensors_and_zarr_group_with_lengths(tmp_path):
    cache = left_padded(batch=7, seq=5, d=4, seed=1)
    acts = cache["blocks.0.hook_resid_post"].float()
    lengths = torch.tensor([5, 0, 3, 1, 5, 2, 4])  # right padding; item 1 has no tokens at all
    right = (torch.arange(5)[None, :] < lengths[:, None]).long()
    save_file({"acts": acts, "ids": cache["input_ids"], "n": lengths}, tmp_path / "c.safetensors")
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    for name, value in {"acts": acts, "ids": cache["input_ids"], "n": lengths}.items():
        group.create_array(name, data=value.numpy(), chunks=(2, *value.shape[1:]))
    want = expected_rows({**cache, "blocks.0.hook_resid_post": acts}, right)
    for src in ("c.safetensors", "c.zarr"):
        cfg = ImportConfig(
            src=str(tmp_path / src),
            out=str(tmp_path / f"{src}.store"),
            tensor="acts",
            tokens="ids",
            lengths="n",
        )
        store = import_activations(cfg, show_progress=False)
        got = all_rows(store, 0)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{src} {name}")


@pytest.fixture(scope="module")
def saelens_cache(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A cache written by SAELens' own CacheActivationsRunner from the tiny model on disk (offline)."""
    from datasets import Dataset
    from sae_lens.cache_activations_runner import CacheActivationsRunner
    from sae_lens.config import CacheActivationsRunnerConfig

    ctx, n_seq = 12, 8
    ids = torch.randint(3, 300, (n_seq, ctx), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # BOS
    out = tmp_path_factory.mktemp("saelens") / "cache"
    cfg = CacheActivationsRunnerConfig(
        dataset_path="in-memory",
        model_name=str(model_dir),
        model_class_name="AutoModelForCausalLM",
        hook_name="model.layers.1",
        d_in=32,
        context_size=ctx,
        training_tokens=n_seq * ctx,
        model_batch_size=2,
        buffer_size_gb=2 * 2 * ctx * 32 * 4 / 1e9,  # two batches of two sequences per shard
        new_cached_activations_path=str(out),
        shuffle=False,
        prepend_bos=False,
        device="cpu",
    )
    CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"input_ids": ids.tolist()})).run()
    return out, ids


def test_saelens_cache_imports_with_token_ids_and_hook(saelens_cache, model_dir, tmp_path):
    path, ids = saelens_cache
    assert len(list(path.glob("data-*.arrow"))) == 2  # several Arrow files, read in order
    cfg = ImportConfig(src=str(path), out=str(tmp_path / "s"), special_tokens=[1], unit_rows=20)
    store = import_activations(cfg, show_progress=False)
    assert store.layers == [2]  # model.layers.1 outputs hidden_states[2]
    assert store.meta["source"]["hook"] == "model.layers.1" and store.meta["source"]["format"] == "saelens"
    rows = all_rows(store, 2)
    np.testing.assert_array_equal(rows["token_ids"], ids.reshape(-1).numpy())
    np.testing.assert_array_equal(rows["positions"], np.tile(np.arange(12), 8))
    np.testing.assert_array_equal(rows["doc_ids"], np.repeat(np.arange(8), 12))
    np.testing.assert_array_equal(rows["valid"], rows["positions"] != 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[2].reshape(-1, 32)
    np.testing.assert_allclose(rows["values"], hidden.half().float().numpy(), atol=2e-3)


def test_resume_rewrites_only_missing_units(tmp_path):
    cache = left_padded(batch=6, seq=8, d=4, seed=2)
    torch.save(cache, tmp_path / "c.pt")
    cfg = pt_config(tmp_path / "c.pt", tmp_path / "s", unit_rows=5)
    before = all_rows(import_activations(cfg, show_progress=False), 1)
    group = zarr.open_group(str(tmp_path / "s"), mode="r+")
    cast(zarr.Array, group["units/done"])[2] = 0
    cast(zarr.Array, group["token_ids"])[10:15] = 0  # the unrecorded unit's chunk is garbage
    after = all_rows(import_activations(cfg, show_progress=False), 1)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


class Pickled:
    """Not a tensor: torch.load(weights_only=True) must refuse a file holding one."""


@pytest.mark.parametrize(
    ("setup", "flags", "message"),
    [
        ("rank4", [], "array shape (2, 3, 4, 5), expected [N, d] or [batch, seq, d]"),
        (
            "npy3",
            ["--tokens", "{tmp}/bad_tokens.npy"],
            "token ids: shape (2, 4), expected [batch, seq] = [2, 3]",
        ),
        ("pt", ["--tensor", "acts", "--tokens", "nope"], "no array 'nope'; it holds acts, ids"),
        (
            "pt",
            ["--tensor", "acts", "--mask", "{tmp}/bad_tokens.npy"],
            "expected [2, 3] to match the activations",
        ),
        ("pt", [], "name the array to use; it holds acts, ids"),
        ("pickle", [], "torch.load(weights_only=True) cannot load it"),
        ("npy2", ["--tokens", "{tmp}/bad_tokens.npy"], "--tokens need [batch, seq, d] activations"),
        ("npy3", ["--mask", "m", "--lengths", "n"], "give --mask or --lengths, not both"),
        ("saelens", ["--tensor", "model.layers.7"], "no Array2D column 'model.layers.7'"),
    ],
)
def test_bad_inputs_one_line(setup, flags, message, tmp_path, monkeypatch, capsys, request):
    tmp = str(tmp_path)
    np.save(tmp_path / "bad_tokens.npy", np.zeros((2, 4), np.int64))
    src = {
        "rank4": "x.npy",
        "npy3": "x.npy",
        "npy2": "x.npy",
        "pt": "c.pt",
        "pickle": "c.pt",
    }.get(setup)
    if setup in ("rank4", "npy3", "npy2"):
        shape = {"rank4": (2, 3, 4, 5), "npy3": (2, 3, 4), "npy2": (6, 4)}[setup]
        np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    if setup == "pt":
        torch.save(
            {"acts": torch.zeros(2, 3, 4), "ids": torch.zeros(2, 3, dtype=torch.long)}, tmp_path / "c.pt"
        )
    if setup == "pickle":
        torch.save({"acts": torch.zeros(2, 3, 4), "meta": Pickled()}, tmp_path / "c.pt")
    source = str(request.getfixturevalue("saelens_cache")[0]) if setup == "saelens" else f"{tmp}/{src}"
    argv = ["bae", "store", "import", source, "-o", f"{tmp}/out", *(f.format(tmp=tmp) for f in flags)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()
