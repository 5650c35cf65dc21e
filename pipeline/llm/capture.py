"""Capture hidden states of chosen layers and hook sites with forward hooks, stopping the forward
as soon as all of them are captured.

Layer numbering follows HF ``output_hidden_states`` (docs/method.md): 0 is the embedding output
(the input of block 0), ``l`` is the output of block ``l-1``, and the last index (``n_layers``) is
the output of the final norm, as HF reports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from bae.common.errors import BaeError

_BLOCK_NAMES = ("layers", "h", "blocks", "layer")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
SiteIO = Literal["output", "input"]


@dataclass(frozen=True)
class Site:
    """One captured site: the module, input or output, the TransformerLens name it was given by
    (if any), its key on the store's layer axis, and the ``hidden_states`` index it equals (if any)."""

    module: str
    io: SiteIO
    tl: str | None
    layer: int
    hidden_state: int | None

    @property
    def name(self) -> str:
        """How the site is shown and addressed: the TransformerLens name, else ``module:io``."""
        return self.tl or f"{self.module}:{self.io}"

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> Site:
        """A site from the store's record of it."""
        return cls(
            record["module"], record["io"], record.get("tl"), int(record["layer"]), record.get("hidden_state")
        )

    def record(self, tuple_output: bool) -> dict[str, Any]:
        """What the store records about the site."""
        return {
            "layer": self.layer,
            "name": self.name,
            "module": self.module,
            "io": self.io,
            "tl": self.tl,
            "hidden_state": self.hidden_state,
            "tuple_output": tuple_output,
        }


class _StopForward(Exception):
    """Raised from a hook once every requested layer and site is captured: the rest never runs."""


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


def first_tensor(value: Any) -> torch.Tensor | None:
    """A module's output as captured: the tensor itself, or the first tensor of a tuple or list."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((item for item in value if isinstance(item, torch.Tensor)), None)
    return None


def input_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A module's input as captured: its first positional tensor, else its ``hidden_states``
    keyword (HF passes attention its input by keyword), else its first tensor keyword."""
    found = first_tensor(args)
    if found is None and isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return found if found is not None else first_tensor(list(kwargs.values()))


def _swap(values: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    return type(values)(new if item is old else item for item in values)


def hook_site(
    model: PreTrainedModel, site: Site, visit: Callable[[torch.Tensor | None, Any], torch.Tensor | None]
) -> Any:
    """Hook ``site``'s module: ``visit(tensor, raw)`` gets the site's tensor (None if there is none)
    and the module's raw output or positional arguments; a tensor it returns replaces the site's
    tensor in the forward. Returns the hook's handle."""
    module = model.get_submodule(site.module)
    if site.io == "input":

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            tensor = input_tensor(args, kwargs)
            new = visit(tensor, args)
            if new is None or tensor is None:
                return None
            return _swap(args, tensor, new), {k: new if v is tensor else v for k, v in kwargs.items()}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        tensor = first_tensor(output)
        new = visit(tensor, output)
        if new is None or tensor is None:
            return None
        return new if isinstance(output, torch.Tensor) else _swap(output, tensor, new)

    return module.register_forward_hook(hook)


class LayerCapture:
    """Hooks that record the requested layers and hook sites (``bae.pipeline.llm.sites``) and cut
    the forward short once all of them are captured.

    Use as a context manager; :meth:`run` returns ``{layer or site key: tensor[batch, seq, d]}``.
    """

    def __init__(self, model: PreTrainedModel, layers: Sequence[int], sites: Sequence[Site] = ()):
        self.model = model
        self.n_layers = int(model.config.num_hidden_layers)
        self.layers = check_layers(layers, self.n_layers) if layers or not sites else []
        self.sites = list(sites)
        self.wanted = set(self.layers) | {site.layer for site in self.sites}
        self.tuple_outputs: set[int] = set()  # site keys whose module returned a tuple
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _record(self, key: int, value: torch.Tensor) -> None:
        if key not in self.wanted:
            return
        if key in self._captured:
            name = next((s.name for s in self.sites if s.layer == key), f"layer {key}")
            raise BaeError(f"hook {name}: its module ran twice in one forward; which call to keep is unclear")
        self._captured[key] = value.detach()
        if len(self._captured) == len(self.wanted):
            raise _StopForward

    def _hook_site(self, site: Site) -> Any:
        def visit(tensor: torch.Tensor | None, got: Any) -> None:
            if tensor is None:
                raise BaeError(
                    f"hook {site.name}: its module's {site.io} has no tensor ({type(got).__name__})"
                )
            if site.io == "output" and not isinstance(got, torch.Tensor):
                self.tuple_outputs.add(site.layer)
            self._record(site.layer, tensor)

        return hook_site(self.model, site, visit)

    def __enter__(self) -> LayerCapture:
        blocks = decoder_blocks(self.model)
        deepest = max(self.layers, default=-1)
        if 0 in self.layers:

            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                self._record(0, args[0] if args else kwargs["hidden_states"])

            self._handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for index in range(min(deepest, self.n_layers - 1)):
            layer = index + 1

            def hook(_module: nn.Module, _args: Any, output: Any, layer: int = layer) -> None:
                self._record(layer, cast(torch.Tensor, first_tensor(output)))

            self._handles.append(blocks[index].register_forward_hook(hook))
        if deepest == self.n_layers:

            def norm_hook(_module: nn.Module, _args: Any, output: Any) -> None:
                self._record(self.n_layers, cast(torch.Tensor, first_tensor(output)))

            self._handles.append(final_norm(self.model).register_forward_hook(norm_hook))
        self._handles.extend(self._hook_site(site) for site in self.sites)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """One forward of the base model until every requested layer and site is captured."""
        if not self._handles:
            raise RuntimeError("LayerCapture.run outside its `with` block")
        self._captured = {}
        with contextlib.suppress(_StopForward):
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        missing = self.wanted - set(self._captured)
        if missing:
            names = [s.name for s in self.sites if s.layer in missing]
            names += [f"layer {layer}" for layer in sorted(missing & set(self.layers))]
            raise BaeError(f"nothing captured at {', '.join(names)}: those modules never ran in the forward")
        captured, self._captured = self._captured, {}
        return captured
