"""`bae harvest --hook`: module outputs and inputs, and TransformerLens names, equal independent
computations on the tiny llama; sites are recorded, addressable by name downstream, and refused
clearly where they cannot be used."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as T
from bae_testing.tiny_models import save_tiny_model

from bae.common.errors import BaeError
from bae.pipeline.entropy.run import EntropyConfig, run_entropy
from bae.pipeline.evaluate.config import EvaluateConfig
from bae.pipeline.evaluate.run import run_evaluate
from bae.pipeline.evaluate.splice import SiteSplice, clean_forward, resume_site
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.run import run_harvest
from bae.pipeline.llm.capture import LayerCapture
from bae.pipeline.llm.load import load_model
from bae.pipeline.llm.sites import resolve_sites, site_block
from bae.stores import ActivationStore
from bae.stores.info import store_summary
from bae.stores.sites import resolve_layer, store_sites
from bae.trainer.config import TrainConfig
from bae.trainer.run import train

SENTENCES = [
    "the lazy dog sleeps",
    "binary codes of hidden states",
    "a quick brown fox jumps over the lazy dog again and again",
    "autoencoders turn states into bits",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(SENTENCES, size=int(rng.integers(1, 4)))) for _ in range(24)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def harvest(out: Path, llama: Path, corpus: Path, **kw) -> ActivationStore:
    """A float32 document-mode harvest: one window per document, all in one padded batch."""
    cfg = HarvestConfig(
        out=str(out),
        model=str(llama),
        corpus=[str(corpus)],
        mode="document",
        context_length=64,
        store_dtype="float32",
        **kw,
    )
    result = run_harvest(cfg, show_progress=False)
    assert not result.interrupted
    return result.store


def documents(store: ActivationStore) -> list[np.ndarray]:
    """Each document's rows, from the store's own token ids (document mode, every position kept)."""
    rows = store.read_rows(0, store.n_rows)
    used = rows["doc_ids"] >= 0
    starts = np.flatnonzero(used & (rows["positions"] == 0))
    return [np.arange(s, s + int((rows["doc_ids"][used] == rows["doc_ids"][s]).sum())) for s in starts]


def torch_hook_rows(llama: Path, store: ActivationStore, module: str, side: str) -> np.ndarray:
    """Independent: each document alone through the HF model with a plain torch hook on ``module``."""
    model = T.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    got: list[Any] = []
    target = model.get_submodule(module)
    if side == "input":
        handle = target.register_forward_pre_hook(
            lambda _m, args, kwargs: got.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    else:
        handle = target.register_forward_hook(
            lambda _m, _a, out: got.append(out[0] if isinstance(out, tuple) else out)
        )
    token_ids = store.read_rows(0, store.n_rows)["token_ids"]
    expected = np.zeros((store.n_rows, store.d_model), np.float32)
    with torch.no_grad():
        for rows in documents(store):
            got.clear()
            model(torch.from_numpy(token_ids[rows].astype(np.int64))[None])
            expected[rows] = got[0][0].numpy()
    handle.remove()
    return expected


def test_module_output_and_input_equal_torch_hooks(llama, corpus, tmp_path):
    hooks = ["model.layers.1.mlp", "model.layers.1.mlp:input", "model.layers.2.self_attn:input"]
    store = harvest(tmp_path / "s", llama, corpus, hooks=hooks)
    sites = store_sites(store)
    assert store.layers == [4, 5, 6] == sorted(sites)  # keys past hidden_states 0..3
    for hook in hooks:
        key = resolve_layer(store, hook)
        module, _, side = hook.partition(":")
        expected = torch_hook_rows(llama, store, module, side or "output")
        np.testing.assert_allclose(store.read_layer(key, 0, store.n_rows), expected, rtol=0, atol=2e-5)
        assert sites[key]["module"] == module and sites[key]["io"] == (side or "output")


def test_transformer_lens_names(llama, corpus, tmp_path):
    tl = [f"blocks.{b}.hook_{h}" for b in (1, 2) for h in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    store = harvest(tmp_path / "tl", llama, corpus, hooks=tl)
    plain = harvest(tmp_path / "plain", llama, corpus, layers=[1, 2, 3])
    n = store.n_rows
    site = {name: store.read_layer(resolve_layer(store, name), 0, n) for name in tl}
    # resid_pre L is hidden_states[L] row for row; resid_post L is hidden_states[L + 1] below the last block
    np.testing.assert_array_equal(site["blocks.1.hook_resid_pre"], plain.read_layer(1, 0, n))
    np.testing.assert_array_equal(site["blocks.2.hook_resid_pre"], plain.read_layer(2, 0, n))
    np.testing.assert_array_equal(site["blocks.1.hook_resid_post"], plain.read_layer(2, 0, n))
    # each block adds attn_out and mlp_out to its stream: resid_post = resid_pre + attn_out + mlp_out
    for b in (1, 2):
        total = sum(site[f"blocks.{b}.hook_{h}"] for h in ("resid_pre", "attn_out", "mlp_out"))
        np.testing.assert_allclose(site[f"blocks.{b}.hook_resid_post"], total, rtol=0, atol=1e-5)
    # the last block's resid_post is before the final norm: normed, it is HF's last hidden_states entry
    model = T.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    with torch.no_grad():
        normed = model.model.norm(torch.from_numpy(site["blocks.2.hook_resid_post"])).numpy()
        mlp = (
            model.model.layers[1]
            .mlp(
                model.model.layers[1].post_attention_layernorm(
                    torch.from_numpy(site["blocks.1.hook_resid_pre"] + site["blocks.1.hook_attn_out"])
                )
            )
            .numpy()
        )
    valid = plain.read_rows(0, n)["doc_ids"] >= 0
    np.testing.assert_allclose(normed[valid], plain.read_layer(3, 0, n)[valid], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mlp[valid], site["blocks.1.hook_mlp_out"][valid], rtol=0, atol=1e-5)
    records = store_sites(store)
    assert {r["name"] for r in records.values()} == set(tl)
    pre = records[resolve_layer(store, "blocks.1.hook_resid_pre")]
    assert (pre["module"], pre["io"], pre["tl"], pre["hidden_state"]) == (
        "model.layers.1",
        "input",
        "blocks.1.hook_resid_pre",
        1,
    )
    assert records[resolve_layer(store, "blocks.2.hook_resid_post")]["hidden_state"] is None
    assert records[resolve_layer(store, "blocks.1.hook_attn_out")]["tuple_output"] is True
    info = store_summary(store)["hook sites"]
    assert "blocks.1.hook_attn_out (model.layers.1.self_attn:output, first tensor" in info


def test_capture_stops_after_the_last_site(llama):
    loaded = load_model(str(llama), "float32")
    ran: list[int] = []
    handles = [
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
        for i, block in enumerate(loaded.model.model.layers)
    ]
    sites = resolve_sites(loaded.model, ["model.layers.1.self_attn"])
    with LayerCapture(loaded.model, [], sites) as capture:
        got = capture.run(torch.randint(3, 300, (2, 9)))
    for handle in handles:
        handle.remove()
    assert ran == [0] and got[sites[0].layer].shape == (2, 9, loaded.d_model)


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("model.layers.1.mlpp", "has no module 'model.layers.1.mlpp'; close matches: model.layers.1.mlp"),
        (
            "blocks.1.hook_resid_mid",
            "unknown hook 'blocks.1.hook_resid_mid'; accepted: blocks.L.hook_resid_pre",
        ),
        ("blocks.7.hook_mlp_out", "this model has blocks 0..2"),
        ("model.layers.1.mlp:inputs", "':inputs' is neither :output nor :input"),
        ("model.layers.1.mlp.up_proj", "[1, 2, 64] for a [1, 2] input, but a store holds [batch, seq, 32]"),
        ("lm_head", "does not run in the base model's forward"),
    ],
)
def test_bad_hooks_are_one_line_errors(llama, corpus, tmp_path, hook, message):
    with pytest.raises(BaeError, match=r"^[^\n]*$") as err:
        harvest(tmp_path / "bad", llama, corpus, hooks=[hook])
    assert message in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_resume_with_another_hook_is_refused(llama, corpus, tmp_path):
    out = tmp_path / "s"
    harvest(out, llama, corpus, hooks=["model.layers.0.mlp", "blocks.1.hook_resid_post"], layers=[1])
    again = harvest(out, llama, corpus, hooks=["model.layers.0.mlp,blocks.1.hook_resid_post"], layers=[1])
    assert again.done_mask().all()
    with pytest.raises(BaeError, match=r"^[^\n]*config\.hooks: [^\n]*re-run with the same config") as err:
        harvest(out, llama, corpus, hooks=["model.layers.0.self_attn"], layers=[1])
    assert "layout.layers: [1, 4, 5] -> [1, 4]" in str(err.value)


def test_train_entropy_evaluate_on_a_hook_store(llama, corpus, tmp_path):
    hooks = ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_pre", "model.layers.0"]
    store = harvest(tmp_path / "s", llama, corpus, hooks=hooks, layers=[1])
    runs = {"mlp": tmp_path / "mlp", "layer": tmp_path / "layer"}
    for name, layer in (("mlp", "model.layers.1.mlp"), ("layer", "1")):
        cfg = TrainConfig(store=store.url, layer=layer, out=str(runs[name]), steps=30, batch_size=64)
        train(cfg, show_progress=False)
    config = json.loads((runs["mlp"] / "model" / "config.json").read_text())
    assert config["source"]["layer"] == resolve_layer(store, "blocks.1.hook_mlp_out") == 4
    result = run_entropy(
        EntropyConfig(store=store.url, checkpoints=[str(runs["mlp"])], out=str(tmp_path / "e"))
    )
    assert result is not None and (tmp_path / "e" / "entropy.csv").exists()
    with pytest.raises(
        BaeError, match=re.escape("no layer or hook site 'model.layers.2.mlp'; it holds 1, 4 ")
    ):
        train(TrainConfig(store=store.url, layer="model.layers.2.mlp", out=str(tmp_path / "x")), False)

    def evaluate(name: str, layer: str | None = None) -> dict:
        cfg = EvaluateConfig(
            store=store.url, checkpoints=[str(runs[name])], out=str(tmp_path / f"ev-{layer}")
        )
        rows = run_evaluate(cfg.model_copy(update={"layer": layer}), show_progress=False, quiet=True).rows
        return {row["kind"]: row for row in rows}

    # the layer-1 checkpoint spliced at the site blocks.1.hook_resid_pre (its block's input hooked)
    # gives exactly what splicing hidden_states[1] gives
    at_layer, at_site = evaluate("layer"), evaluate("layer", "blocks.1.hook_resid_pre")
    for kind, row in at_layer.items():
        for key in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl"):
            assert at_site[kind][key] == row[key], (kind, key)
    mlp = evaluate("mlp")  # spliced at model.layers.1.mlp's output: every variant changes the output
    assert mlp["bae"]["ce_zero"] != mlp["bae"]["ce_clean"] and mlp["bae"]["kl"] > 0
    assert mlp["zero ablation"]["kl"] > 0 and mlp["bae"]["ce_clean"] == at_layer["bae"]["ce_clean"]


def test_resume_site_equals_an_independent_hooked_forward(llama):
    """Splicing a value into model.layers.1.mlp's output equals a plain HF forward whose torch hook
    returns that value; splicing the clean value reproduces the clean states bit for bit."""
    loaded = load_model(str(llama), "float32")
    model = loaded.model
    (site,) = resolve_sites(model, ["model.layers.1.mlp"])
    at = SiteSplice(site, site_block(model, site))
    ids = torch.randint(3, 300, (2, 10))
    clean = clean_forward(model, ids, None, at.block, [site])
    assert at.block == 1 and torch.equal(resume_site(model, clean, at, clean.state(site.layer)), clean.final)
    value = clean.state(site.layer).clone()
    value[:, 4:] = 0.0
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *_: value)
    with torch.no_grad():
        expected = model.model(ids).last_hidden_state
    handle.remove()
    torch.testing.assert_close(resume_site(model, clean, at, value), expected, rtol=0, atol=1e-6)
    (outside,) = resolve_sites(model, ["model.norm"])
    with pytest.raises(BaeError, match=re.escape("model.norm:output is not inside a decoder block")):
        site_block(model, outside)


def test_torchrun_two_processes_equal_single(llama, corpus, tmp_path):
    """The CLI's --hook (comma-separated and repeated) in a 2-process torchrun harvest: the store
    holds what one process writes (up to float rounding: another thread count)."""
    hooks = ["model.layers.1.mlp", "blocks.0.hook_attn_out", "blocks.2.hook_resid_post"]
    single = harvest(tmp_path / "single", llama, corpus, hooks=hooks, unit_rows=64)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    cmd += ["-m", "bae.cli", "harvest", "-m", str(llama), "--corpus", str(corpus), "-o", str(out)]
    cmd += ["--mode", "document", "--context-length", "64", "--store-dtype", "float32", "--unit-rows", "64"]
    cmd += ["--hook", ",".join(hooks[:2]), "--hook", hooks[2], "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sites           4 = model.layers.1.mlp:output; 5 = blocks.0.hook_attn_out" in result.stdout
    two = ActivationStore.open(out)
    assert single.n_units > 1 and two.done_mask().all() and two.meta["sites"] == single.meta["sites"]
    for name, values in single.read_rows(0, single.n_rows).items():
        np.testing.assert_array_equal(two.read_rows(0, two.n_rows)[name], values, err_msg=name)
    for layer in single.layers:
        np.testing.assert_allclose(
            two.read_layer(layer, 0, two.n_rows),
            single.read_layer(layer, 0, single.n_rows),
            rtol=0,
            atol=1e-6,
        )
