"""Turn a store's token ids back into text: the tokenizer of the store's model, or the ids themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bae.common.errors import BaeError, first_line
from bae.stores import ActivationStore


def load_store_tokenizer(store: ActivationStore, override: str | None = None) -> Any | None:
    """The tokenizer named by ``override`` or by the store's model; None for a store without a model."""
    from transformers import AutoTokenizer

    from bae.pipeline.llm.load import EMBEDDED_ID, convert_gguf, embedded_gguf, file_sha256

    model = store.meta.get("model") or {}
    spec = override or model.get("id")
    if not spec:
        return None
    try:
        if spec == EMBEDDED_ID or spec.lower().endswith(".gguf"):
            gguf = embedded_gguf() if spec == EMBEDDED_ID else Path(spec)
            return AutoTokenizer.from_pretrained(convert_gguf(gguf, file_sha256(gguf)))
        revision = None if override else model.get("revision")
        if revision and not str(revision).startswith("gguf-"):
            return AutoTokenizer.from_pretrained(spec, revision=revision)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise BaeError(
            f"cannot load the tokenizer {spec!r} to decode store {store.url} "
            f"({first_line(exc)}); pass --tokenizer DIR"
        ) from None


class TokenText:
    """Decode token ids with a tokenizer, or show them as ``[id]`` when there is none."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.tokenizer is None:
            return "".join(f"[{i}]" for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
