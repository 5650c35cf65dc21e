"""``EntropyConfig``: what ``bae entropy`` measures, over which rows, and how."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from bae.common.command import cli
from bae.common.devices import DEVICE_HELP
from bae.common.outputs import LocalOutput
from bae.common.selection import SplitSelection

CONFIG_JSON = "entropy_config.json"
OPERATIONAL = ("out", "scheduler", "batch_rows", "confidence", "device")


class EntropyConfig(SplitSelection):
    """What ``bae entropy`` measures, over which rows, and how."""

    store: str | None = Field(
        default=None, description="activation store (path or URL)", json_schema_extra=cli("-s")
    )
    checkpoints: list[str] = Field(
        default_factory=list,
        description=(
            "autoencoder: one per layer or per (layer, positions), or several trainings of one (read "
            "together); repeat it"
        ),
        json_schema_extra=cli("-a", flag="--checkpoint"),
    )
    out: LocalOutput = Field(default="entropy", description="output directory", json_schema_extra=cli("-o"))
    group_by: str = Field(
        default="position", description="position | document | token | all | a per-document field"
    )
    bootstrap: int = Field(default=0, ge=0, description="bootstrap replicates resampling documents (0: off)")
    bootstrap_seed: int = Field(default=0, ge=0, description="seed of the bootstrap replicates")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="bootstrap interval coverage")
    joint: bool = Field(
        default=True, description="count whole codes: distinct codes, plug-in and joint estimates"
    )
    pair_bits: int = Field(
        default=64, ge=0, description="bits in the Chow–Liu upper bound's pairwise statistics (0: no bound)"
    )
    equal_n: int | None = Field(
        default=None, ge=2, description="subsample every group to this many rows (seeded) [no subsampling]"
    )
    null_groups: int = Field(
        default=8,
        ge=0,
        description="random groups of the same n drawn from the whole selection (0: none)",
    )
    sample_seed: int = Field(default=0, ge=0, description="seed of --equal-n and the null groups")
    batch_rows: int = Field(default=4096, ge=1, description="rows encoded at once (bounds memory)")
    scheduler: str | None = Field(default=None, description="dask scheduler address [local threads]")
    device: str = Field(
        default="auto", description=f"{DEVICE_HELP}; with --scheduler each worker resolves auto itself"
    )

    def shaping(self) -> dict[str, Any]:
        """The fields a re-run into the same output directory must repeat."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL}
