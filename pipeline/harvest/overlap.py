"""A harvest's forwards overlapped with its store writes, and the time the forwards kept the device busy.

The main thread runs a unit's forward batches and copies each batch's kept rows into a host buffer
(on CUDA a pinned one, filled by ``non_blocking`` copies that run while the next forward is queued);
a single writer thread writes finished units to the store while the main thread computes the next
unit. At most ``UNITS_IN_FLIGHT`` host buffers exist: one being filled and one being written, so
host memory stays bounded and the main thread waits only when the writer falls a whole unit behind.
A unit's lease (work claiming) is released by the writer after its write, i.e. after the store
records the unit done.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

UNITS_IN_FLIGHT = 2  # host buffers: one filled by the forwards, one written by the writer thread


class ForwardClock:
    """Time the model's forwards kept the device busy: on CUDA the span between CUDA events recorded
    around each forward (summed as they complete, so nothing waits on them); elsewhere the host
    clock around each (synchronous) forward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.busy = 0.0  # seconds, of the forwards whose end was seen
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Time the forward run inside the block."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)
            start.record(stream)
            yield
            end.record(stream)
            self._events.append((start, end))
            self._fold(wait=False)
            return
        began = time.perf_counter()
        yield
        self.busy += time.perf_counter() - began

    def _fold(self, wait: bool) -> None:
        while self._events and (wait or self._events[0][1].query()):
            start, end = self._events.pop(0)
            end.synchronize()
            self.busy += start.elapsed_time(end) / 1000

    def seconds(self) -> float:
        """The busy time of every forward timed so far."""
        self._fold(wait=True)
        return self.busy

    def summary(self, wall: float) -> dict[str, str]:
        """The summary line: on CUDA the share of ``wall`` seconds the device was busy with forwards,
        elsewhere the share the host spent in them."""
        share = f"{self.seconds() / max(wall, 1e-9):.0%} of wall time"
        if self.cuda:
            return {"forward busy": f"{share} (CUDA events)"}
        return {"forward share": f"{share} (host clock)"}


@dataclass
class UnitBuffer:
    """One unit's layer values on the host, float32 ``[unit_rows, d]`` (pinned on CUDA), and the
    CUDA event recorded after the unit's last device-to-host copy (None off CUDA: copies are done)."""

    values: dict[int, torch.Tensor]
    copied: torch.cuda.Event | None = None


@dataclass
class _Job:
    """A filled unit for the writer, and the lease it holds until the write is recorded."""

    unit: int
    buffer: UnitBuffer
    lease: contextlib.ExitStack


class OverlappedWriter:
    """Host buffers for units being computed, and the thread that writes finished ones.

    ``write(unit, buffer)`` runs on the writer thread, once the buffer's copies are complete. An
    exception there is re-raised on the main thread at its next :meth:`buffer`, :meth:`submit`,
    :meth:`drain` or on leaving the ``with`` block; the units handed over after it are not written
    (their leases are released), so no unit is recorded done unless its write completed.
    """

    def __init__(
        self,
        write: Callable[[int, UnitBuffer], None],
        unit_rows: int,
        d_model: int,
        layers: list[int],
        device: torch.device,
    ):
        self._write = write
        self._shape = (unit_rows, d_model)
        self._layers = layers
        self._device = device
        self._pin = device.type == "cuda"
        self._free: queue.Queue[UnitBuffer] = queue.Queue()
        self._made = 0
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=UNITS_IN_FLIGHT)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bae-harvest-writer", daemon=True)

    def __enter__(self) -> OverlappedWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._jobs.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                with job.lease:
                    if self.error is None:
                        if job.buffer.copied is not None:
                            job.buffer.copied.synchronize()
                        self._write(job.unit, job.buffer)
            except BaseException as exc:  # re-raised on the main thread
                self.error = self.error or exc
            finally:
                self._free.put(job.buffer)
                self._jobs.task_done()

    def buffer(self) -> UnitBuffer:
        """A free host buffer (made while fewer than ``UNITS_IN_FLIGHT`` exist, else the next one the
        writer frees)."""
        self._raise()
        if self._free.empty() and self._made < UNITS_IN_FLIGHT:
            self._made += 1
            pin = self._pin
            return UnitBuffer(
                {k: torch.empty(self._shape, dtype=torch.float32, pin_memory=pin) for k in self._layers}
            )
        buffer = self._free.get()
        self._raise()
        return buffer

    def submit(self, unit: int, buffer: UnitBuffer, lease: contextlib.ExitStack) -> None:
        """Hand a filled unit to the writer, with the lease it releases after the write."""
        if self._pin:
            buffer.copied = torch.cuda.Event()
            buffer.copied.record(torch.cuda.current_stream(self._device))
        job = _Job(unit, buffer, lease)
        try:
            self._raise()
        except BaseException:
            lease.close()
            raise
        self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every unit handed over is written."""
        self._jobs.join()
        self._raise()
