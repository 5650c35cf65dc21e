"""Which torch device a stage computes on: one spelling (``--device auto|cpu|cuda|cuda:N|mps``) for
every command that encodes or runs a model."""

from __future__ import annotations

import torch

from bae.common.errors import BaeError

DEVICE_HELP = "compute device: auto (the GPU where one is visible, else cpu), cpu, cuda, cuda:N or mps"


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names, checked to exist here; ``auto`` is ``cuda:0`` when CUDA is visible,
    else ``mps`` when available, else ``cpu``."""
    name = spec.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BaeError(f"device {spec!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BaeError(f"device {spec!r}: no CUDA device is visible here; expected auto or cpu")
        index = 0 if device.index is None else device.index
        if index >= count:
            raise BaeError(f"device {spec!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise BaeError(f"device {spec!r}: MPS is not available here; expected auto or cpu")
        return device
    raise BaeError(f"device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU it goes through pinned memory without blocking the host
    (a copy from pageable memory waits for the work already queued on the stream; torch's pinned
    cache keeps the buffer until its copy has run)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
