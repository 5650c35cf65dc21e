"""Leases on a store's units, so that independent processes (a Slurm array, a Kubernetes Indexed
Job, spot instances: no rendezvous, no coordinator) share one store's work.

A process claims a unit before computing it by creating ``.<store>.claims/unit-NNNNNNNN.json``
beside the store (outside its Zarr hierarchy) as a hard link to a private file that already holds
its owner and an expiry time: ``link`` is atomic and exclusive on local file systems and on NFS, and
no process ever sees the lease empty (an exclusive create followed by a write left an empty file
when its owner was killed in between; an unreadable lease a lease's length old is taken over). A
background thread renews the lease while the unit is computed, and the file is removed once the
unit is recorded done. A lease past its expiry (a killed or preempted owner), or one whose owner is
a dead process on this host, is taken over by replacing the file and reading it back. Claims only
divide the work: the store's ``units/done`` flags stay the single record of completion, and a unit's
bytes do not depend on who computes it, so the rare race of two processes taking over one stale
lease at the same instant costs a duplicated unit, never a different store. Requires clocks that
agree to well within the lease (NTP). Stores behind URLs are not claimed (object stores have no
exclusive create that every fsspec backend offers): processes there split nothing, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bae.common.atomic_files import atomic_write_json
from bae.common.signals import StopRequest

LEASE_SECONDS = 60.0  # default lease: renewed every third of it while held


def claims_dir(store: Path) -> Path:
    """Where the leases on the units of the store at ``store`` live: a hidden sibling directory."""
    return store.parent / f".{store.name}.claims"


class UnitClaims:
    """This process's leases on the units of the store at ``store`` (a local directory)."""

    def __init__(self, store: Path, lease_seconds: float):
        self.dir = claims_dir(store)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"

    def path(self, unit: int) -> Path:
        return self.dir / f"unit-{unit:08d}.json"

    def _lease(self) -> dict[str, Any]:
        return {"owner": self.owner, "expires": time.time() + self.lease_seconds}

    def read(self, unit: int) -> dict[str, Any] | None:
        """The lease on ``unit`` (None: unclaimed, or a file caught mid-replace)."""
        try:
            return json.loads(self.path(unit).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_stale(self, lease: dict[str, Any]) -> bool:
        """Expired, or held by a process of this host that no longer runs."""
        if float(lease.get("expires", 0.0)) < time.time():
            return True
        host, _, rest = str(lease.get("owner", "")).partition(":")
        pid = rest.partition(":")[0]
        if host != self.host or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def unreadable_and_old(self, unit: int) -> bool:
        """``unit``'s lease file holds no lease (an owner killed while writing it) and has not been
        touched for a lease's length."""
        try:
            return self.path(unit).stat().st_mtime < time.time() - self.lease_seconds
        except FileNotFoundError:
            return False

    def create(self, unit: int) -> bool:
        """Create ``unit``'s lease file with this process's lease already in it (written to a
        private file, then hard-linked into place: the link is the atomic, exclusive step, so no
        process ever sees the file empty). False when the file exists."""
        private = self.dir / f".{self.owner.replace(':', '-')}-{unit}.tmp"
        private.write_text(json.dumps(self._lease()))
        try:
            os.link(private, self.path(unit))
            return True
        except FileExistsError:
            return False
        finally:
            private.unlink(missing_ok=True)

    def try_claim(self, unit: int) -> bool:
        """Claim ``unit`` if nobody holds a live lease on it."""
        if self.create(unit):
            return True
        lease = self.read(unit)
        if lease is None and not self.unreadable_and_old(unit):
            return False  # caught mid-replace, or gone: try again later
        if lease is not None and not self.is_stale(lease):
            return False
        atomic_write_json(self.path(unit), self._lease())  # take over; the last writer wins
        lease = self.read(unit)
        return lease is not None and lease.get("owner") == self.owner

    def release(self, unit: int) -> None:
        """Drop this process's lease on ``unit`` (after the unit is recorded done, or on a stop)."""
        lease = self.read(unit)
        if lease is not None and lease.get("owner") == self.owner:
            self.path(unit).unlink(missing_ok=True)

    @contextlib.contextmanager
    def holding(self, unit: int) -> Iterator[None]:
        """Keep the lease on a claimed ``unit`` renewed until the block ends, then release it."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_seconds / 3):
                lease = self.read(unit)
                if lease is not None and lease.get("owner") == self.owner:
                    atomic_write_json(self.path(unit), self._lease())

        thread = threading.Thread(target=renew, name=f"bae-lease-{unit}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(unit)


def claimed_units(
    claims: UnitClaims,
    done_mask: Callable[[], np.ndarray],
    is_done: Callable[[int], bool],
    stop: StopRequest,
    elsewhere: Callable[[list[int]], None],
    poll: float = 1.0,
) -> Iterator[int]:
    """Units this process claims, in order, until ``done_mask()`` is all true: units under another
    process's live lease are waited for (and taken over if their lease goes stale). ``elsewhere``
    hears of units that other processes finished; the caller computes each unit yielded inside
    ``claims.holding(unit)``."""
    seen = done_mask()
    while not stop.signum:
        done = done_mask()
        if news := [int(u) for u in np.flatnonzero(done & ~seen)]:
            elsewhere(news)
        seen = done
        if done.all():
            return
        claimed = False
        for unit in map(int, np.flatnonzero(~done)):
            if stop.signum:
                return
            if not claims.try_claim(unit):
                continue
            if is_done(unit):  # finished by another process since done_mask() was read
                claims.release(unit)
                continue
            claimed = True
            yield unit
            seen[unit] = True
        if not claimed:
            time.sleep(poll)


def leased_units(
    pending: list[int],
    claims: UnitClaims | None,
    done_mask: Callable[[], np.ndarray],
    is_done: Callable[[int], bool],
    stop: StopRequest,
    elsewhere: Callable[[list[int]], None],
) -> Generator[tuple[int, contextlib.AbstractContextManager[None]], None, None]:
    """The units this process computes, until a stop signal, each with the lease the caller holds
    (enters at once, exits once the unit is recorded done): ``pending`` in order (a torchrun rank's
    static share) with nothing to hold without ``claims``; with them, the units it claims, each
    under ``claims.holding(unit)``. A caller that writes units on another thread exits each lease
    there, after the unit's write."""
    if claims is None:
        for unit in pending:
            if stop.signum:
                return
            yield unit, contextlib.nullcontext()
        return
    for unit in claimed_units(claims, done_mask, is_done, stop, elsewhere):
        yield unit, claims.holding(unit)


def units_to_compute(
    pending: list[int],
    claims: UnitClaims | None,
    done_mask: Callable[[], np.ndarray],
    is_done: Callable[[int], bool],
    stop: StopRequest,
    elsewhere: Callable[[list[int]], None],
) -> Generator[int, None, None]:
    """:func:`leased_units` for a caller that computes and records each unit before asking for the
    next: each lease is held while the caller computes its unit and released when it asks for the
    next."""
    for unit, lease in leased_units(pending, claims, done_mask, is_done, stop, elsewhere):
        with lease:
            yield unit
