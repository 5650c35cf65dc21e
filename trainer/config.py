"""``ModelConfig`` and ``TrainConfig``: every option of ``bae train`` (parity defaults: docs/method.md).

Imports no torch, so the CLI stays quick to start."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bae.common.command import cli
from bae.common.configs import LayerRef, StrictModel
from bae.common.outputs import LocalOutput
from bae.common.selection import RowSelection

Architecture = Literal["bae", "relu_sae", "topk_sae"]
ObjectiveName = Literal["normalized", "paper"]
Standardization = Literal["global", "dimension", "none"]

# what a field left unset means under each objective (docs/method.md §3)
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "normalized": {
        "standardize": "global",
        "lr": 1e-2,
        "estimator": "scaled_sigmoid",
        "beta": 3e-3,
        "merge_every": 50,
        "typical_ratio": 10.0,
        "encoder_scale": True,
    },
    "paper": {
        "standardize": "none",
        "lr": 5e-4,
        "estimator": "ste",
        "lambda_entropy": 1e-7,
        "lambda_covariance": 1e-7,
        "merge_every": 0,
        "prune_reseed": False,
        "typical_ratio": 0.0,
        "encoder_scale": False,
    },
}
ONLY_FOR = {
    "beta": "normalized",
    "gamma": "normalized",
    "target_fvu": "normalized",
    "prune_reseed": "normalized",
    "lambda_entropy": "paper",
    "lambda_covariance": "paper",
}


class ModelConfig(StrictModel):
    """Shape and options of an autoencoder; the reference code's values are the defaults."""

    architecture: Architecture = "bae"
    d_model: int
    expansion: int = 4
    features: int | None = Field(
        default=None, description="decoder input width when it is not expansion × d_model (imported SAEs)"
    )
    encoder_bias: bool = True
    encoder_scale: bool = False
    decoder_bias: bool = True
    threshold: Literal["gt", "ge"] = "gt"
    estimator: Literal["ste", "sigmoid", "scaled_sigmoid"] = "ste"
    temperature: float = 1.0
    k_bits: int = 1
    topk: int = 32
    standardize: bool = False
    typical_radius: float | None = Field(
        default=None,
        description="rows whose squared norm in the normalized space exceeds this are atypical "
        "(massive activations): left out of training and of the FVU",
    )

    @property
    def n_features(self) -> int:
        """d' = expansion × d (or ``features``): the decoder's input width."""
        return self.features or self.expansion * self.d_model


DEFAULT_STEPS = 10_000
TRACKER_NAMING = ("tracker_project", "run_name")  # how trackers show a run: free to change on resume


