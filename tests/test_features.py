"""`bae features` frequency, contexts, report and compare on real Zarr stores and saved checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bae_testing.features import LAYER, ChatServer, make_text_store, save_autoencoder, save_tokenizer
from bae_testing.stores import run_bae

from bae.common.errors import BaeError
from bae.pipeline.features.compare import run_compare
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.contexts import KEY_TIES, run_contexts
from bae.pipeline.features.frequency import run_frequency
from bae.pipeline.features.topk import random_keys
from bae.stores import ActivationStore, StoreLayout
from bae.trainer import ModelConfig, build_autoencoder, load_autoencoder
from bae.trainer.provenance import Provenance

ARCHS = ("bae", "relu_sae", "topk_sae")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    tokenizer = save_tokenizer(tmp / "tokenizer")
    _, data = make_text_store(tmp / "store.zarr", tokenizer)
    checkpoints = {a: save_autoencoder(tmp / a, a, topk=6) for a in ARCHS}
    return tmp, data, checkpoints


def _config(tmp, checkpoint, out, **kw) -> FeaturesConfig:
    return FeaturesConfig(store=str(tmp / "store.zarr"), checkpoint=str(checkpoint), out=str(tmp / out), **kw)


def _direct_codes(checkpoint, x: np.ndarray, architecture: str) -> tuple[np.ndarray, np.ndarray]:
    """Bits and codes straight from the saved weights, in numpy."""
    model = load_autoencoder(checkpoint)
    pre = x.astype(np.float64) @ model.encoder.weight.detach().double().numpy().T
    pre += model.encoder.bias.detach().double().numpy()
    if architecture == "bae":
        return pre > 0, (pre > 0).astype(np.float64)
    code = np.maximum(pre, 0)
    if architecture == "topk_sae":
        keep = np.argsort(-pre, axis=1)[:, : model.config.topk]
        mask = np.zeros_like(pre, bool)
        np.put_along_axis(mask, keep, True, axis=1)
        code = np.where(mask, code, 0)
    return code > 0, code


@pytest.mark.parametrize("architecture", ARCHS)
def test_frequencies_fvu_and_l0_equal_numpy(env, architecture):
    tmp, data, checkpoints = env
    result = run_frequency(_config(tmp, checkpoints[architecture], f"freq-{architecture}"), False, quiet=True)
    x = data["states"][data["valid"]]
    bits, code = _direct_codes(checkpoints[architecture], x, architecture)
    np.testing.assert_allclose(result.frequency, bits.mean(0), atol=1e-12)
    assert result.mean_l0 == pytest.approx(bits.sum(1).mean())
    model = load_autoencoder(checkpoints[architecture])
    recon = (
        code @ model.decoder.weight.detach().double().numpy().T + model.decoder.bias.detach().double().numpy()
    )
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert result.fvu == pytest.approx(fvu, rel=1e-5)
    out = tmp / f"freq-{architecture}"
    table = (out / "frequency.csv").read_text().splitlines()
    assert len(table) == 1 + model.n_bits and (out / "frequency_hist.png").stat().st_size > 1000
    recorded = json.loads((out / "frequency.json").read_text())
    assert recorded["config"]["checkpoint"] == str(checkpoints[architecture])


def test_dense_and_dead_counts_on_a_constructed_model(tmp_path):
    n, d = 200, 4
    i = np.arange(n)
    x = -np.ones((n, d), np.float32)
    x[i % 10 < 3, 0] = 1  # 30% of rows
    x[i % 20 == 0, 1] = 1  # 5% of rows
    layout = StoreLayout(n_rows=n, unit_rows=64, d_model=d, layers=[LAYER], dtype="float32")
    store = ActivationStore.create(str(tmp_path / "s.zarr"), layout, attrs={"config": {}})
    for u in range(store.n_units):
        a, b = store.unit_range(u)
        store.write_unit(
            u,
            {LAYER: x[a:b]},
            token_ids=i[a:b],
            doc_ids=i[a:b] // 10,
            positions=i[a:b] % 10,
            valid=np.ones(b - a, bool),
        )
    model = build_autoencoder(ModelConfig(d_model=d, expansion=2), Provenance(layer=LAYER))
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(-1.0)  # bits 4..7 dead
        model.encoder.weight[0, 0] = 2  # bit 0: x0 > 0 -> 0.30
        model.encoder.weight[1, 1] = 2  # bit 1: x1 > 0 -> 0.05
        model.encoder.weight[2, 0] = -2  # bit 2: x0 < 0 -> 0.70
        model.encoder.bias[3] = 1  # bit 3: always on
    model.save_pretrained(tmp_path / "bae")
    config = FeaturesConfig(
        store=str(tmp_path / "s.zarr"), checkpoint=str(tmp_path / "bae"), out=str(tmp_path / "out")
    )
    s = run_frequency(config, False, quiet=True).summary
    expected = {
        "dense>0.1": 3,
        "dense>0.2": 3,
        "dense>0.5": 2,
        "dead": 4,
        "oriented_dense>0.1": 2,
        "oriented_dense>0.2": 2,
        "always_on": 1,
        "constant": 5,
        "features": 8,
        "rows": 200,
    }
    assert {k: s[k] for k in expected} == expected and s["dead_reliable"] is False


def test_top_contexts_equal_a_direct_computation_across_unit_and_batch_merges(env):
    tmp, data, checkpoints = env
    config = _config(tmp, checkpoints["relu_sae"], "ctx-small-batches", batch_rows=16, top_k=7)
    features = run_contexts(config, False, quiet=True)["features"]
    rows = np.flatnonzero(data["valid"])
    _, code = _direct_codes(checkpoints["relu_sae"], data["states"][rows], "relu_sae")
    keys = random_keys(
        torch.from_numpy(rows)[:, None], torch.arange(code.shape[1])[None, :], 0, KEY_TIES
    ).numpy()
    for j, record in enumerate(features):
        live = np.flatnonzero(code[:, j] > 0)
        order = live[np.lexsort((-keys[live, j], -code[live, j]))][:7]
        assert [c["row"] for c in record["contexts"]] == rows[order].tolist()
        np.testing.assert_allclose([c["score"] for c in record["contexts"]], code[order, j], rtol=1e-5)


def test_ties_are_broken_at_random_with_a_seed(tmp_path):
    _, data = make_text_store(tmp_path / "store.zarr", None, constant=True)
    model = build_autoencoder(
        ModelConfig(architecture="relu_sae", d_model=16, expansion=4), Provenance(layer=LAYER)
    )
    with torch.no_grad():  # every feature the same: every (row, feature) score ties
        model.encoder.weight.copy_(model.encoder.weight[:1].expand(64, -1))
        model.encoder.bias.fill_(abs(float(model.encoder.bias[0])) + 5.0)
    model.save_pretrained(tmp_path / "sae")

    def picks(seed):
        config = FeaturesConfig(
            store=str(tmp_path / "store.zarr"),
            checkpoint=str(tmp_path / "sae"),
            out=str(tmp_path / f"out{seed}"),
            seed=seed,
            top_k=5,
        )
        features = run_contexts(config, False, quiet=True)["features"]
        return [[c["row"] for c in f["contexts"]] for f in features], np.array(
            [f["assigned"] for f in features]
        )

    rows_a, assigned_a = picks(0)
    assert (rows_a, assigned_a.tolist()) == tuple(x if isinstance(x, list) else x.tolist() for x in picks(0))
    rows_b, assigned_b = picks(1)
    assert rows_a != rows_b and assigned_a.tolist() != assigned_b.tolist()
    valid_rows = np.flatnonzero(data["valid"])
    chosen = np.concatenate(rows_a)
    # rows: picked from the whole store, not the first ones
    assert abs(np.median(chosen) - np.median(valid_rows)) < 0.15 * len(data["valid"])
    assert len(set(chosen.tolist())) > 0.5 * len(valid_rows)
    # features: every token goes to 10 of 64 equal features; low indices are not favoured
    total = 10 * len(valid_rows)
    assert assigned_a.sum() == total
    assert assigned_a[:32].sum() == pytest.approx(total / 2, rel=0.1)
    assert assigned_a.min() > 0.5 * total / 64 and assigned_a.max() < 1.5 * total / 64


def test_report_html_highlights_the_token_and_escapes_text(env):
    tmp, _, checkpoints = env
    result = run_contexts(_config(tmp, checkpoints["topk_sae"], "ctx-report"), False, quiet=True)
    assert result["decoded"] is True
    record = next(f for f in result["features"] if f["contexts"])
    pages = [
        (tmp / "ctx-report" / "report" / f"f{f['feature']}.html").read_text() for f in result["features"]
    ]
    html = (tmp / "ctx-report" / "report.html").read_text() + "".join(pages)
    top = record["contexts"][0]
    import html as html_lib

    expected = f"{html_lib.escape(top['before'])}<mark>{html_lib.escape(top['token'])}</mark>"
    assert expected in pages[record["feature"]]
    texts = " ".join(c["before"] + c["token"] + c["after"] for f in result["features"] for c in f["contexts"])
    assert "capital" in texts or "Python" in texts or "Moon" in texts  # real words, decoded
    if "<sea" in texts:
        assert "&lt;sea" in html
    assert "<sea" not in html and "<|im_start|>" not in texts  # escaped; BOS rows are not text


def test_imported_store_without_tokenizer_shows_token_ids(tmp_path):
    make_text_store(tmp_path / "store.zarr", None)
    ck = save_autoencoder(tmp_path / "bae", "bae")
    config = FeaturesConfig(store=str(tmp_path / "store.zarr"), checkpoint=str(ck), out=str(tmp_path / "o"))
    result = run_contexts(config, False, quiet=True)
    sample = result["features"][0]["contexts"][0]
    assert result["decoded"] is False and sample["token"] == f"[{sample['token_id']}]"


def test_changed_options_are_refused_and_mismatched_checkpoint_is_an_error(env, tmp_path):
    tmp, _, checkpoints = env
    config = _config(tmp, checkpoints["bae"], "refuse")
    run_frequency(config, False, quiet=True)
    with pytest.raises(BaeError, match=r"dense_thresholds"):
        run_frequency(config.model_copy(update={"dense_thresholds": [0.3]}), False, quiet=True)
    wrong = save_autoencoder(tmp_path / "wide", "bae", d=8)
    with pytest.raises(BaeError, match=r"d_model=8 .* d_model=16"):
        run_frequency(_config(tmp, wrong, "wrong"), False, quiet=True)
    proc = run_bae(
        "features",
        "frequency",
        "--store",
        str(tmp / "store.zarr"),
        "--checkpoint",
        str(wrong),
        "--out",
        str(tmp_path / "cli"),
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "d_model=8" in proc.stderr
    assert not (tmp_path / "cli" / "frequency.json").exists()


def test_compare_bae_relu_topk(env, tmp_path):
    tmp, _, checkpoints = env
    cfg = tmp_path / "features.yaml"
    cfg.write_text(f"store: {tmp / 'store.zarr'}\ninterpret:\n  backoff_s: 0.01\n  min_samples: 8\n")
    with ChatServer() as server:
        args = [
            "features",
            "compare",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "cmp"),
            "--interpret",
            "--base-url",
            server.url,
            "--no-progress",
        ]
        for a in ARCHS:
            args += ["--checkpoint", str(checkpoints[a])]
        proc = run_bae(*args, check=True)
    assert "relu_sae" in proc.stdout and "interpretable" in proc.stdout
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["architecture"] for r in rows] == list(ARCHS)
    for row, a in zip(rows, ARCHS):
        alone = run_frequency(_config(tmp, checkpoints[a], f"freq-{a}"), False, quiet=True)
        assert row["dense>0.1"] == alone.summary["dense>0.1"] and row["dead"] == alone.summary["dead"]
        assert row["fvu"] == pytest.approx(alone.fvu, abs=1e-5)
        assert row["mean_l0"] == pytest.approx(alone.mean_l0, abs=1e-3)
        assert row["interpreted"] > 0 and 0 <= row["interpretable"] <= row["interpreted"]
    assert rows[2]["mean_l0"] <= 6  # TopK keeps at most k active
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "compare.csv").read_text().startswith("name,architecture,features,dense>0.1")


def test_compare_refuses_a_single_checkpoint(env):
    tmp, _, checkpoints = env
    with pytest.raises(BaeError, match="at least two"):
        run_compare(FeaturesConfig(store=str(tmp / "store.zarr"), checkpoints=[str(checkpoints["bae"])]))
