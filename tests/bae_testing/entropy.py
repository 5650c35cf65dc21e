"""Helpers for `bae entropy` tests: stores whose BAE codes are known exactly, saved hand-built BAEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bae.stores import ActivationStore, StoreLayout
from bae.trainer import ModelConfig, build_autoencoder
from bae.trainer.provenance import Provenance

LAYER = 4
D = 8


def known_bits(n_docs: int, doc_len: int, seed: int = 0) -> np.ndarray:
    """bool [n_docs * doc_len, D]: at position t the first min(t, D) bits are fair coins, the rest 0."""
    rng = np.random.default_rng(seed)
    bits = rng.random((n_docs, doc_len, D)) < 0.5
    bits &= np.arange(D)[None, None, :] < np.arange(doc_len)[None, :, None]
    return bits.reshape(-1, D)


def make_known_store(
    path: Path, n_docs: int = 40, doc_len: int = 10, unit_rows: int = 50, seed: int = 0, k_values: int = 4
) -> tuple[ActivationStore, dict[str, np.ndarray]]:
    """A store whose rows are ±1 along the axes (bit j set <=> h_j > 0) plus noise below 0.5.

    Every document carries a metadata field ``k`` (doc index mod ``k_values``); position 0 is invalid.
    """
    bits = known_bits(n_docs, doc_len, seed)
    n = len(bits)
    rng = np.random.default_rng(seed + 1)
    states = np.where(bits, 1.0, -1.0) + rng.uniform(-0.4, 0.4, (n, D))
    idx = np.arange(n)
    rows = {
        "token_ids": (idx * 7) % 13,
        "doc_ids": idx // doc_len,
        "positions": idx % doc_len,
        "valid": idx % doc_len != 0,
    }
    layout = StoreLayout(n_rows=n, unit_rows=unit_rows, d_model=D, layers=[LAYER], dtype="float32")
    store = ActivationStore.create(
        str(path),
        layout,
        attrs={"config": {"seed": seed}},
        documents={"k": np.arange(n_docs) % k_values, "name": np.array([f"d{i % 3}" for i in range(n_docs)])},
    )
    for unit in range(store.n_units):
        a, b = store.unit_range(unit)
        store.write_unit(unit, {LAYER: states[a:b]}, **{k: v[a:b] for k, v in rows.items()})
    return store, {"bits": bits, "states": states, **rows}


def save_bae(
    path: Path,
    d: int = D,
    layer: int = LAYER,
    identity: bool = True,
    expansion: int = 1,
    positions: list[int] | None = None,
    seed: int = 0,
    typical_radius: float | None = None,
) -> Path:
    """A BAE whose encoder is the identity (recovers the store's bits exactly) or seeded random;
    ``typical_radius``: the squared norm beyond which it counts a row as atypical."""
    torch.manual_seed(seed)
    config = ModelConfig(d_model=d, expansion=expansion, typical_radius=typical_radius)
    model = build_autoencoder(config, Provenance(layer=layer, d_model=d, positions=positions))
    if identity:
        with torch.no_grad():
            model.encoder.weight.copy_(torch.eye(d * expansion, d))
            model.encoder.bias.zero_()
    return model.save_pretrained(path)


def exact_entropy(bits: np.ndarray, groups: np.ndarray) -> dict[int, float]:
    """Σ_j H_b(p̂_j) per group, straight from the bits."""
    out = {}
    for g in np.unique(groups):
        p = bits[groups == g].mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.nan_to_num(p * np.log2(p)) + np.nan_to_num((1 - p) * np.log2(1 - p)))
        out[int(g)] = float(h.sum())
    return out
