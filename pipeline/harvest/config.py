"""``HarvestConfig``: everything that decides the contents of a harvested store, and where it goes."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator

from bae.common.command import cli
from bae.common.configs import StrictModel, comma_list
from bae.common.errors import BaeError
from bae.common.selection import PositionChoice, parse_positions
from bae.pipeline.harvest.corpus import BUILTIN
from bae.stores.claims import LEASE_SECONDS

DEFAULT_BUILTIN_TOKENS = 65_536
ROWS_PER_UNIT_TARGET = 4096


class HarvestConfig(StrictModel):
    """Everything that decides the contents of a harvested store, and where to write it."""

    out: str = Field(
        default="activations.zarr",
        validation_alias=AliasChoices("out", "output"),  # config files written for the old name still load
        description="store path or fsspec URL",
        json_schema_extra=cli("-o", hidden=["--output"]),
    )
    model: str | None = Field(
        default=None,
        description="LLM: hub id, local directory or .gguf file [embedded SmolLM2-135M-Instruct]",
        json_schema_extra=cli("-m"),
    )
    model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="compute dtype; auto = bfloat16 on CUDA, float32 on CPU"
    )
    device_map: str | None = Field(
        default=None, description="accelerate device_map (e.g. 'auto') for large models"
    )
    corpus: list[str] = Field(
        default_factory=list,
        description="files, dirs, globs, saved datasets, staicc:NAME[:SPLIT]; repeatable [Python's own docs]",
    )
    text_field: str = Field(default="text", description="text field of JSON/JSONL/Parquet/dataset records")
    line_docs: bool = Field(default=False, description="plain text: one document per line")
    encoding_errors: Literal["strict", "replace"] = Field(default="strict", description="undecodable bytes")
    mode: Literal["packed", "document"] = Field(
        default="packed", description="pack documents, or one per window"
    )
    context_length: int = Field(default=512, ge=2, description="tokens per forward window")
    bos: Literal["auto", "always", "never"] = Field(
        default="auto", description="start every window with BOS?"
    )
    positions: PositionChoice = Field(
        default="all", description="positions stored: all, last (of each document), or e.g. 0-63,80"
    )
    layers: list[int] | None = Field(
        default=None,
        description="HF hidden_states indices, e.g. 3,6,9 [n_layers // 2]",
        json_schema_extra=cli("-l"),
    )
    hooks: list[str] = Field(
        default_factory=list,
        description="also capture a module's output or input: its path in the HF model with :output "
        "(default) or :input, e.g. model.layers.5.mlp, or blocks.L.hook_resid_pre / hook_resid_post / "
        "hook_attn_out / hook_mlp_out (TransformerLens names); a module returning a tuple gives its first "
        "tensor; repeatable [none; with hooks, --layers defaults to none]",
        json_schema_extra=cli(flag="--hook"),
    )
    store_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16", description="storage dtype"
    )
    overflow: Literal["error", "clamp"] = Field(
        default="error", description="values beyond the storage range"
    )
    compressor: Literal["none", "zstd"] = Field(default="none", description="chunk compression")
    unit_rows: int | None = Field(default=None, ge=1, description="rows per unit [~4096, whole windows]")
    batch_tokens: int = Field(default=8192, ge=1, description="token budget of one forward batch")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description=f"stop after this many input tokens [all; embedded corpus: {DEFAULT_BUILTIN_TOKENS}]",
    )
    storage_options: dict[str, Any] | None = Field(
        default=None,
        description="fsspec options for URL corpora and the store, as JSON or a config-file mapping, "
        'e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' (keys of s3fs/gcsfs; their environment '
        "variables apply where these say nothing); never recorded or printed, so it may hold secrets",
        exclude=True,  # out of every dump: the store's config, diffs, provenance
        repr=False,
    )
    lease_seconds: float = Field(
        default=LEASE_SECONDS,
        gt=0,
        description="lease on a unit a process computes, so independent processes on one local store "
        "share its units (renewed while held; a killed process's units are taken over when it expires)",
    )

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, value: Any) -> Any:
        try:
            return parse_positions(value)
        except BaeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("storage_options", mode="before")
    @classmethod
    def _storage_options(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:  # the message must not quote the value: it may hold secrets
            raise ValueError(f"not a JSON object ({exc.msg} at character {exc.pos})") from None

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("hooks", mode="before")
    @classmethod
    def _hooks(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [part for item in value for part in comma_list(item)]
        return comma_list(value)

    def recorded(self) -> dict[str, Any]:
        """The config as recorded in the store and compared on resume: all but the store's own
        location, so a store that was moved or copied still resumes, and the lease length, which
        processes sharing the store may set each their own way. An empty hooks list is not recorded, so
        stores made before ``--hook`` existed still resume."""
        unrecorded = {"out", "lease_seconds"} | (set() if self.hooks else {"hooks"})
        return self.model_dump(mode="json", exclude=unrecorded)

    @property
    def uses_builtin(self) -> bool:
        return not self.corpus or self.corpus == [BUILTIN]

    @property
    def token_budget(self) -> int | None:
        if self.max_tokens is None and self.uses_builtin:
            return DEFAULT_BUILTIN_TOKENS
        return self.max_tokens

    @property
    def rows_per_unit(self) -> int:
        """``unit_rows``, or ~4096 rows as a whole number of full windows."""
        if self.unit_rows is not None:
            return self.unit_rows
        return max(self.context_length, ROWS_PER_UNIT_TARGET // self.context_length * self.context_length)
