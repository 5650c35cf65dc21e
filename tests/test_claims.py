"""Independent processes on one store share its units by leases (``bae.stores.claims``): each unit
written once, the store identical to a single run, a killed process's units taken over."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bae_testing.stores import assert_stores_identical
from bae_testing.tiny_models import save_tiny_model

from bae.stores import ActivationStore
from bae.stores.claims import UnitClaims, claims_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BAE = [sys.executable, "-m", "bae.cli"]


def test_a_unit_is_held_by_one_process_until_its_lease_is_stale(tmp_path: Path) -> None:
    a, b = UnitClaims(tmp_path / "s.zarr", 30.0), UnitClaims(tmp_path / "s.zarr", 30.0)
    assert a.try_claim(0) and not b.try_claim(0) and b.try_claim(1)
    b.release(0)  # not b's to release
    assert not b.try_claim(0)
    a.release(0)
    assert b.try_claim(0)

    lease = {"owner": "another-host:123:abcd", "expires": time.time() - 1}  # expired elsewhere
    a.path(5).write_text(json.dumps(lease))
    assert b.try_claim(5) and b.read(5)["owner"] == b.owner  # type: ignore[index]

    lease = {"owner": "another-host:123:abcd", "expires": time.time() + 60}  # live elsewhere
    a.path(6).write_text(json.dumps(lease))
    assert not b.try_claim(6)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lease = {"owner": f"{a.host}:{int(dead.stdout)}:abcd", "expires": time.time() + 60}  # this host, gone
    a.path(7).write_text(json.dumps(lease))
    assert b.try_claim(7)


def test_a_lease_file_is_never_empty_and_an_old_empty_one_is_taken_over(tmp_path: Path) -> None:
    """An owner killed between creating its lease file and writing it left an empty file that every
    other process read as 'caught mid-replace' and waited on forever (seen in a test run): leases
    now appear whole, and an unreadable one a lease's length old is taken over."""
    a, b = UnitClaims(tmp_path / "s.zarr", 30.0), UnitClaims(tmp_path / "s.zarr", 30.0)
    assert a.try_claim(0)
    assert a.read(0)["owner"] == a.owner  # type: ignore[index]  # whole from the first instant
    assert [p.name for p in claims_dir(tmp_path / "s.zarr").iterdir()] == ["unit-00000000.json"]
    a.path(4).write_text("")  # what a killed owner used to leave
    assert not b.try_claim(4)  # fresh: perhaps a file caught mid-replace
    old = time.time() - 31
    os.utime(a.path(4), (old, old))
    assert b.try_claim(4) and b.read(4)["owner"] == b.owner  # type: ignore[index]


def test_a_held_lease_is_renewed_and_released(tmp_path: Path) -> None:
    claims = UnitClaims(tmp_path / "s.zarr", 0.6)
    assert claims.try_claim(3)
    first = claims.read(3)["expires"]  # type: ignore[index]
    with claims.holding(3):
        time.sleep(0.5)
        assert claims.read(3)["expires"] > first  # type: ignore[index]
    assert claims.read(3) is None


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model, a corpus of ~30 units and the store a single process makes of it."""
    tmp = tmp_path_factory.mktemp("claims")
    model = save_tiny_model("llama", tmp / "lm")
    corpus = tmp / "c.txt"
    corpus.write_text("\n".join(f"the cat number {i} sat on the mat near bird {7 * i}" for i in range(120)))
    args = ["harvest", "--model", str(model), "--corpus", str(corpus), "--line-docs", "--layers", "1,2"]
    args += ["--context-length", "16", "--unit-rows", "48", "--store-dtype", "float32", "--no-progress"]
    single = tmp / "single.zarr"
    subprocess.run([*BAE, *args, "-o", str(single)], env=ENV, check=True, capture_output=True)
    return {"args": args, "single": single, "n_units": ActivationStore.open(single).n_units}


def written(stdout: str) -> int:
    return int(re.search(r"units\s+(\d+) written now", stdout).group(1))  # type: ignore[union-attr]


# The whole job computes in well under a second and a process takes seconds to import: started
# plainly, one process could finish every unit before the others were up (CI saw [0, 0, 88]). Each
# process imports the CLI, reports ready, and starts the harvest when the test says go.
AT_THE_LINE = """
import sys, time
from pathlib import Path
from bae.cli import main
import bae.pipeline.harvest.run
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
sys.argv = ["bae", *sys.argv[3:]]
main()
"""


def test_independent_processes_share_the_units_and_make_the_same_store(job: dict, tmp_path: Path) -> None:
    store, go = tmp_path / "shared.zarr", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AT_THE_LINE, str(r), str(go), *job["args"], "-o", str(store)],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.time() + 300
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = [written(out) for out in outs]
    assert sum(counts) == job["n_units"] and job["n_units"] > 20  # every unit written exactly once
    assert sum(c > 0 for c in counts) >= 2, counts  # the work was shared
    assert_stores_identical(job["single"], store)
    assert not list(claims_dir(store).iterdir())  # every lease released


def test_a_process_killed_mid_unit_is_taken_over(job: dict, tmp_path: Path) -> None:
    store = tmp_path / "shared.zarr"
    cmd = [*BAE, *job["args"], "-o", str(store)]
    victim = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(claims_dir(store).glob("unit-*.json")):
        time.sleep(0.002)
    victim.send_signal(signal.SIGSTOP)  # frozen while it holds a unit's lease
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not ActivationStore.open(store).done_mask().all()
    survivor = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert survivor.returncode == 0, survivor.stderr
    assert_stores_identical(job["single"], store)


def test_a_live_lease_elsewhere_is_waited_for_then_taken_over(job: dict, tmp_path: Path) -> None:
    store = tmp_path / "shared.zarr"
    shutil.copytree(job["single"], store)
    (store / "units" / "done" / "c" / "0").unlink()  # unit 0 not done: held by a live process elsewhere
    lease = {"owner": "another-host:1:abcd", "expires": time.time() + 8}
    claims_dir(store).mkdir()
    (claims_dir(store) / "unit-00000000.json").write_text(json.dumps(lease))
    began = time.time()
    run = subprocess.run([*BAE, *job["args"], "-o", str(store)], env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert time.time() - began >= 8 - 1  # it waited for the lease to expire, then took the unit over
    assert written(run.stdout) == 1
    assert_stores_identical(job["single"], store)
