"""Hook sites beyond the residual stream: a module of the HF model and whether its input or output
is captured (``model.layers.5.mlp``, ``model.layers.5.self_attn:input``), or a TransformerLens hook
name mapped exactly onto one (``blocks.5.hook_resid_post``).

A harvested site occupies the store's layer axis under a key past the model's ``hidden_states``
indices (``n_layers + 1``, ``n_layers + 2``, ...), so a store holds layers and sites side by side and
every stage that reads a layer reads a site the same way (docs/harvest.md).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from bae.common.errors import BaeError
from bae.pipeline.llm.capture import LayerCapture, Site, SiteIO, decoder_blocks

IO_SUFFIXES: tuple[SiteIO, ...] = ("output", "input")
TL_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
# children of a llama-style decoder block (llama, mistral, qwen2, SmolLM2): attention and MLP outputs
# are added to the residual stream as they are, so TransformerLens' attn_out / mlp_out are exact
LLAMA_BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


def accepted_text(n_blocks: int) -> str:
    hooks = ", ".join(f"blocks.L.{hook}" for hook in TL_HOOKS)
    return f"{hooks} (L in 0..{n_blocks - 1}), or a module path of the model with :output or :input"


def _module_names(model: PreTrainedModel) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules() if name}


def _tl_target(model: PreTrainedModel, spec: str) -> tuple[str, SiteIO]:
    """The module and side a TransformerLens hook name stands for, or a one-line refusal."""
    blocks = decoder_blocks(model)
    match = _TL_NAME.match(spec)
    if match is None or match.group(2) not in TL_HOOKS:
        raise BaeError(f"unknown hook {spec!r}; accepted: {accepted_text(len(blocks))}")
    index, hook = int(match.group(1)), match.group(2)
    if index >= len(blocks):
        raise BaeError(f"hook {spec!r}: this model has blocks 0..{len(blocks) - 1}")
    block = f"{_module_names(model)[id(blocks)]}.{index}"
    if hook in ("hook_resid_pre", "hook_resid_post"):
        return block, "input" if hook == "hook_resid_pre" else "output"
    children = {name for name, _ in blocks[index].named_children()}
    if children != LLAMA_BLOCK:
        raise BaeError(
            f"hook {spec!r} maps exactly onto HF modules only for llama-style blocks "
            f"({', '.join(sorted(LLAMA_BLOCK))}); this model's block has {', '.join(sorted(children))}: "
            "hook one of its modules by path instead"
        )
    return f"{block}.{'self_attn' if hook == 'hook_attn_out' else 'mlp'}", "output"


def _module_target(model: PreTrainedModel, spec: str) -> tuple[str, SiteIO]:
    """``path[:output|:input]`` checked against the model's modules (close matches if unknown)."""
    path, _, side = spec.partition(":")
    side = side or "output"
    if side not in IO_SUFFIXES:
        raise BaeError(f"hook {spec!r}: ':{side}' is neither :output nor :input")
    names = list(_module_names(model).values())
    if path not in names:
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
        accepted = f"accepted: {accepted_text(len(decoder_blocks(model)))}"
        hint = f"close matches: {', '.join(close)}" if close else accepted
        raise BaeError(f"hook {spec!r}: {type(model).__name__} has no module {path!r}; {hint}")
    module = model.get_submodule(path)
    if not any(module is inner for inner in model.base_model.modules()):
        raise BaeError(
            f"hook {spec!r}: module {path} does not run in the base model's forward that harvest runs "
            "(the LM head and the like are never called)"
        )
    return path, "input" if side == "input" else "output"


def _hidden_state_index(blocks: nn.ModuleList, module: nn.Module, io: SiteIO) -> int | None:
    """The ``hidden_states`` index a block's input or output equals exactly (not the last block's
    output: HF's last entry has the final norm applied)."""
    for index, block in enumerate(blocks):
        if block is module:
            if io == "input":
                return index
            return index + 1 if index + 1 < len(blocks) else None
    return None


def resolve_sites(model: PreTrainedModel, specs: list[str]) -> list[Site]:
    """The sites that ``--hook`` values name, keyed past the model's ``hidden_states`` indices; a
    site named twice (by path and by TransformerLens name, say) is captured once."""
    blocks = decoder_blocks(model)
    sites: list[Site] = []
    for spec in specs:
        spec = spec.strip()
        is_tl = spec.startswith(("blocks.", "hook_")) and ":" not in spec
        module, io = _tl_target(model, spec) if is_tl else _module_target(model, spec)
        if any((s.module, s.io) == (module, io) for s in sites):
            continue
        layer = len(blocks) + 1 + len(sites)
        equals = _hidden_state_index(blocks, model.get_submodule(module), io)
        sites.append(Site(module, io, spec if is_tl else None, layer, equals))
    return sites


def probe_sites(model: PreTrainedModel, sites: list[Site], d_model: int) -> list[dict[str, Any]]:
    """Each site's store record, after a two-token forward has shown that it captures a tensor
    ``[batch, seq, d_model]`` (the store holds one width) and whether its module returns a tuple."""
    if not sites:
        return []
    ids = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    with LayerCapture(model, [], sites) as capture:
        captured = capture.run(ids)
    for site in sites:
        shape = tuple(captured[site.layer].shape)
        if shape != (1, 2, d_model):
            raise BaeError(
                f"hook {site.name}: its {site.io} has shape [batch, seq, ...] = {list(shape)} for a "
                f"[1, 2] input, but a store holds [batch, seq, {d_model}] states (the model's width)"
            )
    return [site.record(site.layer in capture.tuple_outputs) for site in sites]


def site_block(model: PreTrainedModel, site: Site) -> int:
    """The decoder block a site runs in (the block itself or one of its modules); a site outside the
    blocks (the embeddings, the final norm) is refused in one line."""
    blocks = decoder_blocks(model)
    path = _module_names(model)[id(blocks)]
    for index in range(len(blocks)):
        block = f"{path}.{index}"
        if site.module == block or site.module.startswith(f"{block}."):
            return index
    raise BaeError(f"hook site {site.name} is not inside a decoder block ({path}.N): it cannot be spliced")