class TrainConfig(RowSelection):
    """What to train on, the model, the objective, the optimizer, and the bookkeeping."""

    # data (and the row selection: valid_only, positions, val_fraction, split_seed)
    store: str = Field(description="activation store (path or URL)", json_schema_extra=cli("-s"))
    layer: LayerRef = Field(
        description="layer of the store to train on: its index, or a hook site's name (bae harvest --hook)",
        json_schema_extra=cli("-l"),
    )
    out: LocalOutput = Field(description="output run directory", json_schema_extra=cli("-o"))
    standardize: Standardization | None = Field(
        default=None,
        description="input scaling: one robust global scale (global), per dimension (dimension) or "
        "none [default: global for normalized, none for paper]",
    )
    standardize_rows: int = Field(
        default=65_536, ge=16, description="rows the scale is estimated on (held in memory)"
    )
    buffer_rows: int = Field(
        default=1 << 16,
        ge=1,
        description="rows shuffled together (at most the store's); memory ~ 2-3 x rows x d x 4 B",
    )
    prefetch: int = Field(
        default=2, ge=1, description="shuffle windows read ahead by a thread (at most 64 MiB of them, or one)"
    )
    # model
    architecture: Architecture = Field(default="bae", description="the model: bae, or a baseline SAE")
    expansion: int = Field(default=4, ge=1, description="d' / d")
    encoder_bias: bool = Field(default=True, description="bias before the step")
    encoder_scale: bool | None = Field(
        default=None,
        description="the encoder sees every dimension divided by its standard deviation in the training "
        "space (the reconstruction and its FVU do not) [default: on for normalized, off for paper]",
    )
    decoder_bias: bool = Field(default=True, description="bias of the reconstruction")
    threshold: Literal["gt", "ge"] = Field(default="gt", description="bit = z > 0 (gt) or z >= 0 (ge)")
    estimator: Literal["ste", "sigmoid", "scaled_sigmoid"] | None = Field(
        default=None,
        description="gradient of the step: ste, sigmoid(z/τ), or scaled_sigmoid (τ × the batch RMS of z) "
        "[default: scaled_sigmoid for normalized, ste for paper]",
    )
    temperature: float = Field(default=1.0, gt=0, description="sigmoid estimator temperature")
    k_bits: int = Field(default=1, ge=1, le=16, description="bits per decoded feature (k-bit decoding)")
    topk: int = Field(default=32, ge=1, description="active features of the topk_sae baseline")
    # objective
    objective: ObjectiveName = Field(
        default="normalized",
        description="normalized: FVU + beta x (code bits + gamma x redundancy bits); paper: the "
        "reference code's MSE + lambda terms",
    )
    beta: float | None = Field(
        default=None, ge=0, description="normalized: FVU a bit of code entropy must buy [default: 3e-3]"
    )
    gamma: float | None = Field(
        default=None, ge=0, description="normalized: weight of the pairwise redundancy bits [default: 1]"
    )
    target_fvu: float | None = Field(
        default=None, gt=0, lt=1, description="normalized: adapt beta during training to reach this FVU"
    )
    merge_every: int | None = Field(
        default=None,
        ge=0,
        description="steps between merges of duplicate bits, 0: never [default: 50; paper 0]",
    )
    merge_threshold: float = Field(
        default=0.95, gt=0, le=1, description="|correlation| above which two bits are duplicates"
    )
    prune_reseed: bool | None = Field(
        default=None,
        description="normalized, at each merge: switch off bits that buy less FVU than beta x their code "
        "bits, re-seed idle bits on the worst-reconstructed rows where that pays twice, and split "
        "bits that cover several features (an OR of them) where that pays "
        "[default: on for bae with k_bits 1 and merges, off with target_fvu; docs/method.md §3, §7]",
    )
    join: bool | None = Field(
        default=None,
        description="with prune_reseed, at each merge after the split: replace two or three correlated "
        "bits that cover one feature between them by one re-seeded bit where that pays "
        "[default: on with prune_reseed; docs/method.md §3, §7]",
    )
    polish: bool | None = Field(
        default=None,
        description="after the last step, refit the code on a sample of training rows by alternating "
        "minimization of the objective over hard codes (least-squares decoder, bits reassigned, "
        "linear-discriminant encoder rows, exact prune) while that lowers it "
        "[default: on with prune_reseed; docs/method.md §3]",
    )
    polish_rows: int = Field(
        default=16384, ge=2, description="training rows the polish fits on, taken evenly from every unit"
    )
    typical_ratio: float | None = Field(
        default=None,
        ge=0,
        description="rows farther than this x the 90th percentile of squared distances from the centre "
        "are atypical (massive activations: not trained on, not in the FVU); 0 keeps all "
        "[default: 10; paper 0]",
    )
    lambda_entropy: float | None = Field(
        default=None, ge=0, description="paper: weight of the minibatch entropy term [default: 1e-7]"
    )
    lambda_covariance: float | None = Field(
        default=None, ge=0, description="paper: weight of the covariance term, 0 skips it [default: 1e-7]"
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
    lr: float | None = Field(
        default=None, gt=0, description="Adam learning rate [default: 1e-2 for normalized, 5e-4 for paper]"
    )
    schedule: Literal["constant", "cosine"] = Field(default="constant", description="learning-rate schedule")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps")
    grad_clip: float | None = Field(default=None, gt=0, description="clip the gradient norm to this")
    seed: int = Field(default=0, ge=0, description="initialization and sampling seed")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="accelerate mixed precision"
    )
    tf32: bool = Field(
        default=False,
        description="float32 matrix products on CUDA's TF32 tensor cores (inputs rounded to 10 mantissa "
        "bits, float32 sums): faster, not exact; no effect off CUDA",
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
    tracker_project: str = Field(default="bae-train", description="project name given to the trackers")
    run_name: str | None = Field(
        default=None, description="run name shown by the trackers [the output folder's name]"
    )

    @field_validator("standardize", mode="before")
    @classmethod
    def _standardize(cls, value: Any) -> Any:
        """An earlier bae's boolean ``standardize`` (per-dimension or none) still reads."""
        if isinstance(value, bool):
            return "dimension" if value else "none"
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if self.tokens is not None and self.steps != DEFAULT_STEPS:
            raise ValueError("give either steps or tokens as the budget, not both")
        if self.entropy_start_steps is not None and self.entropy_start_tokens is not None:
            raise ValueError("give either entropy_start_steps or entropy_start_tokens, not both")
        if self.k_bits > 1 and self.architecture != "bae":
            raise ValueError("k_bits > 1 applies to the bae architecture only")
        if self.target_fvu is not None and self.architecture != "bae":
            raise ValueError("target_fvu applies to the bae architecture only")
        for name, objective in ONLY_FOR.items():
            if getattr(self, name) is not None and self.objective != objective:
                raise ValueError(f"{name} applies to objective {objective!r} only, not {self.objective!r}")
        for name, value in OBJECTIVE_DEFAULTS[self.objective].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        # a switched-off bit is a zero encoder row at bias −1: the moves and the polish need the bias
        one_bit = self.architecture == "bae" and self.k_bits == 1 and self.encoder_bias
        can_move = one_bit and self.merge_every != 0
        if self.prune_reseed and not can_move:
            raise ValueError(
                "prune_reseed needs the bae architecture, k_bits 1, an encoder bias and merge_every > 0 "
                "(it acts at merges)"
            )
        if self.prune_reseed is None:  # the moves fight target_fvu's dual ascent (docs/method.md §3)
            moves = self.objective == "normalized" and can_move and self.target_fvu is None
            object.__setattr__(self, "prune_reseed", moves)
        if self.join is None:
            object.__setattr__(self, "join", bool(self.prune_reseed))
        elif self.join and not self.prune_reseed:
            raise ValueError("join acts with the moves: it needs prune_reseed")
        if self.polish is None:
            object.__setattr__(self, "polish", bool(self.prune_reseed))
        elif self.polish and not (self.objective == "normalized" and one_bit):
            raise ValueError(
                "polish needs the normalized objective, the bae architecture, k_bits 1 and an encoder bias"
            )
        if self.gamma is None and self.objective == "normalized":  # R charges a correlated truth
            object.__setattr__(self, "gamma", 0.0 if self.prune_reseed else 1.0)
        if self.typical_ratio and (self.typical_ratio <= 1 or self.standardize == "none"):
            raise ValueError("typical_ratio must be 0 (all rows) or > 1 with standardize global/dimension")
        return self

    @property
    def learning_rate(self) -> float:
        """The resolved learning rate (set by the objective's defaults when not given)."""
        assert self.lr is not None
        return self.lr

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
        """The config a resumed run must repeat: all but the run directory's own location and
        ``allow_partial`` (a resumed run reads the units its checkpoint recorded) and the names the
        trackers show."""
        return self.model_dump(mode="json", exclude={"out", "allow_partial", *TRACKER_NAMING})

    @classmethod
    def as_recorded_today(cls, old: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's recorded config as today's ``recorded()`` would write it: earlier bae
        trained the paper objective with a boolean ``standardize`` and recorded None for defaults."""
        new = {**old}
        new.setdefault("encoder_scale", False)  # runs recorded before the option had none
        new.setdefault("tf32", False)  # likewise
        new.setdefault("prune_reseed", False)  # likewise
        new.setdefault("join", False)  # likewise
        new.setdefault("polish", False)  # likewise
        new.setdefault("polish_rows", cls.model_fields["polish_rows"].default)  # likewise
        for key in ("positions", "steps"):
            if key in new and new[key] is None:
                new[key] = cls.model_fields[key].default
        if "objective" not in new:
            new["objective"] = "paper"
            new["standardize"] = "dimension" if new.get("standardize") else "none"
            fill = {"merge_threshold": 0.95, "beta": None, "gamma": None, "target_fvu": None}
            new.update({k: v for k, v in fill.items() if k not in new})
            new.update({k: v for k, v in OBJECTIVE_DEFAULTS["paper"].items() if new.get(k) is None})
            # the scale was estimated once and lives in the weights; the row count cannot matter now
            new["standardize_rows"] = cls.model_fields["standardize_rows"].default
        return new

    def autoencoder_config(self, d_model: int, typical_radius: float | None = None) -> ModelConfig:
        """The model options of this config (every other ModelConfig field has one here)."""
        shared = set(ModelConfig.model_fields) - {"d_model", "standardize", "typical_radius"}
        return ModelConfig(
            d_model=d_model,
            standardize=self.standardize != "none",
            typical_radius=typical_radius,
            **self.model_dump(include=shared),
        )
