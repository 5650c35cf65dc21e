"""Options of ``bae export saelens|sparsify`` and ``bae import-checkpoint`` (no torch imported)."""

from __future__ import annotations

from pydantic import Field

from bae.common.command import cli
from bae.common.configs import StrictModel
from bae.common.outputs import LocalOutput


class ExportCheckpointConfig(StrictModel):
    """A bae checkpoint to write in another tool's format."""

    checkpoint: str = Field(
        description="a bae model directory or `bae train` output", json_schema_extra=cli(argument=True)
    )
    out: LocalOutput = Field(description="directory to write", json_schema_extra=cli(argument=True))
    hook_name: str | None = Field(
        default=None,
        description="the hook (SAELens) or hookpoint (sparsify) the rows were taken at "
        "[derived from the checkpoint's layer: blocks.L.hook_resid_pre, layers.{L-1}]",
    )
    store: str | None = Field(
        default=None,
        description="the store the checkpoint was trained on, if its recorded path has moved (for the "
        "LLM, its context length and hook sites)",
        json_schema_extra=cli("-s"),
    )


class ImportCheckpointConfig(StrictModel):
    """A SAELens or sparsify SAE to turn into a bae checkpoint."""

    src: str = Field(
        description="a SAELens SAE directory (cfg.json + sae_weights.safetensors) or a sparsify one "
        "(cfg.json + sae.safetensors, or a run directory holding one hookpoint)",
        json_schema_extra=cli(argument=True),
    )
    out: LocalOutput = Field(
        description="directory to write the bae model to", json_schema_extra=cli(argument=True)
    )
    store: str | None = Field(
        default=None,
        description="the store of the states it was trained on: recorded, so that `bae features` and "
        "`bae evaluate` check the checkpoint against the store they are given",
        json_schema_extra=cli("-s"),
    )
    layer: int | None = Field(
        default=None,
        description="the store layer it reads [from its hook name: blocks.L.hook_resid_pre = L, "
        "blocks.L.hook_resid_post and sparsify's layers.L = L+1, or the store's hook site of that name]",
        json_schema_extra=cli("-l"),
    )
