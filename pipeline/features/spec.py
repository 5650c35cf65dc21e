"""The store rows and checkpoint a ``bae features`` pass reads."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from bae.common.devices import resolve_device
from bae.common.errors import BaeError
from bae.common.outputs import make_output_dir
from bae.pipeline.analysis.checkpoint_match import load_for_store
from bae.pipeline.analysis.scan import ScanSpec
from bae.pipeline.features.config import FeaturesConfig
from bae.stores import ActivationStore, RowFilter


def scan_device(spec: str) -> str:
    """``--device`` for a features pass, checked to exist here. The passes sum in float64, which MPS
    lacks: ``auto`` that would pick MPS takes the CPU instead, and ``mps`` is refused."""
    if resolve_device(spec).type != "mps":
        return spec
    if spec.strip().lower() == "auto":
        return "cpu"
    raise BaeError(f"device {spec!r}: bae features sums in float64, which MPS lacks; use cpu or cuda")


def output_dir(config: FeaturesConfig) -> Path:
    """The output directory of a pass, created once ``--device`` is known to be usable here (anything
    else is refused before anything is written)."""
    scan_device(config.device)
    return make_output_dir(config.out)


def scan_spec(config: FeaturesConfig, checkpoint: str | None = None) -> ScanSpec:
    """Open the store and checkpoint named by ``config`` and check that they belong together."""
    url = config.need("store")
    checkpoint = checkpoint or cast(str, config.need("checkpoint"))
    store = ActivationStore.open(url)
    _, layer = load_for_store(store, checkpoint, config.layer)
    units = [int(u) for u in store.complete_units(config.allow_partial)]
    if config.max_rows is not None:
        units = [u for u in units if store.unit_range(u)[0] < config.max_rows] or units[:1]
    row_filter, device = RowFilter.of(config, config.split), scan_device(config.device)
    return ScanSpec(url, checkpoint, int(layer), row_filter, tuple(units), config.batch_rows, device)
