"""The multi-process forms a cluster user types: `accelerate launch` of harvest and train (2 CPU
processes; `--multi_gpu` makes accelerate start them with torchrun, and bae joins them over gloo when
no GPU is present), and the single-process results they must reproduce."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np
import zarr
from bae_testing.stores import run_bae

from bae.stores import ActivationStore

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
HARVEST_FLAGS = ["--layers", "2", "--context-length", "16", "--unit-rows", "64", "--batch-tokens", "32"]


def accelerate_launch(port: int, *args: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    return subprocess.run(
        [*cmd, "-m", "bae.cli", *args], capture_output=True, text=True, env=ENV, timeout=600
    )


def test_accelerate_launch_harvest_then_train(tmp_path):
    from bae_testing.tiny_models import save_tiny_model
    from test_harvest import write_corpus

    model = save_tiny_model("llama", tmp_path / "lm")
    corpus = write_corpus(tmp_path / "corpus.jsonl", 40, seed=2)
    common = ["--model", str(model), "--corpus", str(corpus), *HARVEST_FLAGS, "--no-progress"]

    run_bae("harvest", "-o", str(tmp_path / "single"), *common, check=True)
    launched = accelerate_launch(29541, "harvest", "-o", str(tmp_path / "multi"), *common)
    assert launched.returncode == 0, launched.stderr[-3000:]
    single, multi = ActivationStore.open(tmp_path / "single"), ActivationStore.open(tmp_path / "multi")
    assert multi.done_mask().all() and multi.n_units > 2
    a, b = (
        zarr.open_group(str(tmp_path / "single"), mode="r"),
        zarr.open_group(str(tmp_path / "multi"), mode="r"),
    )
    for name in ("layers/2", "token_ids", "doc_ids", "positions", "valid"):
        np.testing.assert_array_equal(
            cast(zarr.Array, a[name])[:], cast(zarr.Array, b[name])[:], err_msg=name
        )
    assert single.meta["config"] | {"output": None} == multi.meta["config"] | {"output": None}

    train = ["train", "--store", str(tmp_path / "multi"), "--layer", "2", "--out", str(tmp_path / "bae")]
    train += ["--steps", "20", "--batch-size", "16", "--checkpoint-every", "10", "--val-every", "10"]
    trained = accelerate_launch(29542, *train)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "bae" / "model" / "model.safetensors").is_file()
    assert re.search(r"tokens\s+640\b", trained.stdout), trained.stdout  # 20 steps x 16 rows x 2 ranks
