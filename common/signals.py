"""Graceful stops: SIGINT/SIGTERM set a flag that long loops check at a safe boundary."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """Context manager remembering SIGINT/SIGTERM (``signum``, 0 if none) instead of dying mid-write."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
