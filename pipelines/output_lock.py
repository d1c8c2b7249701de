"""An exclusive lease on an output folder, local or ``s3://``: one job writes there at a time.

S3 has no rename and no portable create-if-absent, so the lock is a *lease object*
``_lock.json`` holding the run id, host, pid and the time it was last renewed:

1. If a lease exists, is *fresh* (renewed less than ``ttl_s`` ago) and is not ours, the run is
   refused with :class:`OutputLockedError` naming the holder. A lease written on this host by a
   process that no longer exists is stale at once (a killed run can be resumed immediately);
   any other lease goes stale ``ttl_s`` after its last renewal.
2. Otherwise, on S3, the run writes its own lease, waits ``settle_s`` and reads it back. S3 is
   last-writer-wins with read-after-write consistency, so when two runs race, every one of them
   reads back the same winner; the others refuse. On a local (or shared POSIX) filesystem the
   lease is created atomically instead (``link``, which fails when the name exists; a stale
   lease is first renamed aside, which only one racer can do), so no settle wait is needed.
3. While the job runs a daemon thread renews the lease every ``ttl_s / 4``; before renewing it
   checks the lease is still its own, and if another run took it over (after this one stalled
   for longer than ``ttl_s``) the holder learns it from :meth:`OutputLock.check`.
4. On exit the lease is deleted, if it is still ours.

The guarantee holds as long as no run takes longer than ``settle_s`` between seeing no fresh
lease and writing its own (a few milliseconds of work; ``settle_s`` defaults to one second).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from mocha.io import storage
from mocha.io.layout import OUTPUT_LOCK_NAME

LOCK_NAME = OUTPUT_LOCK_NAME
DEFAULT_TTL_S = 60.0
DEFAULT_SETTLE_S = 1.0


class OutputLockedError(RuntimeError):
    """Another run holds the output folder."""


@dataclass(frozen=True)
class Lease:
    run_id: str
    host: str
    pid: int
    renewed: float  # wall-clock seconds (time.time())

    def age(self, now: float) -> float:
        return now - self.renewed

    def describe(self, now: float) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, renewed {self.age(now):.0f} s ago)"


def _read_lease(url: str) -> Lease | None:
    try:
        payload: Any = json.loads(storage.read_bytes(url))
        return Lease(run_id=str(payload["run_id"]), host=str(payload["host"]), pid=int(payload["pid"]),
                     renewed=float(payload["renewed"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # a damaged lease protects nothing
        return None


def _process_gone(lease: Lease) -> bool:
    """The lease was written on this host by a process that has exited."""
    if lease.host != socket.gethostname():
        return False
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


class OutputLock:
    """``with OutputLock(output): ...`` holds the output folder for the block."""

    def __init__(self, output: str, run_id: str | None = None, ttl_s: float = DEFAULT_TTL_S,
                 settle_s: float = DEFAULT_SETTLE_S):
        self.url = storage.join_url(output, LOCK_NAME)
        self.run_id = run_id or uuid.uuid4().hex
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        storage.write_bytes(self.url, self._payload())

    def _refuse_if_held(self) -> None:
        held = _read_lease(self.url)
        now = time.time()
        if held is not None and held.run_id != self.run_id and held.age(now) < self.ttl_s and not _process_gone(held):
            raise OutputLockedError(
                f"{storage.basename(self.url)} in the output is held by {held.describe(now)}: another "
                f"`mocha data shard` is writing there. Wait for it to finish (a lease not renewed for "
                f"{self.ttl_s:.0f} s is stale and taken over).")

    def _payload(self) -> bytes:
        lease = Lease(self.run_id, socket.gethostname(), os.getpid(), time.time())
        return json.dumps(asdict(lease), sort_keys=True).encode()

    def _acquire_local(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(3):
            tmp = f"{path}.{self.run_id}.new"
            with open(tmp, "wb") as f:
                f.write(self._payload())
            try:
                os.link(tmp, path)  # atomic: fails if a lease exists
                return
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            self._refuse_if_held()  # fresh and foreign: refused; else stale: take it over
            aside = f"{path}.{self.run_id}.stale"
            try:
                os.rename(path, aside)  # only one of several racers moves the stale lease
                os.unlink(aside)
            except FileNotFoundError:
                pass
        raise OutputLockedError(f"lost the race for {self.url} to another run; rerun when it has finished")

    def acquire(self) -> "OutputLock":
        self._refuse_if_held()
        _, path = storage.resolve_filesystem(self.url)
        if storage.is_s3(self.url):
            self._write()
            time.sleep(self.settle_s)
            self._refuse_if_held()  # a racing run that wrote after us won; we back off
        else:
            self._acquire_local(path)
        winner = _read_lease(self.url)
        if winner is None or winner.run_id != self.run_id:
            raise OutputLockedError(f"lost the race for {self.url} to another run; rerun when it has finished")
        self._thread = threading.Thread(target=self._renew_loop, name="output-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            current = _read_lease(self.url)
            if current is not None and current.run_id != self.run_id:
                self.lost = f"the lease on {self.url} was taken over by {current.describe(time.time())}"
                return
            try:
                self._write()
            except OSError:  # a transient store error: the next tick (ttl_s / 4 later) retries
                continue

    def check(self) -> None:
        """Raise :class:`OutputLockedError` if the lease was lost (call before publishing)."""
        if self.lost:
            raise OutputLockedError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = _read_lease(self.url)
        if current is not None and current.run_id == self.run_id:
            storage.delete(self.url)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
