"""``ModelConfig`` and ``TrainConfig``: every option of ``bae train`` (BAE_METHOD.md parity defaults).

Imports no torch, so the CLI stays quick to start."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from bae.configs import StrictModel

Architecture = Literal["bae", "relu_sae", "topk_sae"]


class ModelConfig(StrictModel):
    """Shape and options of an autoencoder; BAE_METHOD.md §1 parity values are the defaults."""

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


class TrainConfig(StrictModel):
    """What to train on, the model, the objective, the optimizer, and the bookkeeping."""

    # data
    store: str
    layer: int
    positions: list[int] | None = None
    valid_only: bool = True
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    standardize: bool = False
    standardize_rows: int | None = Field(1_000_000, ge=2)
    buffer_rows: int = Field(1 << 16, ge=1, description="rows shuffled together; memory ~ 3 x rows x d x 4 B")
    prefetch: int = Field(2, ge=1)
    # model
    architecture: Architecture = "bae"
    expansion: int = Field(4, ge=1)
    encoder_bias: bool = True
    decoder_bias: bool = True
    threshold: Literal["gt", "ge"] = "gt"
    estimator: Literal["ste", "sigmoid"] = "ste"
    temperature: float = Field(1.0, gt=0)
    k_bits: int = Field(1, ge=1, le=16)
    topk: int = Field(32, ge=1)
    # objective
    lambda_entropy: float = Field(1e-7, ge=0)
    lambda_covariance: float = Field(1e-7, ge=0)
    l1_coefficient: float = Field(1e-3, ge=0)
    entropy_start_steps: int | None = Field(None, ge=0)
    entropy_start_tokens: int | None = Field(None, ge=0)
    # optimization
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(5e-4, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    # bookkeeping
    log_every: int = Field(100, ge=1)
    val_every: int = Field(1000, ge=1)
    val_max_rows: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    window_steps: int = Field(100, ge=1)
    log_with: list[str] | None = None

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if self.steps is not None and self.tokens is not None:
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
        return self.steps if self.steps is not None else 10_000

    def entropy_start_step(self, world_size: int = 1) -> int:
        """First step with λ_H on; default a quarter of the budget (the reference's 500 of 2000)."""
        if self.entropy_start_steps is not None:
            return self.entropy_start_steps
        if self.entropy_start_tokens is not None:
            return -(-self.entropy_start_tokens // (self.batch_size * world_size))
        return self.total_steps(world_size) // 4

    def autoencoder_config(self, d_model: int) -> ModelConfig:
        """The model options of this config (every ModelConfig field but d_model has one here)."""
        shared = set(ModelConfig.model_fields) - {"d_model"}
        return ModelConfig(d_model=d_model, **self.model_dump(include=shared))
