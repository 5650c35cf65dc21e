"""``ModelConfig`` and ``TrainConfig``: every option of ``bae train`` (parity defaults: docs/method.md).

Imports no torch, so the CLI stays quick to start."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from bae.common.command import cli
from bae.common.configs import StrictModel
from bae.common.selection import RowSelection

Architecture = Literal["bae", "relu_sae", "topk_sae"]


class ModelConfig(StrictModel):
    """Shape and options of an autoencoder; the reference code's values are the defaults."""

    architecture: Architecture = "bae"
    d_model: int
    expansion: int = 4
    encoder_bias: bool = True
    decoder_bias: bool = True
    threshold: Literal["gt", "ge"] = "gt"
    estimator: Literal["ste", "sigmoid"] = "ste"
    temperature: float = 1.0
    k_bits: int = 1
    topk: int = 32
    standardize: bool = False

    @property
    def n_features(self) -> int:
        """d' = expansion × d: the decoder's input width."""
        return self.expansion * self.d_model


DEFAULT_STEPS = 10_000


class TrainConfig(RowSelection):
    """What to train on, the model, the objective, the optimizer, and the bookkeeping."""

    # data (and the row selection: valid_only, positions, val_fraction, split_seed)
    store: str = Field(description="activation store (path or URL)", json_schema_extra=cli("-s"))
    layer: int = Field(description="layer of the store to train on", json_schema_extra=cli("-l"))
    out: str = Field(description="output run directory", json_schema_extra=cli("-o"))
    standardize: bool = Field(default=False, description="standardize inputs with the store's mean and std")
    standardize_rows: int | None = Field(default=1_000_000, ge=2, description="rows used to estimate them")
    buffer_rows: int = Field(
        default=1 << 16, ge=1, description="rows shuffled together; memory ~ 3 x rows x d x 4 B"
    )
    prefetch: int = Field(default=2, ge=1, description="shuffle windows read ahead by a background thread")
    # model
    architecture: Architecture = Field(default="bae", description="the model: bae, or a baseline SAE")
    expansion: int = Field(default=4, ge=1, description="d' / d")
    encoder_bias: bool = Field(default=True, description="bias before the step")
    decoder_bias: bool = Field(default=True, description="bias of the reconstruction")
    threshold: Literal["gt", "ge"] = Field(default="gt", description="bit = z > 0 (gt) or z >= 0 (ge)")
    estimator: Literal["ste", "sigmoid"] = Field(default="ste", description="gradient of the step")
    temperature: float = Field(default=1.0, gt=0, description="sigmoid estimator temperature")
    k_bits: int = Field(default=1, ge=1, le=16, description="bits per decoded feature (k-bit decoding)")
    topk: int = Field(default=32, ge=1, description="active features of the topk_sae baseline")
    # objective
    lambda_entropy: float = Field(default=1e-7, ge=0, description="weight of the minibatch entropy term")
    lambda_covariance: float = Field(
        default=1e-7, ge=0, description="weight of the covariance term (0 skips it)"
    )
    l1_coefficient: float = Field(default=1e-3, ge=0, description="L1 weight of the relu_sae baseline")
    entropy_start_steps: int | None = Field(
        default=None, ge=0, description="entropy term on from this step (default: a quarter of the budget)"
    )
    entropy_start_tokens: int | None = Field(default=None, ge=0, description="or from this many tokens")
    # optimization
    steps: int = Field(default=DEFAULT_STEPS, ge=1, description="budget in optimizer steps")
    tokens: int | None = Field(default=None, ge=1, description="budget in tokens (instead of steps)")
    batch_size: int = Field(default=512, ge=2, description="rows per step (per process)")
    lr: float = Field(default=5e-4, gt=0, description="Adam learning rate")
    schedule: Literal["constant", "cosine"] = Field(default="constant", description="learning-rate schedule")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps")
    grad_clip: float | None = Field(default=None, gt=0, description="clip the gradient norm to this")
    seed: int = Field(default=0, ge=0, description="initialization and sampling seed")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="accelerate mixed precision"
    )
    cpu: bool = Field(default=False, description="train on CPU even where a GPU is present")
    # bookkeeping
    log_every: int = Field(default=100, ge=1, description="steps between metric logs")
    val_every: int = Field(default=1000, ge=1, description="steps between validations")
    val_max_rows: int | None = Field(default=None, ge=1, description="cap on validation rows")
    checkpoint_every: int = Field(default=1000, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="checkpoints kept on disk")
    window_steps: int = Field(
        default=100, ge=1, description="steps in the firing-rate window (dense/dead counts)"
    )
    log_with: list[str] | None = Field(
        default=None, description="accelerate trackers, e.g. tensorboard, wandb"
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if self.tokens is not None and self.steps != DEFAULT_STEPS:
            raise ValueError("give either steps or tokens as the budget, not both")
        if self.entropy_start_steps is not None and self.entropy_start_tokens is not None:
            raise ValueError("give either entropy_start_steps or entropy_start_tokens, not both")
        if self.k_bits > 1 and self.architecture != "bae":
            raise ValueError("k_bits > 1 applies to the bae architecture only")
        return self

    def total_steps(self, world_size: int = 1) -> int:
        """The budget in optimizer steps; a step consumes ``batch_size × world_size`` tokens."""
        if self.tokens is not None:
            return max(1, -(-self.tokens // (self.batch_size * world_size)))
        return self.steps

    def entropy_start_step(self, world_size: int = 1) -> int:
        """First step with λ_H on; default a quarter of the budget (the reference's 500 of 2000)."""
        if self.entropy_start_steps is not None:
            return self.entropy_start_steps
        if self.entropy_start_tokens is not None:
            return -(-self.entropy_start_tokens // (self.batch_size * world_size))
        return self.total_steps(world_size) // 4

    def recorded(self) -> dict[str, Any]:
        """The config a resumed run must repeat: all but the run directory's own location."""
        return self.model_dump(mode="json", exclude={"out"})

    def autoencoder_config(self, d_model: int) -> ModelConfig:
        """The model options of this config (every ModelConfig field but d_model has one here)."""
        shared = set(ModelConfig.model_fields) - {"d_model"}
        return ModelConfig(d_model=d_model, **self.model_dump(include=shared))
