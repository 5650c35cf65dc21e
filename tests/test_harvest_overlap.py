"""`bae harvest` with its store writes on a writer thread: stores byte-identical across batchings and
to units written one after the other on the main thread, a failing write stops the run (no unit
recorded done past it, no hang), a kill while units are being written resumes to the same store,
and the summary reports the forwards' share of the wall time."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bae_testing.stores import assert_stores_identical
from bae_testing.tiny_models import save_tiny_model

from bae.common.errors import BaeError
from bae.pipeline.harvest.config import HarvestConfig
from bae.pipeline.harvest.overlap import UnitBuffer
from bae.pipeline.harvest.run import UnitForwards, prepare, process_state, run_harvest, store_attrs
from bae.pipeline.llm.capture import LayerCapture
from bae.stores import ActivationStore

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "binary", "codes"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("lm") / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSONL documents of 2..30 words: windows of many lengths in document mode."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(2, 30))))}) for _ in range(70)]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(out: Path, model: Path, corpus: Path, **kw) -> HarvestConfig:
    fields = {"layers": [0, 2, 3], "context_length": 24, "unit_rows": 96, "store_dtype": "float32"}
    return HarvestConfig(out=str(out), model=str(model), corpus=[str(corpus)], **{**fields, **kw})


def serial_store(cfg: HarvestConfig) -> Path:
    """The same harvest with every unit computed and then written on this thread, one after the
    other, each into a fresh buffer: no writer thread, no buffer reuse."""
    prepared = prepare(cfg, process_state())
    store = ActivationStore.create(
        cfg.out, prepared.layout, store_attrs(cfg, prepared), prepared.corpus.metadata_columns()
    )
    with LayerCapture(prepared.loaded.model, prepared.layers, prepared.sites) as capture:
        forwards = UnitForwards(store, prepared.plan, capture, prepared.loaded, cfg)
        for unit in range(store.n_units):
            # filled with noise: rows the unit leaves empty must come out zero
            buffer = UnitBuffer(
                {layer: torch.randn(store.unit_rows, store.d_model) for layer in store.layers}
            )
            forwards.fill(unit, buffer)
            forwards.write(unit, buffer)
    return Path(cfg.out)


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_store_is_identical_to_serial_writes_at_every_batching(mode, model, corpus, tmp_path):
    """One window per forward, a few per forward, and a whole unit per forward (padded batches in
    document mode): the overlapped harvest writes the same bytes as the units computed and written
    serially at that batching. Across batchings the values agree to float32 rounding only (a
    product's rounding depends on its shape), which is why ``batch_tokens`` is part of the
    recorded config."""
    stores = {}
    for batch_tokens in (1, 60, 100_000):
        serial = serial_store(
            config(tmp_path / f"s{batch_tokens}", model, corpus, mode=mode, batch_tokens=batch_tokens)
        )
        cfg = config(tmp_path / f"b{batch_tokens}", model, corpus, mode=mode, batch_tokens=batch_tokens)
        result = run_harvest(cfg, show_progress=False)
        assert result.units_written == result.store.n_units > 3
        assert_stores_identical(serial, cfg.out)
        stores[batch_tokens] = result.store
    one, whole = stores[1], stores[100_000]
    for name, values in one.read_rows(0, one.n_rows).items():
        np.testing.assert_array_equal(values, whole.read_rows(0, whole.n_rows)[name], err_msg=name)
    for layer in one.layers:
        np.testing.assert_allclose(
            one.read_layer(layer, 0, one.n_rows),
            whole.read_layer(layer, 0, whole.n_rows),
            rtol=1e-5,
            atol=1e-6,
        )
    with pytest.raises(BaeError, match="batch_tokens: 60 -> 1"):
        run_harvest(config(tmp_path / "b60", model, corpus, mode=mode, batch_tokens=1), show_progress=False)


def test_a_failing_write_stops_the_harvest_and_records_no_unit_past_it(model, corpus, tmp_path):
    """A write that fails on the writer thread (unit 3's layer chunk path is a directory) raises on
    the main thread; the units before it are done, none after it; removing the cause and re-running
    completes the identical store."""
    clean = run_harvest(config(tmp_path / "clean", model, corpus), show_progress=False).store
    out = tmp_path / "s"
    shutil.copytree(tmp_path / "clean", out)
    for unit in range(2, clean.n_units):  # units 2.. as never written
        (out / "units" / "done" / "c" / str(unit)).unlink()
    blocker = out / "layers" / "2" / "c" / "3" / "0"
    blocker.unlink()
    blocker.mkdir()
    with pytest.raises(IsADirectoryError):  # not a user's mistake: the traceback is kept
        run_harvest(config(out, model, corpus), show_progress=False)
    done = ActivationStore.open(out).done_mask()
    assert done[:3].all() and not done[3:].any()
    blocker.rmdir()
    result = run_harvest(config(out, model, corpus), show_progress=False)
    assert result.units_written == clean.n_units - 3
    assert_stores_identical(tmp_path / "clean", out)


def cli(out: Path, model: Path, corpus: Path, *extra: str) -> list[str]:
    flags = ["--layers", "0,2,3", "--context-length", "24", "--unit-rows", "96", "--no-progress"]
    head = [sys.executable, "-m", "bae.cli", "harvest", "-o", str(out), "--model", str(model)]
    return [*head, "--corpus", str(corpus), *flags, *extra]


def test_a_write_past_the_file_size_limit_is_one_line_and_nothing_is_recorded(model, corpus, tmp_path):
    def limit() -> None:  # a unit's layer chunk (96 rows x 32 x 2 bytes) exceeds it: EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, resource.RLIM_INFINITY))

    out = tmp_path / "s"
    proc = subprocess.run(
        cli(out, model, corpus), capture_output=True, text=True, preexec_fn=limit, timeout=120
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "ulimit -f" in line
    assert not ActivationStore.open(out).done_mask().any()


def unit_in_progress(store: Path, n_units: int) -> bool:
    """Some unit has a layer chunk on disk but no done flag: its write has begun, not ended."""
    for unit in range(n_units):
        chunk = store / "layers" / "3" / "c" / str(unit) / "0"
        if chunk.exists() and not (store / "units" / "done" / "c" / str(unit)).exists():
            return True
    return False


def test_kill_while_units_are_written_then_rerun_equals_uninterrupted(model, corpus, tmp_path):
    """SIGKILL at an instant the writer thread is inside a unit's write (its chunks on disk, its
    done flag not), then a re-run: the store equals an uninterrupted one."""
    extra = ("--mode", "document", "--batch-tokens", "24", "--unit-rows", "24")
    fields = {"mode": "document", "batch_tokens": 24, "unit_rows": 24, "store_dtype": "float16"}
    n_units = run_harvest(
        config(tmp_path / "clean", model, corpus, **fields), show_progress=False
    ).store.n_units
    for attempt in range(5):
        out = tmp_path / f"s{attempt}"
        proc = subprocess.Popen(
            cli(out, model, corpus, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not unit_in_progress(out, n_units):
            time.sleep(0.0002)
        proc.kill()
        proc.wait()
        if unit_in_progress(out, n_units):
            break
    else:
        pytest.skip("no kill landed inside a unit's write in 5 runs")
    assert not ActivationStore.open(out).done_mask().all()
    run_harvest(config(out, model, corpus, **fields), show_progress=False)  # the same config as the CLI's
    assert_stores_identical(tmp_path / "clean", out)


def test_summary_reports_forward_share_and_token_rate(model, corpus, tmp_path):
    result = run_harvest(config(tmp_path / "s", model, corpus), show_progress=False)
    line = result.summary["forward share"]
    share = int(line.split("%")[0])
    assert 0 < share <= 100 and line.endswith("% of wall time (host clock)")
    assert "forward busy" not in result.summary  # CUDA events only on a CUDA device
    assert "tok/s" in result.summary["tokens"]
