"""Tiny randomly initialised causal LMs with a real (trained-here) byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<bos>", "<eos>"]
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Binary autoencoders turn hidden states into bits.",
    "A corpus is a list of documents; each document is text.",
] * 20


def make_tokenizer() -> T.PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) with pad/bos/eos specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_config(kind: str, vocab: int, max_positions: int = 128) -> T.PretrainedConfig:
    common: dict[str, Any] = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "gpt2":
        return T.GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=max_positions, **common)
    if kind == "llama":
        return T.LlamaConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            **common,
        )
    if kind == "neox":
        return T.GPTNeoXConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=max_positions,
            **common,
        )
    raise ValueError(kind)


def save_tiny_model(kind: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``kind`` model plus the tokenizer to ``path``; returns ``path``."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
