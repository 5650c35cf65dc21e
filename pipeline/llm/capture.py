"""Capture hidden states of chosen layers with forward hooks, stopping after the deepest one.

Layer numbering follows HF ``output_hidden_states`` (docs/method.md): 0 is the embedding output
(the input of block 0), ``l`` is the output of block ``l-1``, and the last index (``n_layers``) is
the output of the final norm, as HF reports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from bae.common.errors import BaeError

_BLOCK_NAMES = ("layers", "h", "blocks", "layer")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


class _StopForward(Exception):
    """Raised from a hook once the deepest requested layer is captured: the rest never runs."""


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.layers``, ``transformer.h``, ``gpt_neox.layers``...)."""
    base = model.base_model
    n = model.config.num_hidden_layers
    for name in _BLOCK_NAMES:
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) == n:
            return blocks
    raise BaeError(f"{type(model).__name__}: cannot find its {n} decoder blocks to hook")


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm applied after the last block (HF's last ``hidden_states`` entry includes it)."""
    base = model.base_model
    for name in _NORM_NAMES:
        norm = getattr(base, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise BaeError(f"{type(model).__name__}: cannot find its final norm to capture the last layer")


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Sorted unique layers, each within 0..n_layers (else a one-line error giving the range)."""
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad:
        raise BaeError(
            f"layers {bad} out of range: this model has layers 0..{n_layers} "
            f"(0 = embeddings, {n_layers} = after the final norm)"
        )
    if not layers:
        raise BaeError("no layers requested; pass --layers, e.g. --layers 6")
    return sorted(set(layers))


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerCapture:
    """Hooks that record the requested layers and cut the forward short after the deepest one.

    Use as a context manager; :meth:`run` returns ``{layer: tensor[batch, seq, d]}``.
    """

    def __init__(self, model: PreTrainedModel, layers: Sequence[int]):
        self.model = model
        self.n_layers = int(model.config.num_hidden_layers)
        self.layers = check_layers(layers, self.n_layers)
        self.deepest = self.layers[-1]
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _record(self, layer: int, value: torch.Tensor) -> None:
        if layer in self.layers:
            self._captured[layer] = value.detach()
        if layer == self.deepest:
            raise _StopForward

    def __enter__(self) -> LayerCapture:
        blocks = decoder_blocks(self.model)

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._record(0, args[0] if args else kwargs["hidden_states"])

        self._handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for index in range(min(self.deepest, self.n_layers - 1)):
            layer = index + 1

            def hook(_module: nn.Module, _args: Any, output: Any, layer: int = layer) -> None:
                self._record(layer, _hidden(output))

            self._handles.append(blocks[index].register_forward_hook(hook))
        if self.deepest == self.n_layers:

            def norm_hook(_module: nn.Module, _args: Any, output: Any) -> None:
                self._record(self.n_layers, _hidden(output))

            self._handles.append(final_norm(self.model).register_forward_hook(norm_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """One forward of the base model up to the deepest requested layer."""
        if not self._handles:
            raise RuntimeError("LayerCapture.run outside its `with` block")
        self._captured = {}
        with contextlib.suppress(_StopForward):
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        missing = set(self.layers) - set(self._captured)
        if missing:
            raise RuntimeError(f"hooks did not capture layers {sorted(missing)}")
        captured, self._captured = self._captured, {}
        return captured
