"""`bae train` end to end on real Zarr stores: resume after SIGKILL, SIGTERM, torchrun DDP, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, cast

import numpy as np
import pytest
import zarr
from safetensors.numpy import load_file

from bae.common.errors import BaeError
from bae.stores import ActivationStore, StoreLayout
from bae.trainer import load_autoencoder
from bae.trainer.config import TrainConfig
from bae.trainer.run import train

BAE = [sys.executable, "-m", "bae.cli"]
SPARSE_DECODER_BAE = [  # the CLI with the decoder's sparse sums taken at any density
    sys.executable,
    "-c",
    "import sys; from bae.trainer import binary_decode; binary_decode.SPARSE_DENSITY = 1.0; "
    "from bae.cli import main; sys.argv[0] = 'bae'; main()",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def make_store(path: Path, n: int = 4096, d: int = 16, unit: int = 512, layers=(3,), seed=0, sparse=False):
    """A float32 store of Gaussian rows (``sparse``: 8 features of rate 0.1 on random directions
    plus noise, where the moves prune, re-seed and split); documents of 64 rows, every 16th row
    not valid."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((8, d)) * 3

    def rows_of(count: int) -> np.ndarray:
        if not sparse:
            return rng.standard_normal((count, d)).astype(np.float32)
        on = rng.random((count, 8)) < 0.1
        return (on @ features + 0.1 * rng.standard_normal((count, d))).astype(np.float32)

    layout = StoreLayout(n_rows=n, unit_rows=unit, d_model=d, layers=list(layers), dtype="float32")
    store = ActivationStore.create(path, layout, attrs={"config": {"seed": seed, "d": d}})
    for u in range(layout.n_units):
        a, b = layout.unit_range(u)
        rows = np.arange(a, b)
        store.write_unit(
            u,
            layers={L: rows_of(b - a) for L in layers},
            token_ids=rows % 100,
            doc_ids=rows // 64,
            positions=rows % 64,
            valid=rows % 16 != 0,
        )
    return store


def run_bae(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*BAE, *args], capture_output=True, text=True, env=ENV, timeout=300, **kw)


def train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--store",
        str(store),
        "--layer",
        "3",
        "--out",
        str(out),
        "--batch-size",
        "64",
        "--log-every",
        "5",
        "--val-every",
        "50",
        "--no-progress",
        *extra,
    ]


