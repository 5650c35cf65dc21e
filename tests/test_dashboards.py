"""Dashboards out: BAE context margins, the scalable report, and `bae export dashboard` loaded by
SAEDashboard's own Neuronpedia batch classes (installed with `pip install --no-deps sae-dashboard`)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from bae_testing.features import make_text_store, save_autoencoder
from bae_testing.stores import run_bae
from bae_testing.tiny_models import save_tiny_model

from bae.common.errors import BaeError
from bae.interop.dashboard import export_dashboard, token_values
from bae.interop.dashboard_config import DashboardExportConfig
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.contexts import BAE_MARGIN, run_contexts
from bae.pipeline.features.report import write_report
from bae.stores import ActivationStore
from bae.trainer import load_autoencoder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboards")
    llm = save_tiny_model("llama", tmp / "llm")  # the store's model: tokenizer and unembedding
    _, data = make_text_store(tmp / "store.zarr", llm, d=32)
    out = {}
    for arch in ("bae", "relu_sae"):
        ck = save_autoencoder(tmp / arch, arch, d=32, expansion=2)
        config = FeaturesConfig(
            store=str(tmp / "store.zarr"), checkpoint=str(ck), out=str(tmp / f"f-{arch}"), top_k=6
        )
        out[arch] = (ck, run_contexts(config, False, quiet=True))
    return tmp, data, out


def _pre(checkpoint, x: np.ndarray) -> np.ndarray:
    """Encoder pre-activations straight from the saved weights (the test models do not standardize)."""
    model = load_autoencoder(checkpoint)
    return (
        x.astype(np.float64) @ model.encoder.weight.detach().double().numpy().T
        + model.encoder.bias.detach().numpy()
    )


def test_bae_contexts_are_ranked_by_their_margin(env):
    _, data, out = env
    ck, result = out["bae"]
    assert result["score"] == BAE_MARGIN
    rows = np.flatnonzero(data["valid"])
    pre = _pre(ck, data["states"][rows])
    freq = (pre > 0).mean(0)
    margin = pre * np.where(freq <= 0.5, 1, -1)
    distinct = 0
    for j, record in enumerate(result["features"]):
        scores = [c["score"] for c in record["contexts"]]
        if not 0 < freq[j] < 1:
            assert scores == []  # constant bits have no scoring state
            continue
        expected = np.sort(margin[:, j])[::-1][: len(scores)]
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
        assert scores == sorted(scores, reverse=True)
        rarer = 1 if freq[j] <= 0.5 else 0
        assert all((c["bit"] == rarer) == (c["score"] > 0) for c in record["contexts"])
        distinct += len(set(np.round(scores, 6))) == len(scores)
    assert distinct > 0.9 * len(result["features"])  # one score for all contexts no more


def test_a_contexts_json_with_the_older_bae_score_is_recomputed(env, tmp_path):
    tmp, _, out = env
    ck, result = out["bae"]
    old = json.loads((tmp / "f-bae" / "contexts.json").read_text())
    old["score"] = "|h1 - p̄|"
    for record in old["features"]:
        for context in record["contexts"]:
            context["score"] = 1.0
    (tmp_path / "contexts.json").write_text(json.dumps(old))
    config = FeaturesConfig(store=str(tmp / "store.zarr"), checkpoint=str(ck), out=str(tmp_path), top_k=6)
    again = run_contexts(config, False, quiet=True)
    assert again["score"] == BAE_MARGIN and again["features"] == result["features"]


def _synthetic(n: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    context = {"before": "a <b> & ", "token": "tok", "after": " c", "doc": 1, "position": 2, "bit": 1}
    features = [
        {
            "feature": j,
            "frequency": float(f),
            "oriented_frequency": float(min(f, 1 - f)),
            "assigned": int(rng.integers(0, 100)),
            "contexts": [{**context, "score": float(s)} for s in np.sort(rng.random(3))[::-1]],
        }
        for j, f in enumerate(rng.random(n))
    ]
    data = {
        "architecture": "bae",
        "score": BAE_MARGIN,
        "decoded": True,
        "summary": {"features": n},
        "features": features,
    }
    verdicts = [
        {"feature": j, "explanation": f"expl {j}", "score": 0.5, "interpretable": False}
        for j in range(0, n, 7)
    ]
    interpretation = {"summary": {"interpretable": 0, "interpreted": len(verdicts)}, "features": verdicts}
    return data, interpretation


def test_report_reaches_every_feature_and_sorts_by_score(tmp_path):
    data, interpretation = _synthetic(2304)
    write_report(tmp_path, data, interpretation)
    index = (tmp_path / "report.html").read_text()
    links = re.findall(r'<a href="report/f(\d+)\.html">', index)
    assert sorted(map(int, links)) == list(range(2304))
    pages = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert pages == sorted(f"f{j}.html" for j in range(2304))
    page = (tmp_path / "report" / "f2303.html").read_text()
    scores = [f"{c['score']:.4g}" for c in data["features"][2303]["contexts"]]
    assert re.findall(r'<span class="score">([^<]+)</span>', page) == scores
    assert "&lt;b&gt; &amp; <mark>tok</mark>" in page and "<b>" not in page
    assert 'href="f2302.html"' in page and "f2304" not in page
    for key in ('data-k="i"', 'data-k="f"', 'data-k="o"', 'data-k="s"', 'id="q"'):
        assert key in index
    assert index.count('data-s="0.5"') == len(interpretation["features"])
    # re-written with fewer features: no stale pages left
    data["features"] = data["features"][:10]
    write_report(tmp_path, data, None)
    assert (
        len(list((tmp_path / "report").iterdir())) == 10
        and 'data-k="s"' not in (tmp_path / "report.html").read_text()
    )


def _logit_effects(llm_dir, checkpoint) -> np.ndarray:
    """[features, vocab]: the unembedding of (final RMSNorm weight ⊙ decoder column), from the saved files."""
    from safetensors.numpy import load_file

    weights = load_file(str(llm_dir / "model.safetensors"))
    decoder = load_file(str(checkpoint / "model.safetensors"))["decoder.weight"].astype(np.float64)
    gamma = weights["model.norm.weight"].astype(np.float64)
    return (decoder.T * gamma) @ weights["lm_head.weight"].astype(np.float64).T


def _load_batches(directory):
    from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch

    batches = []
    for path in sorted(directory.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        raw = json.loads(path.read_text())
        batch = NeuronpediaDashboardBatch(**raw)  # SAEDashboard's own class: unknown keys are refused
        assert batch.to_dict() == raw  # and nothing is dropped
        batches.append(batch)
    return batches


@pytest.mark.parametrize("arch", ["bae", "relu_sae"])
def test_export_loads_with_sae_dashboard_and_values_match(env, arch):
    pytest.importorskip("sae_dashboard", reason="pip install --no-deps sae-dashboard (the CI command does)")
    tmp, data, out = env
    ck, result = out[arch]
    dest = tmp / f"dash-{arch}"
    export_dashboard(
        DashboardExportConfig(features=str(tmp / f"f-{arch}"), out=str(dest), batch_features=24), quiet=True
    )
    batches = _load_batches(dest)
    assert len(batches) == 3 and {b.layer for b in batches} == {3} and batches[0].model_id == "llm"
    features = [f for b in batches for f in b.features]
    assert [f.feature_index for f in features] == list(range(64))
    rows = np.flatnonzero(data["valid"])
    pre = _pre(ck, data["states"])
    freq = (pre[rows] > 0).mean(0)
    expected_values = (
        np.maximum(pre * np.where(freq <= 0.5, 1, -1), 0) if arch == "bae" else np.maximum(pre, 0)
    )
    logits = _logit_effects(tmp / "llm", ck)
    for feature, record in zip(features, result["features"]):
        assert feature.frac_nonzero == pytest.approx(record["frequency"])
        top = np.argsort(-logits[feature.feature_index])[:10]
        np.testing.assert_allclose(feature.pos_values, logits[feature.feature_index, top], atol=1e-4)
        bottom = np.argsort(logits[feature.feature_index])[:10]
        np.testing.assert_allclose(feature.neg_values, logits[feature.feature_index, bottom], atol=1e-4)
        assert len(feature.pos_str) == len(feature.neg_str) == 10
        assert (
            len(feature.activations) == len(record["contexts"]) and len(feature.neuron_alignment_indices) == 3
        )
        for activation, context in zip(feature.activations, record["contexts"]):
            at = activation.qualifying_token_index
            assert activation.tokens[at] == context["token"]
            assert "".join(activation.tokens) == context["before"] + context["token"] + context["after"]
            value = activation.values[at]
            assert value == pytest.approx(max(context["score"], 0), abs=1e-4)
            doc = data["doc_ids"][context["row"]]
            window = [
                r
                for r in range(context["row"] - 16, context["row"] + 5)
                if r >= 0 and r < len(data["doc_ids"])
            ]
            window = [
                r for r in window if data["doc_ids"][r] == doc and (data["valid"][r] or r == context["row"])
            ]
            np.testing.assert_allclose(
                activation.values, expected_values[window, feature.feature_index], atol=1e-4
            )


def test_token_values_do_not_depend_on_the_batch(env):
    tmp, data, out = env
    store = ActivationStore.open(str(tmp / "store.zarr"))
    model = load_autoencoder(out["bae"][0])
    rng = np.random.default_rng(0)
    wanted = [
        (int(j), sorted(rng.choice(len(data["doc_ids"]), 9, replace=False).tolist())) for j in range(64)
    ]
    sign = np.where(rng.random(64) < 0.5, 1.0, -1.0)
    whole = token_values(store, 3, model, wanted, sign)
    pre = _pre(out["bae"][0], data["states"])
    for (j, rows), got, small in zip(
        wanted, whole, token_values(store, 3, model, wanted, sign, batch_rows=5)
    ):
        np.testing.assert_allclose(got, np.maximum(sign[j] * pre[rows, j], 0), atol=1e-5)
        # float32 matmuls of other shapes: a margin near 0 keeps the absolute rounding of its O(1) terms
        np.testing.assert_allclose(got, small, rtol=1e-6, atol=1e-6)


def test_export_writes_comsem_explanations(env, tmp_path):
    tmp = env[0]
    src = tmp_path / "with-interpretation"
    src.mkdir()
    (src / "contexts.json").write_text((tmp / "f-bae" / "contexts.json").read_text())
    verdicts = [
        {"feature": 5, "explanation": "capital cities", "score": 0.75, "interpretable": True},
        {"feature": 9, "interpretable": False, "reason": "too few samples"},
    ]
    (src / "interpretation.json").write_text(
        json.dumps({"summary": {"llm": "judge-model"}, "features": verdicts})
    )
    dest = export_dashboard(
        DashboardExportConfig(
            features=str(src), out=str(tmp_path / "dash"), model_id="smollm2", sae_set="res-bae"
        ),
        quiet=True,
    )
    rows = [json.loads(line) for line in (dest / "explanations.jsonl").read_text().splitlines()]
    assert rows == [
        {
            "modelId": "smollm2",
            "layer": "3-res-bae",
            "index": "5",
            "description": "capital cities",
            "typeName": "bae-comsem",
            "explanationModelName": "judge-model",
            "notes": "ComSem score 0.750 (interpretable)",
        }
    ]


def test_bad_inputs_are_one_line_errors(env, tmp_path):
    tmp = env[0]
    proc = run_bae("export", "dashboard", str(tmp_path / "nothing"), "-o", str(tmp_path / "d"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no contexts.json" in proc.stderr
    wrong = save_autoencoder(tmp_path / "other", "bae", d=32, expansion=1)
    config = DashboardExportConfig(
        features=str(tmp / "f-bae"), out=str(tmp_path / "d"), checkpoint=str(wrong)
    )
    with pytest.raises(BaeError, match=r"a bae with 32 features, but .* holds 64 features"):
        export_dashboard(config, quiet=True)
    # an output directory holding other files is never replaced
    with pytest.raises(BaeError, match=r"holds '\w+\.json', not an export"):
        export_dashboard(
            DashboardExportConfig(features=str(tmp / "f-bae"), out=str(tmp / "f-bae")), quiet=True
        )
    assert (tmp / "f-bae" / "contexts.json").is_file()
    # a store whose recorded LLM does not match the checkpoint's width: no logit tables, or --no-logits
    make_text_store(tmp_path / "narrow.zarr", tmp / "llm", d=16)
    ck = save_autoencoder(tmp_path / "narrow", "bae", d=16)
    features = FeaturesConfig(
        store=str(tmp_path / "narrow.zarr"), checkpoint=str(ck), out=str(tmp_path / "f"), top_k=2
    )
    run_contexts(features, False, quiet=True)
    with pytest.raises(BaeError, match=r"hidden size 32, but the checkpoint reads 16 .*--no-logits"):
        export_dashboard(
            DashboardExportConfig(features=str(tmp_path / "f"), out=str(tmp_path / "n")), quiet=True
        )
    config = DashboardExportConfig(features=str(tmp_path / "f"), out=str(tmp_path / "n"), logits=False)
    batch = json.loads((export_dashboard(config, quiet=True) / "batch-0.json").read_text())
    assert all(f["pos_str"] == [] and len(f["activations"]) == 2 for f in batch["features"])
