"""``bae export dashboard`` options (kept apart from the exporter so the CLI imports no torch)."""

from __future__ import annotations

from pydantic import Field

from bae.common.command import cli
from bae.common.configs import StrictModel
from bae.common.outputs import LocalOutput


class DashboardExportConfig(StrictModel):
    """Features of a ``bae features contexts`` output as SAEDashboard / Neuronpedia batch files."""

    features: str = Field(
        description="a `bae features contexts` (or `interpret`) output directory",
        json_schema_extra=cli(argument=True),
    )
    out: LocalOutput = Field(description="directory for batch-<n>.json files", json_schema_extra=cli("-o"))
    store: str | None = Field(
        default=None,
        description="activation store [the one contexts.json records]",
        json_schema_extra=cli("-s"),
    )
    checkpoint: str | None = Field(
        default=None, description="autoencoder [the one contexts.json records]", json_schema_extra=cli("-a")
    )
    model_id: str | None = Field(
        default=None, description="Neuronpedia model id [the store's model, last path part]"
    )
    sae_set: str = Field(default="bae", description="Neuronpedia source-set name")
    logits: bool = Field(
        default=True,
        description="logit tables from the store's LLM unembedding (loads the LLM); off: left empty",
    )
    batch_features: int = Field(default=128, ge=1, description="features per batch-<n>.json")
