"""`bae run`: the whole pipeline from one file; killed during training and re-run, it reuses the store,
resumes training from its checkpoint and ends with the results of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from bae_testing.stores import run_bae
from safetensors.numpy import load_file

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from bae_testing.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("run-inputs")
    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))))
    return {"model": save_tiny_model("llama", root / "lm"), "corpus": corpus}


def pipeline_file(inputs: dict[str, Path], workdir: Path, **extra) -> Path:
    spec = {
        "workdir": str(workdir),
        "harvest": {
            "model": str(inputs["model"]),
            "corpus": [str(inputs["corpus"])],
            "mode": "document",
            "context_length": 24,
            "layers": [2],
        },
        "train": {
            "steps": 120,
            "batch_size": 32,
            "checkpoint_every": 10,
            "val_every": 60,
            "log_every": 10,
        },
        "entropy": {"group_by": "position"},
        **extra,
    }
    path = workdir.parent / f"{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bae_cmd() -> list[str]:
    return [str(Path(sys.executable).with_name("bae"))]


def test_killed_during_training_resumes_from_cache_and_matches(inputs, tmp_path):
    ref = pipeline_file(inputs, tmp_path / "ref")
    run_bae("run", str(ref), check=True)

    work = tmp_path / "work"
    spec = pipeline_file(inputs, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*bae_cmd(), "run", str(spec)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = work / "bae-layer2" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(checkpoints.glob("step-*")), "the run never reached a training checkpoint"
    assert not (work / "bae-layer2" / "model").exists(), "killed too late: training had finished"

    store_files = {p: p.stat().st_mtime_ns for p in (work / "activations.zarr").rglob("*") if p.is_file()}
    again = run_bae("run", str(spec), check=True)
    assert "reused" in again.stdout  # the harvest stage did not run again
    assert {p: p.stat().st_mtime_ns for p in store_files} == store_files

    a = load_file(tmp_path / "ref" / "bae-layer2" / "model" / "model.safetensors")
    b = load_file(work / "bae-layer2" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    third = load_file(work / "bae-layer2-seed2" / "model" / "model.safetensors")  # the default 3 trainings
    assert not np.array_equal(third["encoder.weight"], b["encoder.weight"])  # another seed
    assert "over 3 trainings" in again.stdout and "layer 2 (3 trainings)" in again.stdout
    csv_a = (tmp_path / "ref" / "entropy" / "entropy.csv").read_text()
    csv_b = (work / "entropy" / "entropy.csv").read_text()
    assert csv_a.replace(str(tmp_path / "ref"), "W") == csv_b.replace(str(work), "W")
    assert (work / "entropy" / "entropy.png").stat().st_size > 0
    assert "entropy plot" in again.stdout
    evaluate_a = (tmp_path / "ref" / "evaluate" / "evaluate.csv").read_text()
    evaluate_b = (work / "evaluate" / "evaluate.csv").read_text()
    assert evaluate_a.replace(str(tmp_path / "ref"), "W") == evaluate_b.replace(str(work), "W")
    assert "CE recovered" in again.stdout or "ce_recovered" in again.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"features": {}}, "unknown field 'features'"),
        ({"harvest": {"colour": 1}}, "pipeline harvest: unknown field 'colour'"),
        ({"train": {"store": "x"}}, "train.store is set by the pipeline"),
        ({"stages": ["train", "harvest"]}, "must be a subset of"),
    ],
)
def test_bad_pipeline_files(tmp_path, extra, message):
    spec = {"workdir": str(tmp_path / "w"), **extra}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_bae("run", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_stage_whose_input_is_missing_names_the_earlier_stage(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "stages": ["train", "entropy"]}))
    proc = run_bae("run", str(path))
    assert proc.returncode == 2 and "run the harvest stage first" in proc.stderr
    path.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "stages": ["entropy"]}))
    proc = run_bae("run", str(path))
    assert proc.returncode == 2 and "run the train stage first" in proc.stderr


def test_read_only_workdir_fails_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip("cannot mount a read-only filesystem here")
    else:
        ro.chmod(0o555)
    try:
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"workdir": str(ro / "w")}))
        proc = run_bae("run", str(path))
        assert (
            proc.returncode == 2 and "workdir" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        )
        assert "harvest" not in proc.stdout
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
