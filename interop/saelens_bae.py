"""The Binary Autoencoder as a SAELens architecture (``"bae"``), registered on import.

    import bae.interop.saelens_bae  # registers the class with SAELens
    from sae_lens import SAE
    sae = SAE.load_from_disk("exported/")  # a BinarySAE: encode gives the 0/1 code

The encoder is SAELens' standard one with a Heaviside step for the activation: a feature is on when
its pre-activation is > 0 (``threshold="gt"``) or >= 0 (``"ge"``); ``decode`` is linear, so a
k-bit BAE is exported with one decoder row per bit (bit i of a group weighs 2^i/(2^k − 1)).
Needs the ``bae[saelens]`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from sae_lens import SAE, SAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from torch import nn
from typing_extensions import override

from bae.trainer.models import above_threshold

ARCHITECTURE = "bae"


@dataclass
class BinarySAEConfig(SAEConfig):
    """A standard SAE config plus the step's comparison."""

    threshold: Literal["gt", "ge"] = "gt"

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class BinarySAE(SAE[BinarySAEConfig]):
    """f = step(W_enc (x − b_dec·apply_b_dec_to_input) + b_enc) in {0, 1}; x̂ = f W_dec + b_dec."""

    b_enc: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(above_threshold(hidden_pre, self.cfg.threshold).to(hidden_pre.dtype))

    @override
    def fold_and_get_W_dec_norm(self) -> torch.Tensor:
        """Refused: a 0/1 code has no scale to absorb the decoder norms (``fold_W_dec_norm`` would
        change the reconstruction)."""
        raise NotImplementedError("a binary SAE's 0/1 code cannot absorb its decoder norms")

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)


if ARCHITECTURE not in SAE_CLASS_REGISTRY:  # importing twice (e.g. a reload) registers once
    register_sae_class(ARCHITECTURE, BinarySAE, BinarySAEConfig)
