"""``Provenance``: what a checkpoint records about the data it was trained on.

Written by ``bae train`` into the checkpoint's ``config.json`` (under ``source``) and read by every
stage that applies the checkpoint to a store, to refuse a store it does not belong to.
"""

from __future__ import annotations

from pydantic import Field

from bae.common.configs import StrictModel


class Provenance(StrictModel):
    """The store, LLM, layer and rows an autoencoder was trained on."""

    store: str | None = Field(default=None, description="the activation store it was trained on")
    model: dict | str | None = Field(default=None, description="the LLM that made the store (id, revision)")
    layer: int | None = Field(default=None, description="hidden_states index of the layer")
    d_model: int | None = Field(default=None, description="width of the hidden states")
    positions: list[int] | None = Field(default=None, description="token positions trained on (None: all)")
    valid_only: bool = True
    val_fraction: float = 0.1
    split_seed: int = 0
    corpus_fingerprint: str | None = Field(default=None, description="the store's corpus fingerprint")
    units: str | None = Field(default=None, description="store units read, as ranges (None: not recorded)")
    n_units: int | None = Field(default=None, description="units the store has in all")
