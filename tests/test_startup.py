"""Start-up cost of `bae entropy`: what it imports, and that the lighter path counts the same."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from bae_testing.entropy import LAYER, make_known_store, save_bae

from bae.pipeline.entropy.counts import CountSpec, RowKey, count_groups, merge_all, unit_counts
from bae.stores import RowFilter

# imported by none of `bae entropy`'s steps: numba and sparse come with dask.array, distributed with a
# named dask scheduler, accelerate with the training loop
NOT_NEEDED = ("numba", "sparse", "dask.array", "distributed", "accelerate")


def loaded(stage: str) -> str:
    """Code printing one line: ``stage`` and the modules of ``NOT_NEEDED`` imported so far."""
    return f"print('{stage}:', *(m for m in {NOT_NEEDED!r} if m in sys.modules))\n"


def test_entropy_imports_only_what_it_uses(tmp_path):
    """Neither importing the CLI nor a whole `bae entropy` run (bootstrap, joint, pairs, plot) loads
    the modules of ``NOT_NEEDED``; each took a second or more of start-up."""
    store, _ = make_known_store(tmp_path / "s.zarr")
    checkpoint = save_bae(tmp_path / "bae")
    argv = ["bae", "entropy", "-s", store.url, "-a", str(checkpoint), "-o", str(tmp_path / "out")]
    code = (
        f"import sys\nsys.argv = {[*argv, '--bootstrap', '4', '--no-progress']!r}\n"
        "from bae.cli import main\nimport bae.pipeline.entropy.run\n"
        + loaded("imported")
        + "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        + loaded("ran")
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    stages = [line for line in result.stdout.splitlines() if line.startswith(("imported:", "ran:"))]
    assert stages == ["imported:", "ran:"]
    assert (tmp_path / "out" / "entropy.parquet").is_file()


@pytest.mark.parametrize("joint", [True, False])
def test_threaded_counts_equal_a_plain_loop(tmp_path, joint):
    """The dask threaded reduction gives exactly the counts of a loop over the units without dask."""
    store, _ = make_known_store(tmp_path / "s.zarr")
    checkpoint = save_bae(tmp_path / "bae", expansion=2, identity=False)
    spec = CountSpec(
        store.url,
        str(checkpoint),
        LAYER,
        RowFilter(),
        RowKey("positions"),
        tuple(range(store.n_units)),
        bootstrap=3,
        joint=joint,
        pair_bits=(0, 3, 5),
    )
    threaded = count_groups(spec, show_progress=False)
    looped = merge_all([unit_counts(spec, u) for u in spec.units])
    for name in ("keys", "rows", "ones", "boot_rows", "boot_ones", "pairs"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(looped, name))
    if joint:
        assert threaded.codes is not None and looped.codes is not None
        for name, value in threaded.codes.arrays().items():
            np.testing.assert_array_equal(value, looped.codes.arrays()[name])
