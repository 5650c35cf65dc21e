"""``bae features`` options: one ``FeaturesConfig`` (with an ``interpret`` section), recorded in every output.

Each output file records the fields that shaped it (``stage_config``), so a re-run with the same
options reuses it and a re-run with different ones is refused with the differing fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from bae.common.command import cli
from bae.common.configs import LayerRef, StrictModel, require_same_config
from bae.common.devices import DEVICE_HELP
from bae.common.errors import BaeError
from bae.common.outputs import LocalOutput
from bae.common.selection import SplitSelection
from bae.common.urls import with_resolved_paths


class InterpretConfig(StrictModel):
    """ComSem interpretation (docs/method.md) and the LLM that does it."""

    backend: Literal["openai", "transformers"] = Field(
        default="openai",
        description="openai: any OpenAI-compatible chat endpoint; transformers: a local model",
    )
    model: str = Field(
        default="gpt-4o-mini",
        description="chat model name, or a local model dir/.gguf/hub id",
        json_schema_extra=cli(flag="--llm"),
    )
    base_url: str | None = Field(
        default=None, description="endpoint base URL (…/v1); default: $BAE_LLM_BASE_URL"
    )
    api_key_env: str = Field(default="BAE_LLM_API_KEY", description="environment variable holding the key")
    features_per_token: int = Field(
        default=10, ge=1, description="each token is assigned to its top-N features"
    )
    min_samples: int = Field(default=6, ge=1, description="fewest assigned samples to interpret a feature")
    n_explain: int = Field(default=5, ge=1, description="top-scoring samples shown to the explainer")
    n_test: int = Field(default=8, ge=1, description="further assigned samples the judge sees (at most)")
    n_negative: int = Field(default=4, ge=0, description="non-assigned samples the judge sees")
    threshold: float = Field(default=0.5, ge=0, le=1, description="interpretable: score > threshold")
    max_features: int | None = Field(
        default=None, ge=1, description="interpret at most this many eligible features (a seeded sample)"
    )
    negative_pool: int = Field(default=512, ge=1, description="random tokens kept as negative candidates")
    temperature: float = 0.0
    max_tokens: int = Field(default=40, ge=1, description="longest answer (tokens)")
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0, description="retries of a failed request")
    backoff_s: float = Field(default=1.0, ge=0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(default=30.0, ge=0)
    requests_per_second: float | None = Field(default=None, gt=0, description="rate limit (None: none)")
    concurrency: int = Field(default=4, ge=1, description="requests in flight")
    cache_dir: str | None = Field(default=None, description="prompt/answer cache [<out>/llm_cache]")


# the fields that decide which rows a pass reads and how they are encoded
SCAN_FIELDS = (
    "store",
    "checkpoint",
    "layer",
    "valid_only",
    "positions",
    "split",
    "val_fraction",
    "split_seed",
    "max_rows",
)


class FeaturesConfig(SplitSelection):
    """Frequencies, top contexts, interpretation and comparison of autoencoder features over a store."""

    store: str | None = Field(
        default=None, description="activation store (path or URL)", json_schema_extra=cli("-s")
    )
    checkpoint: str | None = Field(
        default=None, description="autoencoder (model dir or `bae train` out)", json_schema_extra=cli("-a")
    )
    checkpoints: list[str] = Field(
        default_factory=list,
        description="an autoencoder to compare; repeat it",
        json_schema_extra=cli("-a", flag="--checkpoint"),
    )
    out: LocalOutput = Field(default="features", description="output directory", json_schema_extra=cli("-o"))
    layer: LayerRef | None = Field(
        default=None,
        description="store layer: its index or a hook site's name [the checkpoint's layer]",
        json_schema_extra=cli("-l"),
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="use only the first units up to this many rows"
    )
    batch_rows: int = Field(default=1024, ge=1, description="rows encoded at once (bounds memory)")
    scheduler: str | None = Field(default=None, description="dask scheduler address [local threads]")
    device: str = Field(
        default="auto",
        description=f"{DEVICE_HELP} (not mps: the sums are float64); with --scheduler each worker "
        "resolves auto itself",
    )
    dense_thresholds: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.5],
        description="firing frequencies that count as dense, e.g. 0.1,0.5",
    )
    top_k: int = Field(default=20, ge=1, description="contexts kept per feature")
    context_before: int = Field(default=16, ge=0, description="tokens shown before the active one")
    context_after: int = Field(default=4, ge=0, description="tokens shown after the active one")
    z_score: bool = Field(default=False, description="SAE scores: activation z-scored per feature")
    seed: int = Field(default=0, ge=0, description="tie-breaking and sampling seed")
    tokenizer: str | None = Field(default=None, description="tokenizer to decode with [the store's model]")
    interpret: InterpretConfig = Field(default_factory=InterpretConfig)

    @field_validator("dense_thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < t < 1 for t in v):
            raise ValueError("expected one or more thresholds in (0, 1)")
        return sorted(set(v))

    def need(self, field: str) -> Any:
        """A field the command cannot run without (BaeError naming it)."""
        value = getattr(self, field)
        if value in (None, []):
            raise BaeError(f"no {field} given: pass --{field.replace('_', '-')} or set `{field}` in --config")
        return value

    def for_checkpoint(self, checkpoint: str, out: str | Path) -> FeaturesConfig:
        """This config applied to one of the compared checkpoints."""
        return self.model_copy(update={"checkpoint": checkpoint, "checkpoints": [], "out": str(out)})

    def stage_config(self, stage: str) -> dict[str, Any]:
        """The fields that shape one stage's output (what a re-run must match); operational ones
        (output path, scheduler, device, batch size, retries, concurrency, cache) are left out."""
        data = self.model_dump(mode="json")
        scan = list(SCAN_FIELDS)
        contexts = ["top_k", "z_score", "seed", "tokenizer", "context_before", "context_after"]
        sampling = ["features_per_token", "n_explain", "n_test", "n_negative", "negative_pool"]
        judging = [
            "backend",
            "model",
            "min_samples",
            "threshold",
            "max_features",
            "temperature",
            "max_tokens",
        ]
        keep = {"frequency": [*scan, "dense_thresholds"], "contexts": scan + contexts}.get(
            stage, [*scan, *contexts, "dense_thresholds"]
        )
        picked = {k: data[k] for k in keep}
        if stage != "frequency":
            fields = sampling if stage == "contexts" else sampling + judging
            picked["interpret"] = {k: data["interpret"][k] for k in fields}
        return picked


def check_recorded(what: str, recorded: dict[str, Any] | None, config: FeaturesConfig, stage: str) -> bool:
    """True if an output recorded with ``recorded`` can be reused; BaeError if it differs."""
    if recorded is None:
        return False
    paths = ("store", "checkpoint")  # compared resolved: one store or checkpoint however spelled
    new = config.stage_config(stage)
    require_same_config(what, with_resolved_paths(recorded, paths), with_resolved_paths(new, paths))
    return True
