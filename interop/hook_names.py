"""Where a checkpoint's rows came from, named as SAELens (TransformerLens hooks) and sparsify
(module hookpoints) name it, and back.

bae stores HF ``hidden_states[L]``: 0 is the embedding output, ``L`` the output of block ``L − 1``
(= the input of block ``L``), and the last index ``n_layers`` the output of the final norm. So

- TransformerLens: ``blocks.L.hook_resid_pre`` for L < n_layers. The last index has no exact
  TransformerLens hook (``ln_final.hook_normalized`` is taken before the norm's weight), so it
  needs ``--hook-name``;
- sparsify: the base model's module whose output it is: ``embed_tokens`` for 0, ``layers.{L-1}`` (a
  block's output) for 0 < L < n_layers and ``norm`` (the final norm) for L = n_layers, with GPT-2's
  and GPT-NeoX's own names (``drop``/``h``/``ln_f``, ``emb_dropout``/``layers``/``final_layer_norm``).

A store made with ``bae harvest --hook`` records its hook sites; a site named by a TransformerLens
hook keeps that name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bae.common.errors import BaeError
from bae.trainer.provenance import Provenance


@dataclass
class Source:
    """A checkpoint's provenance and, when its store can be opened, the store's metadata."""

    provenance: Provenance
    store_meta: dict[str, Any] | None = None

    @classmethod
    def of(cls, provenance: Provenance, store: str | None = None) -> Source:
        """``store`` (given by the user: must open) or the recorded store (skipped if it has moved)."""
        from bae.stores import ActivationStore

        url = store or provenance.store
        if url is None:
            return cls(provenance)
        try:
            return cls(provenance, dict(ActivationStore.open(url).meta))
        except (BaeError, OSError):
            if store is not None:
                raise
            return cls(provenance)

    @property
    def model_record(self) -> dict[str, Any]:
        model = self.provenance.model or (self.store_meta or {}).get("model")
        return model if isinstance(model, dict) else {"id": model}

    @property
    def model_name(self) -> str | None:
        return self.model_record.get("id")

    @property
    def layer(self) -> int:
        if self.provenance.layer is None:
            raise BaeError("the checkpoint records no layer: pass --hook-name")
        return self.provenance.layer

    @property
    def context_size(self) -> int | None:
        return (self.store_meta or {}).get("context_length")

    @property
    def site(self) -> dict[str, Any] | None:
        """The store's hook-site record of the checkpoint's layer (``bae harvest --hook``), if any."""
        for record in (self.store_meta or {}).get("sites") or []:
            if int(record["layer"]) == self.layer:
                return record
        return None

    def hidden_state(self) -> tuple[int, dict[str, Any]]:
        """(hidden_states index, the LLM's config or {} when unknown); a module-hook site that is no
        hidden state needs ``--hook-name``."""
        site = self.site
        index = self.layer if site is None else site.get("hidden_state")
        if index is None:
            raise BaeError(f"layer {self.layer} is the hook site {site and site['name']}: pass --hook-name")
        return int(index), llm_config(self.model_record)


def llm_config(model: dict[str, Any]) -> dict[str, Any]:
    """The LLM's ``config.json`` (its text model's part) from a local directory or the HF cache; {}
    when neither has it."""
    model_id = model.get("id")
    if not isinstance(model_id, str):
        return {}
    path: Path | None = Path(model_id) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model_id, "config.json", revision=model.get("revision"))
        except ValueError:  # not a repo id
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        return {}
    config = json.loads(path.read_text())
    return config.get("text_config", config)


def n_layers(config: dict[str, Any]) -> int | None:
    value = config.get("num_hidden_layers", config.get("n_layer"))
    return int(value) if value is not None else None


# the base model's modules whose outputs are hidden_states[0], the blocks and hidden_states[n_layers]
MODULES = {"gpt2": ("drop", "h", "ln_f"), "gpt_neox": ("emb_dropout", "layers", "final_layer_norm")}
LLAMA_STYLE = ("embed_tokens", "layers", "norm")


def saelens_hook(source: Source) -> str:
    """The TransformerLens hook of the checkpoint's rows (see the module docstring)."""
    site = source.site
    if site is not None and site.get("tl"):
        return str(site["name"])
    index, config = source.hidden_state()
    if index == n_layers(config):
        raise BaeError(
            f"layer {index} is the LLM's last hidden state, taken after the final norm's weight: no "
            "TransformerLens hook holds exactly that (ln_final.hook_normalized is before the weight); "
            "pass --hook-name"
        )
    return f"blocks.{index}.hook_resid_pre"


def sparsify_hookpoint(source: Source) -> str:
    """The sparsify hookpoint: the base model's module whose output is the rows."""
    index, config = source.hidden_state()
    embedding, blocks, norm = MODULES.get(config.get("model_type", ""), LLAMA_STYLE)
    if index == 0:
        return embedding
    return norm if index == n_layers(config) else f"{blocks}.{index - 1}"
