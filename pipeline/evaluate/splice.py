"""The spliced forward: one clean pass that records how every decoder block from the first spliced
layer on was called, then, per replacement of ``hidden_states[L]``, a replay of blocks L.. only.

Layer numbering is harvest's (``bae.pipeline.llm.capture``): ``hidden_states[L]`` is the input of
block L, and ``hidden_states[n_layers]`` the output of the final norm. The replay calls each block
with the arguments it received in the clean pass (attention mask, rotary embeddings, positions), so
a replacement equal to the clean state reproduces the clean logits bit for bit. A hook site
(``bae harvest --hook``) is spliced by replaying its block with the site's module hooked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from bae.pipeline.llm.capture import Site, decoder_blocks, final_norm, hook_site

TINY = torch.finfo(torch.float32).tiny  # floor of the mixture, so that 0 · log 0 counts as 0


@dataclass(frozen=True)
class SiteSplice:
    """A hook site (``bae harvest --hook``) to splice at, and the decoder block it runs in."""

    site: Site
    block: int


@dataclass
class CleanPass:
    """The clean forward's final hidden states [B, T, d], each replayable block's call, and the
    values of the hook sites spliced at (by store layer key)."""

    final: torch.Tensor
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    sites: dict[int, torch.Tensor] = field(default_factory=dict)

    def state(self, layer: int) -> torch.Tensor:
        """``hidden_states[layer]`` (or the hook site keyed ``layer``) of the clean pass."""
        if layer in self.sites:
            return self.sites[layer]
        if layer in self.calls:
            args, kwargs = self.calls[layer]
            return args[0] if args else kwargs["hidden_states"]
        return self.final


@torch.inference_mode()
def clean_forward(
    model: PreTrainedModel,
    ids: torch.Tensor,
    attention: torch.Tensor | None,
    first: int,
    sites: Sequence[Site] = (),
) -> CleanPass:
    """The base model over ``ids``, recording the calls of blocks ``first``.. for :func:`resume` and
    the values of ``sites``."""
    blocks = decoder_blocks(model)
    run = CleanPass(final=torch.empty(0))

    def record(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            run.calls[index] = (args, kwargs)

        return hook

    def keep(site: Site) -> Any:
        def visit(tensor: torch.Tensor | None, _raw: Any) -> None:
            if tensor is not None:
                run.sites[site.layer] = tensor

        return visit

    handles = [
        blocks[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(first, len(blocks))
    ]
    handles += [hook_site(model, site, keep(site)) for site in sites]
    try:
        run.final = model.base_model(
            input_ids=ids, attention_mask=attention, use_cache=False
        ).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return run


@torch.inference_mode()
def resume(model: PreTrainedModel, clean: CleanPass, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The final hidden states when ``hidden_states[layer]`` is ``hidden``: blocks ``layer``.. replayed."""
    blocks = decoder_blocks(model)
    if layer == len(blocks):
        return hidden
    for index in range(layer, len(blocks)):
        args, kwargs = clean.calls[index]
        out = (
            blocks[index](hidden, *args[1:], **kwargs)
            if args
            else blocks[index](**{**kwargs, "hidden_states": hidden})
        )
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return final_norm(model)(hidden)


@torch.inference_mode()
def resume_site(
    model: PreTrainedModel, clean: CleanPass, at: SiteSplice, value: torch.Tensor
) -> torch.Tensor:
    """The final hidden states when the hook site is ``value``: its block and the rest replayed from
    the clean state, with the site's module hooked to return (or receive) ``value``."""
    handle = hook_site(model, at.site, lambda _tensor, _raw: value)
    try:
        return resume(model, clean, at.block, clean.state(at.block))
    finally:
        handle.remove()


def log_probs(model: PreTrainedModel, final: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float32) of final hidden states [R, d]."""
    head = model.get_output_embeddings()
    assert head is not None, "a causal LM has an output embedding"
    return F.log_softmax(head(final).float(), dim=-1)


@dataclass
class Reference:
    """The clean next-token log-probabilities [R, V] of a block of rows, and their probabilities."""

    logp: torch.Tensor
    p: torch.Tensor

    @classmethod
    def of(cls, logp: torch.Tensor) -> Reference:
        return cls(logp, logp.exp())

    def ce(self, targets: torch.Tensor) -> torch.Tensor:
        """Per row: CE at ``targets`` (0 where the target is −1)."""
        return -self.logp.gather(1, targets.clamp_min(0)[:, None])[:, 0] * (targets >= 0)


def next_token_terms(clean: Reference, other: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: CE of log-probabilities ``other`` [R, V] at ``targets`` (0 where the target is −1),
    KL(clean ‖ other) and JSD (natural log) of the two next-token distributions.

    Two transcendental passes over the vocabulary per variant (exp of ``other``, log of the mixture);
    the JSD is summed term by term, so near-equal distributions lose no precision to cancellation."""
    q = other.exp()
    kl = (clean.p * (clean.logp - other)).sum(-1)
    log_m = ((clean.p + q) * 0.5).clamp_min_(TINY).log_()
    jsd = 0.5 * ((clean.p * (clean.logp - log_m)).sum(-1) + (q * (other - log_m)).sum(-1))
    return {"ce": Reference(other, q).ce(targets), "kl": kl.clamp_min(0), "jsd": jsd.clamp_min(0)}
