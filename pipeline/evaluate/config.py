"""``EvaluateConfig``: which checkpoints, over which documents, with which model, and how."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from bae.common.command import cli
from bae.common.configs import LayerRef, StrictModel
from bae.common.devices import DEVICE_HELP

EVALUATE_JSON = "evaluate.json"
# options that change how fast a run goes, not what it measures
OPERATIONAL = ("out", "bootstrap", "bootstrap_seed", "confidence", "device")


class EvaluateConfig(StrictModel):
    """Splice each checkpoint's reconstruction into the LLM at its layer and measure the damage."""

    checkpoints: list[str] = Field(
        default_factory=list,
        description="autoencoder (model dir or `bae train` out); repeat it",
        json_schema_extra=cli("-a", flag="--checkpoint"),
    )
    store: str | None = Field(
        default=None,
        description="the store the checkpoints were trained on: its model, corpus, split and layer mean "
        "[the checkpoint's recorded store]",
        json_schema_extra=cli("-s"),
    )
    model: str | None = Field(
        default=None,
        description="LLM: hub id, local directory or .gguf file [the store's model]",
        json_schema_extra=cli("-m"),
    )
    corpus: list[str] = Field(
        default_factory=list,
        description="held-out documents (files, dirs, globs, staicc:NAME[:SPLIT]; repeatable) "
        "[the store's corpus, validation split only]",
    )
    text_field: str | None = Field(
        default=None, description="text field of JSON/Parquet records [the store's]"
    )
    positions: Literal["all", "last"] = Field(
        default="all",
        description="where the state is replaced and the distributions compared: every valid token, or "
        "the last token of each document (the ICL setting)",
    )
    layer: LayerRef | None = Field(
        default=None,
        description="layer to splice at: its index or a hook site's name [each checkpoint's layer]",
        json_schema_extra=cli("-l"),
    )
    keep_atypical: bool = Field(
        default=False,
        description="leave a checkpoint's atypical rows (massive activations it was not trained on) "
        "clean instead of replacing them",
    )
    model_dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        default=None, description="compute dtype [the store's]"
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="evaluate at most this many tokens (whole windows) [all held out]"
    )
    unit_tokens: int = Field(
        default=8192, ge=1, description="tokens per resumable unit of documents (whole windows)"
    )
    batch_tokens: int = Field(
        default=4096,
        ge=1,
        description="token budget of one forward batch; memory ~ 3 x batch_tokens x vocabulary x 4 B",
    )
    bootstrap: int = Field(
        default=1000, ge=0, description="bootstrap replicates resampling documents (0: off)"
    )
    bootstrap_seed: int = Field(default=0, ge=0, description="seed of the bootstrap replicates")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="bootstrap interval coverage")
    out: str = Field(default="evaluate", description="output directory", json_schema_extra=cli("-o"))
    device: str = Field(
        default="auto",
        description=f"{DEVICE_HELP}; auto under torchrun/accelerate: each process its own GPU",
    )

    def shaping(self) -> dict[str, Any]:
        """The fields that decide what is measured (recorded in ``evaluate.json``)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL}
