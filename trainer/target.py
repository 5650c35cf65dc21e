"""Training at a target distortion: β (the FVU a bit must buy) adapted by dual ascent on log β.

    log β ← clip(log β + η · (F − FVU_ema) / F, log β_min, log β_max)

A batch FVU below the target F raises β (fewer bits), above it lowers β. The state is a handful of
floats, written into every checkpoint so that a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class FVUTarget:
    """Dual-ascent state; ``beta()`` for this step, then ``update(fvu)`` with the step's batch FVU."""

    target: float
    log_beta: float
    rate: float = 0.005
    ema_decay: float = 0.95
    fvu_ema: float = math.nan
    log_beta_min: float = math.log(1e-6)
    log_beta_max: float = math.log(10.0)
    updates: int = 0

    @classmethod
    def starting_at(cls, target: float, beta: float) -> FVUTarget:
        """Ascent towards ``target`` from β = ``beta`` (the run's ``--beta``), within the bounds."""
        state = cls(target, 0.0)
        state.log_beta = min(state.log_beta_max, max(state.log_beta_min, math.log(max(beta, 1e-300))))
        return state

    def beta(self) -> float:
        return math.exp(self.log_beta)

    def update(self, fvu: float) -> None:
        ema = fvu if self.updates == 0 else self.ema_decay * self.fvu_ema + (1 - self.ema_decay) * fvu
        step = self.rate * (self.target - ema) / self.target
        self.fvu_ema = ema
        self.log_beta = min(self.log_beta_max, max(self.log_beta_min, self.log_beta + step))
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FVUTarget:
        return cls(**state)
