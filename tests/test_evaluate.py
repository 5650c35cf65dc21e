"""`bae evaluate` on a tiny random Llama: the spliced forward equals an independent forward-hook
computation, an identity autoencoder costs nothing, zero ablation equals a zeroing hook, two torchrun
processes and an interrupted-then-resumed run equal one uninterrupted run, bad input is one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bae_testing.stores import run_bae
from bae_testing.tiny_models import save_tiny_model
from safetensors.torch import load_file

from bae.common.errors import BaeError
from bae.pipeline.evaluate.config import EvaluateConfig
from bae.pipeline.evaluate.run import UnitEvaluator, run_evaluate
from bae.pipeline.features.compare import run_compare
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.run import run_harvest
from bae.pipeline.llm.capture import decoder_blocks
from bae.pipeline.llm.load import load_model
from bae.stores import ActivationStore, split_mask
from bae.trainer import ModelConfig, build_autoencoder
from bae.trainer.provenance import Provenance

WORDS = ["alpha", "beta", "gamma", "delta", "the", "quick", "fox", "jumps", "over", "lazy", "dog", "bits"]
CONTEXT = 24
VAL = 0.5
FAST = {"unit_tokens": 96, "batch_tokens": 64, "bootstrap": 50}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    lm = save_tiny_model("llama", root / "lm")
    rng = np.random.default_rng(0)
    corpus = root / "docs.jsonl"
    with corpus.open("w") as f:
        for _ in range(30):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(4, 30))))}) + "\n")
    harvest = HarvestConfig(
        out=str(root / "store"),
        model=str(lm),
        corpus=[str(corpus)],
        mode="document",
        context_length=CONTEXT,
        layers=[1, 2],
        bos="always",
        store_dtype="float32",
    )
    store = run_harvest(harvest, show_progress=False).store
    x = store.read_layer(2, 0, store.n_rows)
    checkpoints = {
        "bae": save(root / "bae", store, 2, ModelConfig(d_model=32, expansion=2)),
        "topk": save(root / "topk", store, 1, ModelConfig(architecture="topk_sae", d_model=32, topk=8)),
        # standardized, with a typical radius that leaves the largest rows out of the FVU
        "relu": save(
            root / "relu",
            store,
            2,
            ModelConfig(
                architecture="relu_sae", d_model=32, expansion=2, standardize=True, typical_radius=40.0
            ),
            (torch.from_numpy(x.mean(0)), torch.from_numpy(x.std(0))),
        ),
    }
    identity = torch.eye(32)
    weights = {
        "encoder.weight": torch.cat([identity, -identity]),
        "encoder.bias": torch.zeros(64),
        "decoder.weight": torch.cat([identity, -identity], dim=1),
        "decoder.bias": torch.zeros(32),
    }
    model = build_autoencoder(
        ModelConfig(architecture="relu_sae", d_model=32, expansion=2), provenance(store, 2)
    )
    model.load_state_dict(weights)
    checkpoints["identity"] = model.save_pretrained(root / "identity")
    return {"root": root, "lm": lm, "corpus": corpus, "store": store, "ckpt": checkpoints}


def provenance(store: ActivationStore, layer: int, **kw) -> Provenance:
    values = {
        "store": store.url,
        "model": store.meta["model"],
        "layer": layer,
        "d_model": store.d_model,
        "val_fraction": VAL,
        "corpus_fingerprint": store.meta["corpus_fingerprint"],
        **kw,
    }
    return Provenance(**values)


def save(path: Path, store: ActivationStore, layer: int, config: ModelConfig, norm=None, **kw) -> Path:
    torch.manual_seed(1)
    model = build_autoencoder(config, provenance(store, layer, **kw))
    if norm is not None:
        model.set_normalization(*norm)
    return model.save_pretrained(path)


def evaluate(env: dict, names: list[str], out: str, **kw):
    cfg = EvaluateConfig(
        checkpoints=[str(env["ckpt"][n]) for n in names], out=str(env["root"] / out), **{**FAST, **kw}
    )
    return run_evaluate(cfg, show_progress=False, quiet=True)


def recon_from_weights(path: Path, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """decode(encode(h)) straight from the exported weights and config, and the typical-row mask."""
    config = json.loads((path / "config.json").read_text())
    arch, options = config["architecture"], config["model"]
    w = load_file(str(path / "model.safetensors"))
    x = (h - w["input_mean"]) / w["input_std"] if options["standardize"] else h
    pre = F.linear(x, w["encoder.weight"], w["encoder.bias"])
    if arch == "bae":
        code = (pre > 0).float()
    elif arch == "topk_sae":
        values, index = pre.topk(options["topk"], dim=-1)
        code = torch.zeros_like(pre).scatter(-1, index, values.relu())
    else:
        code = pre.relu()
    recon = F.linear(code, w["decoder.weight"], w["decoder.bias"])
    typical = None if options["typical_radius"] is None else x.pow(2).sum(-1) <= options["typical_radius"]
    return (recon * w["input_std"] + w["input_mean"] if options["standardize"] else recon), typical


def reference(env: dict, layer: int, replace) -> dict[str, Any]:
    """CE, KL and JSD of held-out documents, each alone through the HF model, with a forward pre-hook
    on block ``layer`` that hands every row but BOS to ``replace``; and the FVU sums it reports."""
    loaded = load_model(str(env["lm"]), "float32")
    texts = [json.loads(line)["text"] for line in env["corpus"].read_text().splitlines()]
    held_out = split_mask(np.arange(len(texts)), "val", VAL, 0)
    sums = np.zeros(5)
    xs, recons = [], []
    for doc in np.flatnonzero(held_out):
        ids = [
            loaded.tokenizer.bos_token_id,
            *loaded.tokenizer(texts[doc], add_special_tokens=False)["input_ids"],
        ]
        ids = torch.tensor(ids[:CONTEXT])[None]

        def hook(_module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            xs.append(h[0, 1:].clone())
            h[0, 1:] = replace(h[0, 1:])
            recons.append(h[0, 1:].clone())
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        with torch.no_grad():
            clean = F.log_softmax(loaded.model(ids).logits[0, 1:].float(), -1)
            handle = decoder_blocks(loaded.model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                spliced = F.log_softmax(loaded.model(ids).logits[0, 1:].float(), -1)
            finally:
                handle.remove()
        p, q = clean.exp(), spliced.exp()
        m = ((p + q) / 2).log()
        targets = ids[0, 2:]
        sums += [
            len(clean),
            len(targets),
            float(-spliced[:-1].gather(1, targets[:, None]).sum()),
            float((p * (clean - spliced)).sum()),
            float(0.5 * ((p * (clean - m)).sum() + (q * (spliced - m)).sum())),
        ]
    return {
        "ce": sums[2] / sums[1],
        "kl": sums[3] / sums[0],
        "jsd": sums[4] / sums[0],
        "x": torch.cat(xs),
        "recon": torch.cat(recons),
    }


def test_spliced_forward_equals_a_forward_hook_computation(env):
    result = evaluate(env, ["bae", "relu", "topk"], "ref")
    rows = {r["name"]: r for r in result.rows}
    assert [r["name"] for r in result.rows] == ["zero@1", "mean@1", "topk", "zero@2", "mean@2", "bae", "relu"]
    for name, layer in (("bae", 2), ("relu", 2), ("topk", 1)):
        path = env["ckpt"][name]
        ref = reference(env, layer, lambda h, path=path: recon_from_weights(path, h)[0])
        row = rows[name]
        assert row["ce_spliced"] == pytest.approx(ref["ce"], abs=1e-5)
        assert row["kl"] == pytest.approx(ref["kl"], abs=1e-5)
        assert row["jsd"] == pytest.approx(ref["jsd"], abs=1e-5)
        assert row["kl_low"] <= row["kl"] <= row["kl_high"]
        x = ref["x"].double()
        recon, typical = recon_from_weights(path, ref["x"])
        if typical is not None:  # the FVU leaves the checkpoint's atypical rows out
            assert 0 < int((~typical).sum()) == row["atypical_rows"]
            x, recon = x[typical], recon[typical]
        fvu = float((x - recon.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert row["fvu"] == pytest.approx(fvu, rel=1e-5)
    for layer in (1, 2):
        zero = reference(env, layer, torch.zeros_like)
        assert rows[f"zero@{layer}"]["ce_spliced"] == pytest.approx(zero["ce"], abs=1e-5)
        assert rows[f"zero@{layer}"]["kl"] == pytest.approx(zero["kl"], abs=1e-5)
        clean = reference(env, layer, lambda h: h)["ce"]
        assert rows[f"zero@{layer}"]["ce_clean"] == pytest.approx(clean, abs=1e-5)
        x = env["store"].read_layer(layer, 0, env["store"].n_rows)
        rows_arrays = env["store"].read_rows(0, env["store"].n_rows)
        train = rows_arrays["valid"] & split_mask(rows_arrays["doc_ids"], "train", VAL, 0)
        mean = torch.from_numpy(x[train].mean(0, dtype=np.float64).astype(np.float32))
        assert rows[f"mean@{layer}"]["kl"] == pytest.approx(
            reference(env, layer, lambda h, mean=mean: mean.expand_as(h))["kl"], abs=1e-5
        )
    plot = env["root"] / "ref" / "evaluate.png"
    assert plot.stat().st_size > 1000 and (env["root"] / "ref" / "evaluate.parquet").is_file()


def test_identity_autoencoder_costs_nothing(env):
    rows = {r["name"]: r for r in evaluate(env, ["identity"], "identity").rows}
    row = rows["identity"]
    assert row["kl"] == 0 and row["fvu"] == 0 and row["jsd"] < 1e-7  # JSD: log(exp(log p)) ≠ log p
    assert row["ce_spliced"] == row["ce_clean"] != row["ce_zero"]
    assert row["ce_recovered"] == 1 and row["ce_recovered_vs_mean"] == 1


def test_last_positions_compare_distributions_only(env):
    rows = {r["name"]: r for r in evaluate(env, ["bae"], "last", positions="last").rows}
    texts = env["corpus"].read_text().splitlines()
    assert rows["bae"]["tokens"] == int(split_mask(np.arange(len(texts)), "val", VAL, 0).sum())
    assert rows["bae"]["ce_tokens"] == 0 and rows["bae"]["ce_spliced"] is None and rows["bae"]["kl"] > 0


def test_interrupted_then_resumed_equals_uninterrupted(env, monkeypatch):
    whole = evaluate(env, ["bae", "topk"], "whole")
    original, seen = UnitEvaluator.run, []

    def stop_after_two(self, unit, jobs):
        out = original(self, unit, jobs)
        seen.append(unit)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught: the run stops at the next unit boundary
        return out

    with monkeypatch.context() as patch:
        patch.setattr(UnitEvaluator, "run", stop_after_two)
        first = evaluate(env, ["bae", "topk"], "resumed")
    assert first.interrupted and first.units_computed == 2
    again = evaluate(env, ["bae", "topk"], "resumed")
    assert not again.interrupted and again.units_computed == whole.units_computed - 2
    assert (env["root"] / "resumed" / "evaluate.csv").read_bytes() == (
        env["root"] / "whole" / "evaluate.csv"
    ).read_bytes()
    # a new checkpoint reuses the layer's ablations: only its own job is computed
    calls = []
    monkeypatch.setattr(
        UnitEvaluator, "run", lambda self, unit, jobs: calls.append(jobs) or original(self, unit, jobs)
    )
    evaluate(env, ["bae", "topk", "relu"], "resumed")
    assert calls and all(len(jobs) == 1 and jobs[0].target.name == "relu" for jobs in calls)


def test_torchrun_two_processes_equal_single(env, tmp_path):
    evaluate(env, ["bae", "topk"], "single")
    args = ["--checkpoint", str(env["ckpt"]["bae"]), "--checkpoint", str(env["ckpt"]["topk"])]
    for key, value in FAST.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    cmd += ["-m", "bae.cli", "evaluate", *args, "-o", str(tmp_path / "two"), "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "computed now by rank 0 of 2" in result.stdout
    assert (tmp_path / "two" / "evaluate.csv").read_bytes() == (
        env["root"] / "single" / "evaluate.csv"
    ).read_bytes()


def test_independent_processes_share_the_units(env, tmp_path):
    evaluate(env, ["bae", "topk"], "single")
    args = ["--checkpoint", str(env["ckpt"]["bae"]), "--checkpoint", str(env["ckpt"]["topk"])]
    for key, value in FAST.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    cmd = [
        sys.executable,
        "-m",
        "bae.cli",
        "evaluate",
        *args,
        "-o",
        str(tmp_path / "shared"),
        "--no-progress",
    ]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env_vars) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    computed = [int(re.search(r"units\s+(\d+) of (\d+) computed now", o).group(1)) for o in outs]  # type: ignore[union-attr]
    total = int(re.search(r"units\s+\d+ of (\d+)", outs[0]).group(1))  # type: ignore[union-attr]
    assert sum(computed) == total  # every unit computed once, by one of the two
    single = (env["root"] / "single" / "evaluate.csv").read_bytes()
    assert (tmp_path / "shared" / "evaluate.csv").read_bytes() == single


def test_bad_input_is_one_line(env, tmp_path):
    store = env["store"]
    wide = save(tmp_path / "wide", store, 2, ModelConfig(d_model=16))
    other = save(
        tmp_path / "other", store, 2, ModelConfig(d_model=32), model={"id": "/elsewhere/lm", "revision": None}
    )
    proc = run_bae("evaluate", "--checkpoint", str(wide), "-o", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")
    assert "d_model=16" in proc.stderr
    with pytest.raises(BaeError, match="trained on states of model /elsewhere/lm"):
        run_evaluate(EvaluateConfig(checkpoints=[str(other)], out=str(tmp_path / "out")), False)
    with pytest.raises(BaeError, match="layer 7"):
        run_evaluate(
            EvaluateConfig(checkpoints=[str(env["ckpt"]["bae"])], layer=7, out=str(tmp_path / "o")), False
        )
    with pytest.raises(BaeError, match="no held-out tokens"):
        run_evaluate(
            EvaluateConfig(checkpoints=[str(env["ckpt"]["bae"])], max_tokens=2, out=str(tmp_path / "o")),
            False,
        )


def test_compare_gains_the_evaluate_columns(env, tmp_path):
    names = ["bae", "relu"]
    cfg = FeaturesConfig(
        store=env["store"].url, checkpoints=[str(env["ckpt"][n]) for n in names], out=str(tmp_path / "cmp")
    )
    rows = run_compare(cfg, show_progress=False)
    alone = {
        r["name"]: r
        for r in run_evaluate(
            EvaluateConfig(checkpoints=cfg.checkpoints, out=str(tmp_path / "e")), False, True
        ).rows
    }
    for row, name in zip(rows, names):
        assert row["spliced_ce"] == alone[name]["ce_spliced"] and row["kl"] == alone[name]["kl"]
        assert row["ce_recovered"] == alone[name]["ce_recovered"]
    assert "spliced_ce,ce_recovered,kl" in (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[0]
