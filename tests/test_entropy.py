"""`bae entropy`: exact entropies on constructed stores, counts vs numpy from the saved weights, a
2-process dask cluster, kill-and-resume, bad input, and the ICL workflow harvest -> train -> entropy."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from bae_testing.entropy import LAYER, exact_entropy, make_known_store, save_bae
from bae_testing.stores import run_bae
from safetensors.numpy import load_file

from bae.common.configs import build_config
from bae.common.errors import BaeError
from bae.pipeline.entropy.counts import ConstantKey, CountSpec, DocumentKey, RowKey, count_groups
from bae.pipeline.entropy.run import EntropyConfig, run_entropy
from bae.pipeline.entropy.trainings import combined_verdict
from bae.pipeline.entropy.verdict import VerdictRules
from bae.stores import RowFilter


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    store, data = make_known_store(root / "store.zarr")
    return store, data, save_bae(root / "bae")


def entropy(known, out: Path, **kw):
    store, _, ckpt = known
    kw.setdefault("null_groups", 0)
    config = EntropyConfig(store=store.url, checkpoints=[str(ckpt)], out=str(out), **kw)
    return run_entropy(config, show_progress=False).table.to_pydict()


def test_entropy_per_position_is_exact(known, tmp_path):
    _, data, _ = known
    table = entropy(known, tmp_path / "out", bootstrap=16)
    v = data["valid"]
    expected = exact_entropy(data["bits"][v], data["positions"][v])
    assert table["position"] == sorted(expected)
    np.testing.assert_allclose(table["entropy_bits"], [expected[p] for p in table["position"]], rtol=1e-12)
    assert table["n"] == [40] * 9
    np.testing.assert_allclose(table["ceiling_bits"], np.log2(40))
    assert table["varying_bits"] == [1, 2, 3, 4, 5, 6, 7, 8, 8]  # position t: min(t, 8) fair coins
    assert all(lo <= hi for lo, hi in zip(table["ci_low"], table["ci_high"]))
    for p, joint, h in zip(table["position"], table["joint_plugin_bits"], table["entropy_bits"]):
        codes = data["bits"][v & (data["positions"] == p)] @ (1 << np.arange(8))
        freq = np.unique(codes, return_counts=True)[1] / len(codes)
        assert joint == pytest.approx(-(freq * np.log2(freq)).sum(), rel=1e-12)
        assert joint <= h + 1e-12  # Σ_j H_b(p_j) bounds the joint entropy from above
    out = tmp_path / "out"
    np.testing.assert_equal(pq.read_table(out / "entropy.parquet").to_pydict(), table)  # NaN == NaN
    header = (out / "entropy.csv").read_text().splitlines()[0]
    assert header.startswith('"layer","checkpoint","checkpoint_fvu","trainings","position"')
    assert (out / "entropy.png").stat().st_size > 0
    assert json.loads((out / "entropy_config.json").read_text())["config"]["bootstrap"] == 16


@pytest.mark.parametrize("group_by", ["k", "name", "document", "all"])
def test_other_groupings_are_exact(known, tmp_path, group_by):
    store, data, _ = known
    table = entropy(known, tmp_path / "out", group_by=group_by, positions="3-9")
    v = data["valid"] & (data["positions"] >= 3)
    docs = store.documents()
    groups = {
        "k": docs["k"][data["doc_ids"]],
        "name": np.unique(docs["name"], return_inverse=True)[1][data["doc_ids"]],
        "document": data["doc_ids"],
        "all": np.zeros(len(v), int),
    }[group_by]
    expected = exact_entropy(data["bits"][v], groups[v])
    np.testing.assert_allclose(table["entropy_bits"], list(expected.values()), rtol=1e-12)
    if group_by == "name":
        assert table["name"] == ["d0", "d1", "d2"]


def test_counts_equal_numpy_from_exported_weights(tmp_path):
    store, data = make_known_store(tmp_path / "s.zarr", n_docs=30, doc_len=12, unit_rows=64, seed=3)
    ckpt = save_bae(tmp_path / "random", identity=False, expansion=3, seed=5)
    w = load_file(str(ckpt / "model.safetensors"))
    pre = data["states"] @ w["encoder.weight"].T.astype(np.float64) + w["encoder.bias"]
    assert np.abs(pre).min() > 1e-5  # no bit sits on the threshold, so float32 vs float64 cannot differ
    bits = pre > 0
    valid = data["valid"]
    docs = store.documents()
    keys = {
        "positions": RowKey("positions"),
        "doc_ids": RowKey("doc_ids"),
        "token_ids": RowKey("token_ids"),
        "k": DocumentKey(store.url, "k"),
        "all": ConstantKey(),
    }
    for name, key in keys.items():
        group = {"k": docs["k"][data["doc_ids"]], "all": np.zeros(len(bits), int)}.get(name, data.get(name))
        spec = CountSpec(
            store.url, str(ckpt), LAYER, RowFilter(), key, tuple(range(store.n_units)), batch_rows=7
        )
        counts = count_groups(spec, show_progress=False)
        expected_keys = np.unique(group[valid])
        np.testing.assert_array_equal(counts.keys, expected_keys)
        for i, g in enumerate(expected_keys):
            sel = valid & (group == g)
            assert counts.rows[i] == sel.sum()
            np.testing.assert_array_equal(counts.ones[i], bits[sel].sum(0))
        assert counts.ones.dtype == np.int64


def test_local_cluster_equals_threads(known, tmp_path):
    from distributed import LocalCluster

    local = entropy(known, tmp_path / "threads", bootstrap=8, group_by="k")
    # distributed leaves dashboard_address unannotated (pyright infers str from ":8787"; None turns the
    # dashboard off), and `with` yields sync(__aenter__), which pyright reads as a coroutine
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:  # pyright: ignore[reportArgumentType]
        remote = entropy(
            known,
            tmp_path / "cluster",
            bootstrap=8,
            group_by="k",
            scheduler=cluster.scheduler_address,  # pyright: ignore[reportAttributeAccessIssue]
        )
    np.testing.assert_equal(remote, local)  # NaN == NaN
    assert len(list((tmp_path / "cluster" / "partials").glob("*/unit-*.npz.zst"))) == known[0].n_units


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    store, _ = make_known_store(tmp_path / "s.zarr", n_docs=400, doc_len=10, unit_rows=40)
    ckpt = save_bae(tmp_path / "bae")
    args = ["entropy", "--store", store.url, "--checkpoint", str(ckpt), "--batch-rows", "1", "--no-progress"]
    reference = EntropyConfig(store=store.url, checkpoints=[str(ckpt)], out=str(tmp_path / "ref"))
    run_entropy(reference, show_progress=False)
    out = tmp_path / "killed"
    exe = Path(sys.executable).with_name("bae")
    proc = subprocess.Popen(
        [str(exe), *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while len(list(out.glob("partials/*/unit-*.npz.zst"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = {p: p.stat().st_mtime_ns for p in out.glob("partials/*/unit-*.npz.zst")}
    assert 3 <= len(written) < store.n_units and not (out / "entropy.csv").exists()
    run_bae(*args, "--out", str(out), check=True)
    assert (out / "entropy.csv").read_text() == (tmp_path / "ref" / "entropy.csv").read_text()
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # reused, not recomputed


def test_per_position_checkpoints_cover_their_positions(known, tmp_path):
    store, data, _ = known
    early = save_bae(tmp_path / "early", positions=[1, 2, 3, 4])
    late = save_bae(tmp_path / "late", positions=[5, 6, 7, 8, 9])
    config = EntropyConfig(
        store=store.url, checkpoints=[str(early), str(late)], out=str(tmp_path / "o"), null_groups=0
    )
    table = run_entropy(config, show_progress=False).table.to_pydict()
    assert table["position"] == list(range(1, 10))
    assert table["checkpoint"] == [str(early)] * 4 + [str(late)] * 5
    v = data["valid"]
    expected = exact_entropy(data["bits"][v], data["positions"][v])
    np.testing.assert_allclose(table["entropy_bits"], [expected[p] for p in range(1, 10)], rtol=1e-12)
    nulls = config.model_copy(update={"out": str(tmp_path / "n"), "null_groups": 1})
    summary = run_entropy(nulls, show_progress=False).summary
    assert "of its own position(s) 1-4 only" in summary["layer 4 (early) null"]  # not a shuffled null
    overlap = EntropyConfig(store=store.url, checkpoints=[str(early), str(known[2])], out=str(tmp_path / "x"))
    with pytest.raises(BaeError, match="both cover layer 4"):
        run_entropy(overlap, show_progress=False)


def test_trainings_of_one_model_are_read_together(known, tmp_path):
    """Two checkpoints of one layer and positions are two trainings: each keeps its rows, and one
    more row per group holds their mean, the hull of their intervals and their spread."""
    store, data, ckpt = known
    other = save_bae(tmp_path / "seed5", identity=False, seed=5)
    w = load_file(str(other / "model.safetensors"))
    pre = data["states"] @ w["encoder.weight"].T.astype(np.float64) + w["encoder.bias"]
    assert np.abs(pre).min() > 1e-5  # float32 and float64 agree on every bit
    config = EntropyConfig(
        store=store.url, checkpoints=[str(ckpt), str(other)], out=str(tmp_path / "o"), bootstrap=8
    )
    result = run_entropy(config, show_progress=False)
    table = result.table.to_pydict()
    rows = {k: np.array(table["trainings"]) == k for k in (1, 2)}
    assert rows[1].sum() == 2 * rows[2].sum() and table["trainings"][-1] == 2
    combined = {name: np.array(col, dtype=object)[rows[2]] for name, col in table.items()}
    single = {name: np.array(col, dtype=object)[rows[1]].reshape(2, -1) for name, col in table.items()}
    assert combined["checkpoint"][0] == f"{ckpt};{other}"
    real = np.array([g is None for g in combined["null_group"]])
    v = data["valid"]
    for bits, row in ((data["bits"], 0), (pre > 0, 1)):
        exact = exact_entropy(bits[v], data["positions"][v])
        positions = list(single["position"][row][real])
        np.testing.assert_allclose(
            list(single["entropy_bits"][row][real]), [exact[p] for p in positions], rtol=1e-12
        )
    f = lambda name: single[name].astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(combined["entropy_bits"].astype(float), f("entropy_bits").mean(0), rtol=1e-12)
    np.testing.assert_allclose(combined["entropy_spread_bits"].astype(float), np.ptp(f("entropy_bits"), 0))
    np.testing.assert_allclose(
        combined["plugin_spread_bits"].astype(float), np.ptp(f("joint_plugin_bits"), 0)
    )
    np.testing.assert_allclose(combined["ci_low"].astype(float), f("ci_low").min(0))
    np.testing.assert_allclose(combined["ci_high"].astype(float), f("ci_high").max(0))
    np.testing.assert_allclose(
        combined["joint_plugin_ci_high"].astype(float), f("joint_plugin_ci_high").max(0)
    )
    for g, verdicts in enumerate(single["verdict"].T):
        if len(set(verdicts)) == 1 and verdicts[0] != "resolved":
            assert combined["verdict"][g] == verdicts[0]
    assert "2 trainings" in " ".join(result.summary) and "hull" in " ".join(map(str, result.summary.values()))
    assert (tmp_path / "o" / "entropy.png").stat().st_size > 0
    wider = save_bae(tmp_path / "wider", expansion=2)  # another model, not a training of this one
    config = EntropyConfig(store=store.url, checkpoints=[str(ckpt), str(wider)], out=str(tmp_path / "w"))
    with pytest.raises(BaeError, match="models differ \\(expansion 1 vs 2\\)"):
        run_entropy(config, show_progress=False)


def test_the_verdict_of_several_trainings_is_the_weakest_they_support_together():
    rules = VerdictRules()
    assert combined_verdict(["resolved", "resolved"], 3.0, 3.8, rules) == "resolved"
    assert combined_verdict(["resolved", "resolved"], 3.0, 4.2, rules) == "unstable"  # apart
    assert combined_verdict(["resolved", "lower_bound"], 3.0, 3.2, rules) == "lower_bound"
    assert combined_verdict(["resolved", "collapsed"], 0.0, 0.1, rules) == "unstable"
    assert combined_verdict(["lower_bound", "atypical"], np.nan, np.nan, rules) == "atypical"
    assert combined_verdict(["collapsed", "collapsed"], np.nan, np.nan, rules) == "collapsed"


def test_bad_input_is_one_clear_line(known, tmp_path):
    store, _, ckpt = known
    other_layer = save_bae(tmp_path / "l9", layer=9)
    other_d = save_bae(tmp_path / "d16", d=16)
    proc = run_bae(
        "entropy", "--store", store.url, "--checkpoint", str(other_layer), "--out", str(tmp_path / "o")
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: checkpoint ") and "trained on layer 9, but store" in lines[0]
    cases = [
        ({"checkpoints": [str(other_d)]}, "d_model=16 states, but store"),
        ({"group_by": "colour"}, "unknown grouping 'colour': expected position, document, token, all, or a"),
    ]
    for change, message in cases:
        fields = {"store": store.url, "checkpoints": [str(ckpt)], "out": str(tmp_path / "x"), **change}
        config = EntropyConfig(**fields)
        with pytest.raises(BaeError, match=message):
            run_entropy(config, show_progress=False)
    with pytest.raises(BaeError, match=r"empty group: no rows at position\(s\) 10, 11, 12 in layer 4"):
        entropy(known, tmp_path / "late", positions="5-12")
    with pytest.raises(BaeError, match="empty selection: no rows"):
        entropy(known, tmp_path / "bos", positions="0")
    entropy(known, tmp_path / "again")
    with pytest.raises(BaeError, match="different config"):
        entropy(known, tmp_path / "again", positions="1-3")
    with pytest.raises(BaeError, match="positions '1-x'"):
        build_config(EntropyConfig, {"positions": "1-x"}, "options")


def test_icl_workflow_harvest_train_entropy_by_k(tmp_path):
    from bae_testing.tiny_models import save_tiny_model

    model = save_tiny_model("gpt2", tmp_path / "lm")
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "fox", "dog", "cat"]
    with (tmp_path / "prompts.jsonl").open("w") as f:
        for i in range(60):
            k = i % 4
            demos = "".join(f"{rng.choice(words)} -> {rng.choice(words)}\n" for _ in range(k))
            f.write(json.dumps({"text": f"{demos}{rng.choice(words)} ->", "k": k}) + "\n")
    store, run = tmp_path / "icl.zarr", tmp_path / "bae"
    harvest = f"harvest -o {store} -m {model} --corpus {tmp_path / 'prompts.jsonl'} --mode document"
    harvest += " --positions last --layers 2 --context-length 64 --no-progress"
    run_bae(*harvest.split(), check=True)
    train = f"train --store {store} --layer 2 --out {run} --steps 20 --batch-size 16 --expansion 1"
    run_bae(*train.split(), "--val-every", "10", "--checkpoint-every", "10", check=True)
    entropy_cmd = f"entropy --store {store} --checkpoint {run} --group-by k --out {tmp_path / 'ent'}"
    proc = run_bae(*entropy_cmd.split(), "--no-progress", check=True)
    assert "bae entropy" in proc.stdout and "4 k groups" in proc.stdout
    # 60 rows hold one disjoint null group of ~15 + 4√15 rows, not the 8 asked for: the summary says so
    assert "1 of the 8 requested fit" in proc.stdout, proc.stdout
    full = pq.read_table(tmp_path / "ent" / "entropy.parquet").to_pydict()
    real = [i for i, g in enumerate(full["null_group"]) if g is None]
    table = {k: [v[i] for i in real] for k, v in full.items()}
    assert table["k"] == [0, 1, 2, 3] and table["n"] == [15, 15, 15, 15]
    assert table["code_bits"] == [32] * 4
    assert all(0 <= h <= 32 for h in table["entropy_bits"])
    # 15 rows per k: whole codes of 32 bits are (nearly) all distinct, so no group is resolved
    assert all(v in ("lower_bound", "collapsed") for v in table["verdict"]), table["verdict"]
    assert all(j <= np.log2(15) + 1e-9 for j in table["joint_plugin_bits"])
    nulls = [i for i, g in enumerate(full["null_group"]) if g is not None]
    assert nulls and all(full["n"][i] == 15 for i in nulls)  # random groups of the same n
    assert (tmp_path / "ent" / "entropy.png").stat().st_size > 0
