"""``SaeWeights``: a bae autoencoder as the affine maps of SAELens' and sparsify's layout, and back.

SAELens and sparsify compute, on raw hidden states x,

    pre = (x − b_dec) @ W_enc + b_enc   (the ``− b_dec`` only with ``apply_b_dec_to_input``)
    x̂  = code @ W_dec + b_dec

bae computes pre = W ((x − μ)/σ / s) + b and x̂ = σ ⊙ (W_d code + b_d) + μ (μ, σ: input
standardization; s: ``--encoder-scale``). ``from_autoencoder`` folds μ, σ and s into the weights;
when the decoder has no bias (b_d = 0) μ becomes ``b_dec`` with ``apply_b_dec_to_input``, so no bias
is refolded and an imported SAE exports back bit for bit. ``to_autoencoder`` is the inverse: an SAE
that subtracts ``b_dec`` becomes a bae model whose input mean is ``b_dec`` (σ = 1, no decoder bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bae.trainer.config import Architecture, ModelConfig
from bae.trainer.models import Autoencoder, BinaryAutoencoder, build_autoencoder
from bae.trainer.provenance import Provenance


@dataclass
class SaeWeights:
    """Raw-space SAE weights in SAELens' orientation (float32 unless read otherwise)."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    apply_b_dec_to_input: bool

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four weights by SAELens' names, contiguous (what safetensors writes)."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec")
        return {name: getattr(self, name).contiguous() for name in names}


@dataclass
class ReadSae:
    """An SAE read from another tool: its weights, bae architecture and options, and where it was trained."""

    weights: SaeWeights
    architecture: str
    options: dict[str, Any]
    model_name: str | None
    hook_name: str | None


def bit_decoder(model: Autoencoder) -> torch.Tensor:
    """The decoder as one row per code entry [n_bits, d] (a k-bit BAE's bit i of a group decodes
    to 2^i/(2^k − 1) × its feature's column), in float64."""
    columns = model.decoder.weight.detach().double().T  # [n_features, d]
    k = model.config.k_bits if isinstance(model, BinaryAutoencoder) else 1
    if k == 1:
        return columns
    place = 2.0 ** torch.arange(k, dtype=torch.float64) / (2**k - 1)
    return (columns[:, None, :] * place[None, :, None]).reshape(-1, columns.shape[1])


def from_autoencoder(model: Autoencoder) -> SaeWeights:
    """``model``'s encode and decode on raw states as SAELens-layout weights (folded in float64)."""
    c, d = model.config, model.config.d_model
    zeros = torch.zeros(d, dtype=torch.float64)
    mean = model.input_mean.double() if c.standardize else zeros
    std = model.input_std.double() if c.standardize else zeros + 1
    scale = std * (model.encoder_input_scale.double() if c.encoder_scale else 1)
    W_enc = model.encoder.weight.detach().double().T / scale[:, None]
    b_enc = model.encoder.bias.detach().double() if c.encoder_bias else torch.zeros(model.n_bits).double()
    W_dec = bit_decoder(model) * std[None, :]
    b_dec = model.decoder.bias.detach().double() if c.decoder_bias else zeros
    centred = not bool(b_dec.any())
    if centred:
        b_dec = mean
    else:
        b_enc, b_dec = b_enc - mean @ W_enc, std * b_dec + mean
    dtype = model.encoder.weight.dtype
    return SaeWeights(*(t.to(dtype) for t in (W_enc, b_enc, W_dec, b_dec)), apply_b_dec_to_input=centred)


def to_autoencoder(
    weights: SaeWeights,
    architecture: Architecture,
    provenance: Provenance,
    **options: object,
) -> Autoencoder:
    """A bae model computing exactly ``weights``' encode and decode (``options``: ``topk`` or
    ``threshold``); its weights are ``weights``' values, cast to float32."""
    d, n = weights.d_in, weights.d_sae
    centred = weights.apply_b_dec_to_input
    config = ModelConfig.model_validate(
        {
            "architecture": architecture,
            "d_model": d,
            "expansion": n // d if n % d == 0 else 1,
            "features": None if n % d == 0 else n,
            "decoder_bias": not centred,
            "standardize": centred,
            **options,
        }
    )
    model = build_autoencoder(config, provenance)
    f32 = {name: t.detach().to(torch.float32) for name, t in weights.tensors().items()}
    with torch.no_grad():
        model.encoder.weight.copy_(f32["W_enc"].T)
        model.encoder.bias.copy_(f32["b_enc"])
        model.decoder.weight.copy_(f32["W_dec"].T)
        if centred:
            model.set_normalization(f32["b_dec"], torch.ones(d))
        else:
            model.decoder.bias.copy_(f32["b_dec"])
    return model.eval()
