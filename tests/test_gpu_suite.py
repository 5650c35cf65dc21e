"""benchmarks/gpu_suite.py keeps working: its --tiny run on the CPU prints every line and writes the
JSON; a device that is not here is one error line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
PARTS = {"gemm", "harvest", "train", "penalty", "entropy"}


def run_suite(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(SUITE), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_tiny_suite_runs_on_the_cpu_and_writes_its_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    proc = run_suite("--tiny", "--device", "cpu", "--json", str(out), "--dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["tiny"] is True
    lines = report["lines"]
    assert {line["part"] for line in lines} == PARTS
    assert len([line for line in lines if line["part"] == "harvest"]) == 2  # both model shapes
    assert len([line for line in lines if line["part"] == "penalty"]) == 4  # 2 terms x 2 widths
    for line in lines:
        assert math.isfinite(line["value"]), line
        if line["part"] != "penalty":  # a share can come out below 0 at tiny sizes (noise)
            assert line["value"] > 0, line
        if line["target"] is not None:  # a comparison with its baseline of the same run
            assert line["baseline"] > 0 and line["ratio"] == pytest.approx(line["value"] / line["baseline"])
            assert line["peak_bytes"] > 0
    table = proc.stdout
    assert table.startswith("bae GPU suite (--tiny): device cpu")
    for line in lines:
        assert line["what"] in table
    assert not list(tmp_path.glob("bae-gpu-suite-*"))  # its stores and models are removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_here_is_one_error_line(tmp_path: Path) -> None:
    proc = run_suite("--tiny", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: device 'cuda'")
