"""Prepare the next optimizer steps' batches on a background thread while the current step computes.

Reading a step's samples (Ray Data iteration), decoding them and collating the micro-batches is
host work the training step does not depend on until it starts; done inline it adds straight to
the step time. ``StepPrefetcher`` runs the step-producing function on one worker thread
(``concurrent.futures``, so a failure comes back to the caller as the original exception with
its message and traceback) and keeps at most ``depth`` steps ready ahead of the one being
consumed.

Order and position: one worker thread calls ``make_step`` strictly one call after another, so
the items come out in exactly the order inline calls would give them; the caller only ever sees
items it asked for, and ``consumed`` counts those. Prefetched items are never counted, and at
most ``total`` calls are made, so nothing past the run's last step is read.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class StepPrefetcher(Generic[T]):
    """``next()`` returns the result of the next ``make_step()`` call, computed ahead of time.

    ``depth``: steps prepared ahead of the one returned (0: call ``make_step`` inline, no
    thread). ``total``: how many items the caller will take; ``next()`` past it raises
    ``StopIteration``. Use as a context manager (or call ``close``) so the thread stops when the
    loop ends or fails: pending steps are cancelled, a step being prepared is awaited.
    """

    def __init__(self, make_step: Callable[[], T], depth: int, total: int):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.make_step, self.depth, self.total = make_step, depth, total
        self.consumed = 0  # items handed to the caller (never the ones only prepared)
        self._submitted = 0
        self._closed = False
        self._failed = False  # set by the worker thread: a step raised, make no further calls
        self._pending: deque[Future[T]] = deque()
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="mocha-prefetch")
                          if depth else None)

    def __enter__(self) -> "StepPrefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "StepPrefetcher[T]":
        return self

    def __next__(self) -> T:
        return self.next()

    def next(self) -> T:
        if self._closed:
            raise RuntimeError("the step prefetcher is closed (its loop ended or a step failed)")
        if self.consumed >= self.total:
            raise StopIteration
        if self._executor is None:
            item = self.make_step()
        else:
            while len(self._pending) <= self.depth and self._submitted < self.total:
                self._pending.append(self._executor.submit(self._make_step_once_healthy))
                self._submitted += 1
            try:
                item = self._pending.popleft().result()
            except BaseException:
                self.close()  # the producer is broken (or the wait was interrupted): stop reading
                raise
        self.consumed += 1
        return item

    def _make_step_once_healthy(self) -> T:
        """``make_step`` on the worker thread; after a failure the steps queued behind it do not
        read on (the caller gets the first error, from the failed step's future)."""
        if self._failed:
            raise RuntimeError("not prepared: an earlier step failed")
        try:
            return self.make_step()
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        """Cancel the steps not started, wait for the one in progress, stop the thread."""
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
