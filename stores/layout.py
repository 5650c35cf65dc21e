"""The store's shape and storage choices, and the codec between logical and stored values."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from bae.common.configs import StrictModel
from bae.common.errors import BaeError

SCHEMA_VERSION = 1
LAYER_CONVENTION = (
    "hf_hidden_states: 0 = embedding output, l = residual stream after decoder block l-1; "
    "the last index has the model's final norm applied in most HF models"
)
ROW_ARRAYS: dict[str, str] = {
    "token_ids": "int32",
    "doc_ids": "int64",
    "positions": "int32",
    "valid": "bool",
}
ROW_FILL: dict[str, Any] = {"token_ids": -1, "doc_ids": -1, "positions": -1, "valid": False}

LogicalDtype = Literal["float16", "bfloat16", "float32"]
PHYSICAL: dict[str, str] = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class StoreLayout(StrictModel):
    """Everything that fixes where each value of a store lives on disk."""

    n_rows: int = Field(ge=1, description="rows (tokens) in the store")
    unit_rows: int = Field(default=4096, ge=1, description="rows per unit (= per chunk)")
    d_model: int = Field(ge=1, description="width of each hidden state")
    layers: list[int] = Field(min_length=1, description="harvested layers, HF hidden_states index")
    dtype: LogicalDtype = "float16"
    overflow: Literal["error", "clamp"] = "error"
    compressor: dict[str, Any] | None = Field(
        default=None, description='None, or a codec spec such as {"name": "zstd", "level": 3}'
    )
    checksum: bool = Field(default=True, description="crc32c per chunk, checked on every read")

    @field_validator("layers")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if any(layer < 0 for layer in v):
            raise ValueError("layers must be >= 0")
        return sorted(set(v))

    @property
    def n_units(self) -> int:
        return -(-self.n_rows // self.unit_rows)

    def unit_range(self, unit: int) -> tuple[int, int]:
        if not 0 <= unit < self.n_units:
            raise BaeError(f"unit {unit} out of range: the store has units 0..{self.n_units - 1}")
        start = unit * self.unit_rows
        return start, min(start + self.unit_rows, self.n_rows)

    @property
    def physical_dtype(self) -> str:
        return PHYSICAL[self.dtype]

    @property
    def bytes_per_row(self) -> int:
        """Stored bytes per token: every layer plus the row arrays (uncompressed)."""
        itemsize = np.dtype(self.physical_dtype).itemsize
        return len(self.layers) * self.d_model * itemsize + 4 + 8 + 4 + 1


# 16-bit floats: the mask of the magnitude bits and the all-ones exponent (NaN/inf at or above it)
_HALF_BITS = {torch.float16: (0x7FFF, 0x7C00), torch.bfloat16: (0x7FFF, 0x7F80)}
_BLOCK = 1 << 20


def any_nonfinite(t: torch.Tensor) -> bool:
    """NaN/inf anywhere in ``t``?

    16-bit floats: a value is NaN or inf exactly when its magnitude bits reach the all-ones exponent,
    tested block by block in a small scratch buffer (no upcast, no large temporary). Wider floats: a
    sum is non-finite whenever a term is, so only a non-finite sum is followed by the exact test.
    """
    if t.numel() == 0:
        return False
    if t.dtype not in _HALF_BITS:
        return not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all())
    magnitude, exponent = _HALF_BITS[t.dtype]
    bits = t.contiguous().view(torch.int16).numpy().reshape(-1)
    scratch = np.empty(min(len(bits), _BLOCK), np.int16)
    for start in range(0, len(bits), _BLOCK):
        block = bits[start : start + _BLOCK]
        np.bitwise_and(block, magnitude, out=scratch[: len(block)])
        if scratch[: len(block)].max() >= exponent:
            return True
    return False


def to_storage(
    values: np.ndarray | torch.Tensor, dtype: str, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the input as a CPU float tensor, its values in the storage dtype); nothing checked yet."""
    t = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    t = t.detach().cpu().contiguous()
    if t.dtype not in TORCH_DTYPE.values():
        if not t.is_floating_point():
            raise BaeError(f"{where}: hidden states must be floating point, got {t.dtype}")
        t = t.float()
    return t, t.to(TORCH_DTYPE[dtype])


def settle_nonfinite(t: torch.Tensor, dtype: str, overflow: str, where: str) -> tuple[torch.Tensor, int]:
    """For an input whose storage-dtype values hold NaN/inf: NaN/inf in the input is an error; values
    beyond the storage range are an error (``overflow="error"``) or clamped -> (clamped values, count)."""
    if any_nonfinite(t):
        row = int((~torch.isfinite(t)).any(dim=-1).nonzero()[0, 0]) if t.dim() > 1 else 0
        raise BaeError(f"{where}: hidden states contain NaN or inf (first in row {row} of the unit)")
    target = TORCH_DTYPE[dtype]
    limit = torch.finfo(target).max
    clamped = int((t.float().abs() > limit).sum())
    if overflow == "error":
        peak = float(t.float().abs().max())
        raise BaeError(
            f"{where}: {clamped} values exceed the {dtype} range (max |x| = {peak:.4g} > "
            f"{limit:.4g}); store as float32/bfloat16, or pass overflow='clamp' to clamp and count"
        )
    return t.float().clamp(-limit, limit).to(target), clamped


def physical(stored: torch.Tensor, dtype: str) -> np.ndarray:
    """Storage-dtype values as the array written to disk (bfloat16 as its uint16 bits)."""
    if dtype == "bfloat16":
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def decode_tensor(physical: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array -> float32 tensor (bfloat16 bits are widened exactly); torch's cast is parallel."""
    t = torch.from_numpy(np.ascontiguousarray(physical))
    if dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.float()


def decode_values(physical: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> float32 numpy values."""
    return decode_tensor(physical, dtype).numpy()
