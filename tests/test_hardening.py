"""Failure cases: each reproduces what a failure test found (a traceback, a silent wrong result, a
blocked resume) and checks the one-line error or the recovery that replaced it."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
from bae_testing.entropy import make_known_store, save_bae
from bae_testing.features import make_text_store, save_autoencoder
from bae_testing.stores import assert_stores_identical, make_store, synthetic_rows, write_units
from bae_testing.tiny_models import save_tiny_model

from bae.cli import main
from bae.common.outputs import exclusive_output
from bae.pipeline.harvest.corpus import load_corpus
from bae.stores import ActivationStore, StoreLayout
from bae.trainer import load_autoencoder
from bae.trainer.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BAE = [sys.executable, "-m", "bae.cli"]
TRAIN = ["--layer", "2", "--steps", "40", "--batch-size", "32", "--checkpoint-every", "20", "--no-progress"]


@pytest.fixture
def bae(capsys: pytest.CaptureFixture[str]) -> Any:
    """Run ``bae ARGS`` in this process as the console script does: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        argv, sys.argv = sys.argv, ["bae", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = argv
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_line_error(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    make_store(tmp_path / "s.zarr", n=1200, d=8, layers=(2,), unit_rows=200)
    return tmp_path / "s.zarr"


def partial_store(path: Path, done: list[int]) -> Path:
    layout = StoreLayout(n_rows=1200, unit_rows=200, d_model=8, layers=[2], dtype="float32")
    write_units(
        ActivationStore.create(path, layout, attrs={"config": {}}), synthetic_rows(1200, 8, [2]), done
    )
    return path


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    "command",
    [
        ["train", "-s", "S", "-l", "2"],
        ["entropy", "-s", "S", "-a", "C"],
        ["features", "frequency", "-s", "S", "-a", "C"],
        ["icl-prompts", "sst2"],
        ["entropy", "calibrate", "-s", "S", "-l", "2"],
    ],
)
def test_url_outputs_are_refused_and_nothing_is_written_locally(bae, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(bae(*command, "--out", "s3://bucket/run"), "s3://bucket/run is a URL", "local")
    assert not (tmp_path / "s3:").exists()


def test_an_output_that_is_a_file_is_one_line(bae, store, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    ckpt = save_bae(tmp_path / "bae", d=8, layer=2)
    for args in (
        ["train", "-s", str(store), *TRAIN, "--out", str(afile)],
        ["train", "-s", str(store), *TRAIN, "--out", str(afile / "sub")],
        ["entropy", "-s", str(store), "-a", str(ckpt), "--out", str(afile)],
        ["features", "frequency", "-s", str(store), "-a", str(ckpt), "--out", str(afile)],
        ["store", "import", str(tmp_path / "a.npy"), "--out", str(afile)],
    ):
        np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
        one_line_error(bae(*args), str(afile))
    assert afile.read_text() == "x"


def test_a_second_process_on_one_output_is_refused(bae, store, tmp_path):
    out = tmp_path / "run"
    with exclusive_output(out, "bae train"):
        one_line_error(bae("train", "-s", str(store), *TRAIN, "--out", str(out)), "in use by another")
    code, _, err = bae("train", "-s", str(store), *TRAIN, "--out", str(out))
    assert code == 0, err


def test_a_run_that_fails_before_writing_leaves_no_output(bae, tmp_path):
    """A bad store is one line and leaves no directory behind; an existing output keeps its files."""
    out, missing = tmp_path / "run", str(tmp_path / "missing.zarr")
    one_line_error(bae("train", "-s", missing, *TRAIN, "--out", str(out)), "not found")
    assert not out.exists()
    one_line_error(bae("entropy", "-s", missing, "-a", str(tmp_path), "-o", str(out)))
    assert not out.exists()
    out.mkdir()
    one_line_error(bae("train", "-s", missing, *TRAIN, "--out", str(out)), "not found")
    assert out.is_dir()


# ---------------------------------------------------------------- unfinished stores


def test_an_unfinished_store_needs_allow_partial_and_outputs_record_their_units(bae, tmp_path):
    src = partial_store(tmp_path / "p.zarr", [0, 1, 2, 4])
    run, ent = tmp_path / "run", tmp_path / "ent"
    one_line_error(
        bae("train", "-s", str(src), *TRAIN, "--out", str(run)),
        "4 of 6 units",
        "missing 3,5",
        "--allow-partial",
    )
    assert not run.exists() or not RunFolder.at(run).finished
    code, out, err = bae("train", "-s", str(src), *TRAIN, "--out", str(run), "--allow-partial")
    assert code == 0, err
    assert "units 0-2,4 of 6" in out
    model = load_autoencoder(str(run / "model"))
    assert (model.provenance.units, model.provenance.n_units) == ("0-2,4", 6)

    ckpt = str(run / "model")
    one_line_error(bae("entropy", "-s", str(src), "-a", ckpt, "--out", str(ent)), "unfinished")
    one_line_error(bae("features", "frequency", "-s", str(src), "-a", ckpt, "-o", str(ent)), "unfinished")
    code, _, err = bae("entropy", "-s", str(src), "-a", ckpt, "--out", str(ent), "--allow-partial")
    assert code == 0, err
    assert json.loads((ent / "entropy_config.json").read_text())["units"] == "0-2,4"

    # the store is finished later: a resumed training run keeps reading the units it started on
    write_units(ActivationStore.open(src, mode="r+"), synthetic_rows(1200, 8, [2]), [3, 5])
    more = ["train", "-s", str(src), *TRAIN[:-5], "--checkpoint-every", "20", "--no-progress"]
    more[more.index("--steps") + 1] = "60"
    one_line_error(bae(*more, "--out", str(run)), "different config")  # steps differ: a new budget
    code, _, err = bae("train", "-s", str(src), *TRAIN, "--out", str(run))
    assert code == 0 and "already complete" in _, err


# ---------------------------------------------------------------- model identity and path spelling


def test_a_changed_model_at_the_same_path_is_refused_on_resume(bae, tmp_path):
    model = save_tiny_model("llama", tmp_path / "lm", seed=0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the cat number {i} sat on the mat" for i in range(30)))
    args = ["harvest", "--model", str(model), "--corpus", str(corpus), "--line-docs", "--layers", "1"]
    args += ["--context-length", "16", "--unit-rows", "64", "--no-progress", "-o", str(tmp_path / "s.zarr")]
    code, _, err = bae(*args)
    assert code == 0, err
    weights = ActivationStore.open(tmp_path / "s.zarr").meta["model"]["weights"]
    assert weights and len(weights) == 64
    code, _, err = bae(*args)  # the same files: resumes (nothing to do)
    assert code == 0, err
    save_tiny_model("llama", tmp_path / "lm", seed=1)  # new weights, same path and config
    one_line_error(bae(*args), "model weights", "the model files changed")


def test_a_model_directory_without_tokenizer_is_one_line(bae, tmp_path):
    model = save_tiny_model("llama", tmp_path / "lm")
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(model / name)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat sat\n")
    result = bae("harvest", "--model", str(model), "--corpus", str(corpus), "-o", str(tmp_path / "s.zarr"))
    one_line_error(result, "no usable tokenizer")


def test_entropy_caches_do_not_depend_on_how_paths_are_spelled(bae, tmp_path, monkeypatch):
    make_known_store(tmp_path / "k.zarr")
    save_bae(tmp_path / "bae")
    monkeypatch.chdir(tmp_path)
    runs = []
    for store, ckpt in (("k.zarr", "bae"), (str(tmp_path / "k.zarr"), str(tmp_path / "bae"))):
        code, _, err = bae("entropy", "-s", store, "-a", ckpt, "--out", "ent", "--no-progress")
        assert code == 0, err
        with (tmp_path / "ent" / "entropy.csv").open() as f:
            runs.append([{k: v for k, v in row.items() if k != "checkpoint"} for row in csv.DictReader(f)])
    assert len(list((tmp_path / "ent" / "partials").iterdir())) == 1  # counted once
    assert runs[0] == runs[1] and len(runs[0]) > 5  # the checkpoint column keeps each spelling


# ---------------------------------------------------------------- resumes and leftovers


def test_a_half_written_log_line_does_not_block_the_resume(bae, store, tmp_path):
    run = tmp_path / "run"
    first = ["train", "-s", str(store), *TRAIN, "--out", str(run), "--log-every", "10"]
    assert bae(*first)[0] == 0
    shutil.rmtree(run / "model")
    shutil.rmtree(RunFolder.at(run).checkpoint(40))
    with (run / "train_log.jsonl").open("a") as f:
        f.write('{"step": 41, "fv')  # what a full disk or a power loss leaves
    code, _, err = bae(*first)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fvu" in r] == [10, 20, 30, 40]


def test_stray_temporaries_are_swept_and_listed(bae, store, tmp_path):
    run = tmp_path / "run"
    assert bae("train", "-s", str(store), *TRAIN, "--out", str(run))[0] == 0
    ckpts = RunFolder.at(run).checkpoints_dir
    (ckpts / ".step-00000060.tmp-abc").mkdir()
    (ckpts / ".step-00000060.tmp-abc" / "model.safetensors").write_bytes(b"0" * 100)
    (run / ".model.old-123").mkdir()
    ent = tmp_path / "ent"
    ckpt = str(run / "model")
    assert bae("entropy", "-s", str(store), "-a", ckpt, "--out", str(ent), "--no-progress")[0] == 0
    partial = next((ent / "partials").iterdir())
    (partial / ".unit-00000001.npz.zst.x1y2.tmp").write_bytes(b"partial")
    chunk = store / "layers" / "2" / "c" / "1" / ".0.deadbeef.partial"
    chunk.write_bytes(b"partial")

    assert bae("train", "-s", str(store), *TRAIN, "--out", str(run))[0] == 0
    assert bae("entropy", "-s", str(store), "-a", ckpt, "--out", str(ent), "--no-progress")[0] == 0
    assert not list(ckpts.glob(".*")) and not list(run.glob(".model*")) and not list(partial.glob(".*"))
    code, out, _ = bae("store", "verify", str(store))
    assert code == 0 and "1 stray temporary file(s)" in out and str(chunk) in out


def test_two_identical_runs_write_identical_checkpoints_readable_by_the_team(bae, store, tmp_path):
    old = os.umask(0o022)
    try:
        for name in ("a", "b"):
            assert bae("train", "-s", str(store), *TRAIN, "--out", str(tmp_path / name))[0] == 0
    finally:
        os.umask(old)
    for sub in ("checkpoints/step-00000040", "model"):
        a, b = tmp_path / "a" / sub, tmp_path / "b" / sub
        for path in sorted(a.iterdir()):
            if path.name != "trainer_state.pt":  # a torch pickle: compared by content in test_trainer_run
                assert path.read_bytes() == (b / path.name).read_bytes(), path
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    state = json.loads((tmp_path / "a/checkpoints/step-00000040/trainer_state.json").read_text())
    assert "rng" not in state


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_says_what_was_kept_and_how_to_resume(store, tmp_path, sig):
    run = tmp_path / "run"
    args = ["train", "-s", str(store), *TRAIN, "--out", str(run)]
    args[args.index("--steps") + 1] = "100000"
    proc = subprocess.Popen([*BAE, *args], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not RunFolder.at(run).checkpoint(20).exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    assert f"interrupted by {sig.name} at step" in err and "re-run the same command to resume" in err
    step = int(err.split(" at step ")[1].split()[0])
    assert RunFolder.at(run).checkpoint(step).is_dir()


def test_features_contexts_killed_at_seeded_instants_then_rerun_equals_uninterrupted(tmp_path):
    make_text_store(tmp_path / "s.zarr", None)
    ckpt = save_autoencoder(tmp_path / "bae", "bae")
    args = ["features", "contexts", "-s", str(tmp_path / "s.zarr"), "-a", str(ckpt), "--no-progress"]
    subprocess.run([*BAE, *args, "-o", str(tmp_path / "clean")], env=ENV, check=True, capture_output=True)
    reference = (tmp_path / "clean" / "contexts.json").read_text()
    out = tmp_path / "killed"
    for delay in np.random.default_rng(14).uniform(1.0, 6.0, size=3):
        proc = subprocess.Popen([*BAE, *args, "-o", str(out)], env=ENV, stderr=subprocess.DEVNULL)
        time.sleep(float(delay))
        proc.kill()
        proc.wait()
        done = out / "contexts.json"
        assert not done.exists() or done.read_text() == reference  # whole or absent, never half
    subprocess.run([*BAE, *args, "-o", str(out)], env=ENV, check=True, capture_output=True)
    assert (out / "contexts.json").read_text() == reference


# ---------------------------------------------------------------- a full disk


def limited(max_bytes: int) -> Any:
    """preexec_fn: a file size limit, so that a write past it fails as on a full disk (EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))

    return apply


def test_a_write_that_fails_midway_is_one_line_and_the_rerun_equals_an_uninterrupted_run(store, tmp_path):
    run, clean = tmp_path / "run", tmp_path / "clean"
    args = ["train", "-s", str(store), *TRAIN]
    subprocess.run([*BAE, *args, "--out", str(clean)], env=ENV, check=True, capture_output=True)
    # trainer_state.pt (optimizer state) is the largest file: its write fails at the first checkpoint
    proc = subprocess.run(
        [*BAE, *args, "--out", str(run)], env=ENV, capture_output=True, text=True, preexec_fn=limited(20_000)
    )
    one_line_error((proc.returncode, proc.stdout, proc.stderr), "ulimit -f", "re-run the same command")
    assert not RunFolder.at(run).finished
    subprocess.run([*BAE, *args, "--out", str(run)], env=ENV, check=True, capture_output=True)
    a = (clean / "model" / "model.safetensors").read_bytes()
    assert a == (run / "model" / "model.safetensors").read_bytes()


def test_a_harvest_that_fails_midway_resumes_to_the_identical_store(tmp_path):
    model = save_tiny_model("llama", tmp_path / "lm")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the cat number {i} sat on the mat today" for i in range(60)))
    args = ["harvest", "--model", str(model), "--corpus", str(corpus), "--line-docs", "--layers", "1"]
    args += ["--context-length", "16", "--unit-rows", "64", "--store-dtype", "float32", "--no-progress"]
    subprocess.run(
        [*BAE, *args, "-o", str(tmp_path / "clean.zarr")], env=ENV, check=True, capture_output=True
    )
    cmd = [*BAE, *args, "-o", str(tmp_path / "s.zarr")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, preexec_fn=limited(6_000))
    one_line_error((proc.returncode, proc.stdout, proc.stderr), "ulimit -f")
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    assert_stores_identical(tmp_path / "clean.zarr", tmp_path / "s.zarr")


# ---------------------------------------------------------------- damaged stores


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m["layout"].update(d_model=16), "array layers/2 has shape"),
        (lambda m: m["layout"].update(unit_rows=100), "chunks"),
        (lambda m: m["layout"].update(n_rows="x"), "field 'n_rows'"),
        (lambda m: m.pop("layout"), "no layout"),
    ],
)
def test_edited_store_attributes_are_refused_by_every_reader(bae, store, tmp_path, edit, needle):
    meta_file = store / "zarr.json"
    doc = json.loads(meta_file.read_text())
    edit(doc["attributes"]["bae"])
    meta_file.write_text(json.dumps(doc))
    ckpt = save_bae(tmp_path / "bae", d=8, layer=2)
    for args in (
        ["store", "verify", str(store)],
        ["train", "-s", str(store), *TRAIN, "--out", str(tmp_path / "run")],
        ["entropy", "-s", str(store), "-a", str(ckpt), "--out", str(tmp_path / "ent")],
    ):
        one_line_error(bae(*args), "zarr.json was edited or damaged", needle)


def test_deleted_chunks_and_done_flags(bae, store, tmp_path):
    ckpt = save_bae(tmp_path / "bae", d=8, layer=2)
    (store / "layers" / "2" / "c" / "2" / "0").unlink()
    code, out, _ = bae("store", "verify", str(store))
    assert code == 1 and "unit 2" in out and "missing" in out
    one_line_error(bae("train", "-s", str(store), *TRAIN, "--out", str(tmp_path / "run")), "is missing")
    one_line_error(
        bae("entropy", "-s", str(store), "-a", str(ckpt), "--out", str(tmp_path / "e")), "is missing"
    )
    (store / "units" / "done" / "c" / "2").unlink()  # the unit now reads as not written
    code, out, _ = bae("store", "verify", str(store))
    assert code == 0 and "1 not yet written" in out
    one_line_error(bae("train", "-s", str(store), *TRAIN, "--out", str(tmp_path / "run")), "missing 2")


# ---------------------------------------------------------------- inputs


def test_compressed_corpora_read_as_their_plain_text(tmp_path):
    lines = [json.dumps({"text": f"document {i} with some words"}) for i in range(20)]
    plain = "\n".join(lines).encode()
    (tmp_path / "c.jsonl").write_bytes(plain)
    writers = {
        "gz": gzip.compress,
        "bz2": bz2.compress,
        "xz": lzma.compress,
        "zst": lambda b: bytes(numcodecs.Zstd().encode(b)),
    }
    expected = [d.text for d in load_corpus([str(tmp_path / "c.jsonl")], "text", False, "strict").docs]
    assert len(expected) == 20
    for suffix, compress in writers.items():
        path = tmp_path / f"c.jsonl.{suffix}"
        path.write_bytes(compress(plain))
        assert [d.text for d in load_corpus([str(path)], "text", False, "strict").docs] == expected, suffix


def test_a_url_whose_package_is_missing_is_one_line(bae):
    pytest.importorskip("fsspec")
    if __import__("importlib").util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    one_line_error(bae("store", "info", "gs://bucket/store.zarr"), "gcsfs")


def test_trackers_start_and_a_missing_one_is_one_line(bae, store, tmp_path):
    run = tmp_path / "run"
    code, _, err = bae("train", "-s", str(store), *TRAIN, "--out", str(run), "--log-with", "tensorboard")
    assert code == 0, err
    events = list((run / "bae-train").rglob("events.out.tfevents.*"))
    assert events and json.loads((run / "tracker.json").read_text())["run_id"]
    if __import__("importlib").util.find_spec("wandb") is None:
        one_line_error(
            bae("train", "-s", str(store), *TRAIN, "--out", str(tmp_path / "w"), "--log-with", "wandb"),
            "pip install wandb",
        )


def test_the_slurm_script_finds_its_configs_when_run_from_the_spool(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(REPO / "docker" / "slurm" / "bae-layers.sbatch", spool / "slurm_script")
    shims = tmp_path / "bin"
    shims.mkdir()
    log = tmp_path / "apptainer.log"
    (shims / "apptainer").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')  # records what would run
    (shims / "apptainer").chmod(0o755)
    env = {
        **ENV,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_SUBMIT_DIR": str(REPO),
        "BAE_DATA": str(tmp_path / "data"),
    }
    env.pop("BAE_CONFIGS", None)
    subprocess.run(["bash", str(spool / "slurm_script")], env=env, check=True, cwd=tmp_path, timeout=60)
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and all(f"{REPO}/docker/configs/cluster:/config:ro" in c for c in calls)
    assert (
        "harvest" in calls[0] and "--layers 6,12,18,24" in calls[0] and "/data/stores/acts.zarr" in calls[0]
    )
    assert "--layer 6" in calls[1] and "/data/checkpoints/L6" in calls[1]