def weights(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "acts.zarr"
    make_store(path)
    return path


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sparse") / "acts.zarr"
    make_store(path, sparse=True)
    return path


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, cast(IO[str], proc.stderr).read()
        assert time.monotonic() < end
        time.sleep(0.005)


@pytest.mark.parametrize("decoder", ["default", "sparse"])
def test_sigkill_then_resume_is_bit_identical(sparse_store: Path, tmp_path: Path, decoder: str) -> None:
    """``sparse``: the decoder as the sparse sums at any density (``binary_decode``), so the whole
    run, killed and resumed, goes through them, with the join move (on with the moves; the
    default decoder's run without it, ``--no-join``)."""
    store = sparse_store
    cmd = BAE if decoder == "default" else SPARSE_DECODER_BAE

    def run_bae(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, timeout=300)

    # the normalized objective at a target FVU: the dual-ascent state must resume exactly too
    # with prunes and re-seeds (opt-in), which write weights and Adam moments
    extra = ("--steps", "300", "--checkpoint-every", "20", "--target-fvu", "0.3", "--merge-every", "7")
    extra = (*extra, "--prune-reseed", "--no-join") if decoder == "default" else (*extra, "--prune-reseed")
    ref = run_bae(*train_args(store, tmp_path / "ref", *extra))
    assert ref.returncode == 0, ref.stderr
    records = [json.loads(line) for line in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    moves = [r for r in records if "pruned_bits" in r][-1]
    (polished,) = [r for r in records if "polish_rounds" in r]  # the polish (on with the moves), resumed too
    assert polished["step"] == 300 and polished["polish_rounds"] > 0, polished
    assert moves["pruned_bits"] > 0 and moves["reseeded_bits"] > 0 and moves["split_bits"] > 0, moves
    assert moves["joined_groups"] > 0 if decoder == "sparse" else moves["joined_groups"] == 0, moves
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, *train_args(store, out, *extra)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out / "checkpoints" / "step-00000200", proc)  # after the first prunes and re-seeds
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists()
    resumed = run_bae(*train_args(store, out, *extra))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(out), weights(tmp_path / "ref"))
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (out / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps.count(300) == 3  # train, polish, val record, no duplicates
    # a finished run re-run is a no-op; a different config is refused naming the field
    again = run_bae(*train_args(store, out, *extra))
    assert again.returncode == 0 and "already complete" in again.stdout
    other = run_bae(
        *train_args(
            store, out, "--steps", "300", "--checkpoint-every", "20", "--target-fvu", "0.3", "--lr", "0.001"
        )
    )
    assert other.returncode == 2 and "lr: 0.01 -> 0.001" in other.stderr
    assert_same_weights(weights(out), weights(tmp_path / "ref"))


def test_sigterm_checkpoints_and_exits_nonzero(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*BAE, *train_args(store, out, "--steps", "100000", "--checkpoint-every", "10000")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out / "train_log.jsonl", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name[5:]) < 100000
    assert load_autoencoder(out).n_bits == 64  # loadable from the run dir via the checkpoint


@pytest.mark.parametrize("decoder", ["gemm", "sparse"])
def test_torchrun_two_processes_end_identical(sparse_store: Path, tmp_path: Path, decoder: str) -> None:
    """Both ranks end with the same weights, with the decoder as a GEMM and as the sparse sums
    (``binary_decode``, forced here at any density: its gradient reduced across processes)."""
    store = sparse_store
    script = tmp_path / "ddp.py"
    density = 1.0 if decoder == "sparse" else -1.0
    script.write_text(
        "import os\n"
        "from safetensors.torch import save_file\n"
        "from bae.trainer import binary_decode\n"
        f"binary_decode.SPARSE_DENSITY = {density}\n"
        "from bae.trainer.config import TrainConfig\n"
        "from bae.trainer.run import train\n"
        f"cfg = TrainConfig(store={str(store)!r}, layer=3, steps=60, batch_size=32, log_every=10,"
        f" val_every=15, checkpoint_every=15, target_fvu=0.3, merge_every=5, prune_reseed=True,"
        f" window_steps=5, out={str(tmp_path / 'out')!r})\n"
        "model, _ = train(cfg, show_progress=False)\n"
        "rank = os.environ['RANK']\n"
        f"save_file(model.state_dict(), {str(tmp_path)!r} + f'/rank{{rank}}.safetensors')\n"
    )
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(script)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert_same_weights(r0, r1)
    assert_same_weights(r0, weights(tmp_path / "out"))
    # both ranks trained on different batches: 60 steps × 2 processes × 32 rows
    log = (tmp_path / "out" / "train_log.jsonl").read_text()
    assert '"step": 60, "tokens": 3840' in log
    records = [json.loads(line) for line in log.splitlines()]
    moves = [r for r in records if "pruned_bits" in r][-1]  # decided on both ranks' rows, identically
    assert [r["step"] for r in records if "polish_rounds" in r] == [60]  # polished on rank 0, sent to 1
    assert moves["pruned_bits"] > 0 and moves["reseeded_bits"] > 0 and moves["split_bits"] > 0, moves


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_non_finite_options_and_a_diverging_run_stop_in_one_line(store: Path, tmp_path: Path) -> None:
    one_line_error(run_bae(*train_args(store, tmp_path / "a", "--lr", "inf")), "'lr'", "finite number")
    one_line_error(run_bae(*train_args(store, tmp_path / "b", "--beta", "nan")), "'beta'", "finite number")
    out = tmp_path / "diverged"
    diverged = run_bae(*train_args(store, out, "--lr", "1e30", "--steps", "50", "--checkpoint-every", "1"))
    one_line_error(diverged, "training diverged at step", "not finite", "lower --lr")
    assert not (out / "model").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):  # whatever was kept holds finite weights
        assert all(np.isfinite(w).all() for w in load_file(str(ckpt / "model.safetensors")).values())


def test_bad_inputs(store: Path, tmp_path: Path) -> None:
    missing = run_bae(
        "train", "--store", str(store), "--layer", "7", "--out", str(tmp_path / "a"), "--steps", "5"
    )
    one_line_error(missing, "no layer 7", "layers present: 3")
    assert not (tmp_path / "a" / "checkpoints").exists()

    def cfg(path: Path, **kw) -> TrainConfig:
        return TrainConfig(
            **{"store": str(path), "layer": 3, "batch_size": 32, "steps": 10, "log_every": 5, **kw}
        )

    with pytest.raises(BaeError, match=r"batch_size 100000 .* larger than the training split"):
        train(cfg(store, batch_size=100000, out=str(tmp_path / "b")), show_progress=False)

    nan_store = tmp_path / "nan.zarr"
    make_store(nan_store, n=1024, unit=256)
    arr = zarr.open_array(str(nan_store / "layers" / "3"), mode="r+")
    arr[700, 5] = np.nan
    with pytest.raises(BaeError, match=r"NaN/inf .*rows 512\.\.768, first at row 700"):
        train(cfg(nan_store, steps=50, val_fraction=0.0, out=str(tmp_path / "c")), show_progress=False)
    assert not list((tmp_path / "c").glob("checkpoints/step-*"))

    out = tmp_path / "d"
    train(cfg(store, out=str(out)), show_progress=False)
    before = weights(out)
    other_d = tmp_path / "d8.zarr"
    make_store(other_d, n=1024, d=8, unit=256)
    with pytest.raises(BaeError, match=r"checkpoint of a bae with d=16, .* bae with d=8"):
        train(cfg(other_d, out=str(out)), show_progress=False)
    with pytest.raises(BaeError, match="bae with d=16, but this run trains a topk_sae"):
        train(cfg(store, architecture="topk_sae", out=str(out)), show_progress=False)
    assert_same_weights(weights(out), before)
