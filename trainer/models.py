"""Autoencoders over LLM hidden states: the Binary Autoencoder and the ReLU / TopK SAE baselines.

Every architecture shares one interface (``Autoencoder``): ``forward`` on normalized inputs for
training, ``encode``/``encode_bits``/``encode_packed`` on raw hidden states for analysis, ``decode``
back to raw space, and ``save_pretrained``/``load_autoencoder`` (safetensors + ``config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bae.common.atomic_files import shareable, temporary_dir
from bae.common.configs import build_config
from bae.common.errors import BaeError, first_line
from bae.trainer.config import ModelConfig
from bae.trainer.provenance import Provenance
from bae.trainer.run_folder import RunFolder

CHECKPOINT_FORMAT = "bae-autoencoder"
CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class Codes:
    """One forward pass: ``bits`` (the 0/1 code the losses see), ``code`` (the decoder's input)
    and ``recon`` (the reconstruction, in normalized space)."""

    bits: torch.Tensor
    code: torch.Tensor
    recon: torch.Tensor


def above_threshold(z: Any, threshold: str) -> Any:
    """The step's comparison, for torch tensors and numpy arrays alike: z > 0 (``gt``) or z >= 0 (``ge``)."""
    return z >= 0 if threshold == "ge" else z > 0


class _StepSTE(torch.autograd.Function):
    """Heaviside step whose backward is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, threshold: str) -> torch.Tensor:
        return above_threshold(z, threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _StepSigmoid(torch.autograd.Function):
    """Heaviside step whose backward is the derivative of sigmoid(z / t), t = τ, or (batch-scaled)
    t = τ · the batch RMS of each unit's z, so that growing weights never saturate the gradient."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, threshold: str, temperature: float, batch_scaled: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.temperature, ctx.batch_scaled = temperature, batch_scaled
        return above_threshold(z, threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (z,) = ctx.saved_tensors
        t: Any = ctx.temperature
        if ctx.batch_scaled:
            t = t * z.pow(2).mean(dim=0).sqrt().clamp_min(1e-6)
        s = torch.div(z, t).sigmoid_()  # in place, fused: each [n, m] temporary costs page faults
        return torch.ops.aten.sigmoid_backward(grad, s).div_(t), None, None, None


def binary_step(
    z: torch.Tensor, threshold: str = "gt", estimator: str = "ste", temperature: float = 1.0
) -> torch.Tensor:
    """step(z) in {0, 1} (``gt``: z > 0, ``ge``: z >= 0) with the chosen gradient estimator."""
    if estimator == "ste":
        return _StepSTE.apply(z, threshold)
    return _StepSigmoid.apply(z, threshold, temperature, estimator == "scaled_sigmoid")


@dataclass
class Analysis:
    """Raw states seen by a trained autoencoder: ``bits`` (bool [n, n_bits], what entropy counts),
    ``code`` (float [n, n_bits], what a feature's score is made of: a BAE's bits, an SAE's
    activations) and ``decoder_input`` (what ``reconstruct`` takes)."""

    bits: torch.Tensor
    code: torch.Tensor
    decoder_input: torch.Tensor


class Autoencoder(nn.Module):
    """Shared machinery: optional input standardization, encoding to bits, (de)serialization."""

    architecture: ClassVar[str]
    input_mean: torch.Tensor  # buffers, registered only when config.standardize
    input_std: torch.Tensor
    encoder_input_scale: torch.Tensor  # registered only when config.encoder_scale

    def __init__(self, config: ModelConfig, provenance: Provenance | None = None):
        super().__init__()
        self.config = config
        self.provenance = provenance or Provenance()
        self.metrics: dict[str, Any] = {}  # what training achieved (e.g. val_fvu), saved with the model
        d, n_enc = config.d_model, self.n_encoder_outputs(config)
        self.encoder = nn.Linear(d, n_enc, bias=config.encoder_bias)
        self.decoder = nn.Linear(config.n_features, d, bias=config.decoder_bias)
        if config.standardize:
            self.register_buffer("input_mean", torch.zeros(d))
            self.register_buffer("input_std", torch.ones(d))
        if config.encoder_scale:
            self.register_buffer("encoder_input_scale", torch.ones(d))

    @staticmethod
    def n_encoder_outputs(config: ModelConfig) -> int:
        return config.n_features

    @property
    def n_bits(self) -> int:
        """Width of the binary code returned by ``encode``."""
        return self.encoder.out_features

    # -- normalization -------------------------------------------------------------------------
    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Record the per-dimension standardization (only for models built with standardize)."""
        if not self.config.standardize:
            raise ValueError("model was built without standardize=True")
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized rows -> what the encoder sees (each dimension divided by its training-space
        standard deviation under ``encoder_scale``: a preconditioner, the code is unchanged)."""
        return x / self.encoder_input_scale if self.config.encoder_scale else x

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Raw hidden states -> the space the autoencoder works in."""
        if self.config.standardize:
            return (h - self.input_mean) / self.input_std
        return h

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.standardize:
            return x * self.input_std + self.input_mean
        return x

    def typical(self, x: torch.Tensor) -> torch.Tensor | None:
        """Mask of the *normalized* rows ``x`` inside the typical radius (None: every row is)."""
        if self.config.typical_radius is None:
            return None
        return x.pow(2).sum(dim=-1) <= self.config.typical_radius

    @torch.no_grad()
    def typical_raw(self, h: torch.Tensor | np.ndarray) -> torch.Tensor | None:
        """``typical`` of raw hidden states."""
        return self.typical(self.normalize(self.as_input(h)))

    # -- architecture-specific -----------------------------------------------------------------
    def codes(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder pre-activations -> (bits, decoder input)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Codes:
        """Training pass on *normalized* inputs ``x`` [n, d]."""
        bits, code = self.codes(self.encoder(self.encoder_input(x)))
        return Codes(bits=bits, code=code, recon=self.decode_code(code))

    def decode_code(self, code: torch.Tensor) -> torch.Tensor:
        """The decoder on a training pass's code (normalized space)."""
        return self.decoder(code)

    # -- analysis API: the one encode path every stage uses -------------------------------------
    def as_input(self, h: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Hidden states as a tensor on the model's device and dtype."""
        p = self.encoder.weight
        return torch.as_tensor(np.asarray(h) if not torch.is_tensor(h) else h).to(p.device, p.dtype)

    def pre_activations(self, h: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw hidden states -> encoder outputs (input standardization applied)."""
        return self.encoder(self.encoder_input(self.normalize(self.as_input(h))))

    def bits_of(self, pre: torch.Tensor) -> torch.Tensor:
        """Encoder outputs -> bool code (for SAEs: activation > 0)."""
        bits, _ = self.codes(pre)
        return bits > 0

    @torch.no_grad()
    def encode(self, h: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw hidden states [n, d] -> bool bits [n, n_bits]."""
        return self.bits_of(self.pre_activations(h))

    @torch.no_grad()
    def encode_typical(self, h: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw hidden states -> (``encode``'s bits, ``typical_raw``'s mask), normalizing them once."""
        x = self.normalize(self.as_input(h))
        return self.bits_of(self.encoder(self.encoder_input(x))), self.typical(x)

    def encode_bits(self, h: torch.Tensor | np.ndarray) -> np.ndarray:
        """Raw hidden states -> numpy bool bits [n, n_bits]."""
        return self.encode(h).cpu().numpy()

    def encode_packed(self, h: torch.Tensor | np.ndarray) -> np.ndarray:
        """Raw hidden states -> uint8 [n, ceil(n_bits / 8)], ``np.packbits(bits, axis=-1)``."""
        return np.packbits(self.encode_bits(h), axis=-1)

    @torch.no_grad()
    def analyse(self, h: torch.Tensor | np.ndarray) -> Analysis:
        """Raw hidden states -> bits, feature code and decoder input (see ``Analysis``)."""
        bits, decoder_input = self.codes(self.pre_activations(h))
        return Analysis(bits > 0, decoder_input.float(), decoder_input)

    @torch.no_grad()
    def reconstruct(self, decoder_input: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction from ``analyse(h).decoder_input``."""
        return self.denormalize(self.decoder(decoder_input))

    @torch.no_grad()
    def decode(self, code: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Code -> raw-space reconstruction: a BAE takes its bits, an SAE its activations."""
        return self.reconstruct(self.code_from_bits(self.as_input(code)))

    def code_from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """What the decoder consumes given ``encode``'s output (identity unless overridden)."""
        return bits

    # -- serialization -------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "architecture": self.architecture,
            "model": self.config.model_dump(mode="json"),
            "source": self.provenance.model_dump(mode="json"),
            "normalization": {"kind": "standardize"} if self.config.standardize else None,
            "metrics": self.metrics,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``directory`` atomically."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_dir(directory)
        try:
            self.write_files(tmp)
            replace_dir(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    def write_files(self, directory: Path) -> None:
        """Weights and config into an existing directory (callers make it atomic)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        shareable(directory / WEIGHTS_FILE)  # safetensors writes 0600
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")


class BinaryAutoencoder(Autoencoder):
    """h1 = step(W_enc h + b_enc), ĥ = W_dec h1 + b_dec (optionally k bits per decoder input)."""

    architecture = "bae"

    @staticmethod
    def n_encoder_outputs(config: ModelConfig) -> int:
        return config.n_features * config.k_bits

    def codes(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        bits = binary_step(pre, c.threshold, c.estimator, c.temperature)
        return bits, self.code_from_bits(bits)

    def forward(self, x: torch.Tensor, live: torch.Tensor | None = None) -> Codes:
        """Training pass on *normalized* inputs ``x`` [n, d]; with ``live`` (the indices of the bits
        not switched off, one-bit codes only), the products run over those bits alone. A switched-off
        bit (encoder row 0, bias −1, decoder column 0: ``pruning.switched_off``) is 0 on every row and
        its weights get zero gradients, as the full pass gives with its gradients held at zero."""
        if live is None or self.config.k_bits != 1:
            return super().forward(x)
        encoder, decoder = self.encoder, self.decoder
        bias = None if encoder.bias is None else encoder.bias.index_select(0, live)
        pre = F.linear(self.encoder_input(x), encoder.weight.index_select(0, live), bias)
        bits_live, _ = self.codes(pre)
        recon = self._decode(bits_live, decoder.weight.index_select(1, live), decoder.bias)
        bits = bits_live.new_zeros(len(x), self.n_bits).index_copy(1, live, bits_live)
        return Codes(bits=bits, code=bits, recon=recon)

    def decode_code(self, code: torch.Tensor) -> torch.Tensor:
        """A one-bit code by its active bits when sparse (``binary_decode.decode``)."""
        if self.config.k_bits != 1:
            return self.decoder(code)
        return self._decode(code, self.decoder.weight, self.decoder.bias)

    @staticmethod
    def _decode(code: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from bae.trainer.binary_decode import decode  # numba: training only, not `bae entropy`'s start-up

        return decode(code, weight, bias)

    def bits_of(self, pre: torch.Tensor) -> torch.Tensor:
        """The step taken in NumPy on CPU (several times faster than torch's compare-and-cast)."""
        if pre.device.type != "cpu":
            return above_threshold(pre, self.config.threshold)
        return torch.from_numpy(above_threshold(pre.detach().numpy(), self.config.threshold))

    @torch.no_grad()
    def analyse(self, h: torch.Tensor | np.ndarray) -> Analysis:
        """A BAE's feature code is its bits (k bits per decoder input: every bit is a feature)."""
        bits = self.bits_of(self.pre_activations(h))
        code = bits.to(self.encoder.weight.dtype)
        return Analysis(bits, code.float(), self.code_from_bits(code))

    def code_from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """k-bit pathway: each group of k bits (first least significant) -> Σ b_i 2^i/(2^k − 1)."""
        k = self.config.k_bits
        if k == 1:
            return bits
        weights = 2.0 ** torch.arange(k, device=bits.device, dtype=bits.dtype) / (2**k - 1)
        return bits.unflatten(-1, (-1, k)) @ weights


class ReluSAE(Autoencoder):
    """Baseline: f = ReLU(W_enc h + b_enc), ĥ = W_dec f + b_dec, trained with an L1 penalty on f."""

    architecture = "relu_sae"

    def codes(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = torch.relu(pre)
        return (code > 0).to(code.dtype), code


class TopKSAE(ReluSAE):
    """Baseline: keep the k largest ReLU activations per row, zero the rest."""

    architecture = "topk_sae"

    def codes(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, index = pre.topk(self.config.topk, dim=-1)
        code = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
        return (code > 0).to(code.dtype), code


ARCHITECTURES: dict[str, type[Autoencoder]] = {
    cls.architecture: cls for cls in (BinaryAutoencoder, ReluSAE, TopKSAE)
}


def build_autoencoder(config: ModelConfig, provenance: Provenance | None = None) -> Autoencoder:
    """A freshly initialised (PyTorch default init) model of ``config.architecture``."""
    return ARCHITECTURES[config.architecture](config, provenance)


def read_model_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved autoencoder (BaeError if it is not one)."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BaeError(f"{directory}: not a saved autoencoder (cannot read {CONFIG_FILE})") from exc
    if data.get("format") != CHECKPOINT_FORMAT or data.get("architecture") not in ARCHITECTURES:
        raise BaeError(f"{directory}: {CONFIG_FILE} is not a {CHECKPOINT_FORMAT} config")
    return data


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a ``bae train`` output (its ``model/``, else latest checkpoint)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    run = RunFolder.at(path)
    if (run.model_dir / CONFIG_FILE).is_file():
        return run.model_dir
    checkpoints = [c for c in run.checkpoint_candidates() if (c / CONFIG_FILE).is_file()]
    if checkpoints:
        return checkpoints[-1]
    raise BaeError(f"{path}: no saved autoencoder here (expected {CONFIG_FILE}, model/ or checkpoints/)")


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Load any saved autoencoder (BAE or baseline SAE) in eval mode.

    ``path`` is a model directory (``config.json`` + ``model.safetensors``) or a ``bae train``
    output directory. The returned model's ``encode_bits(h)`` / ``encode_packed(h)`` take raw hidden
    states (numpy or torch, [n, d]); ``model.provenance`` records the store, LLM and layer it was
    trained on, and any input standardization is applied inside ``encode``.
    """
    directory = resolve_model_dir(path)
    data = read_model_config(directory)
    config = build_config(ModelConfig, data["model"], f"{directory / CONFIG_FILE}")
    source = data.get("source") or {}
    provenance = build_config(Provenance, source, f"{directory / CONFIG_FILE} source")
    model = build_autoencoder(config, provenance)
    model.metrics = dict(data.get("metrics") or {})
    state = load_file(str(directory / WEIGHTS_FILE))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BaeError(f"{directory}: weights do not match {CONFIG_FILE}: {first_line(exc)}") from exc
    return model.to(device).eval()


def replace_dir(new: Path, target: Path) -> None:
    """Move the complete directory ``new`` to ``target``, replacing any older ``target``."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
