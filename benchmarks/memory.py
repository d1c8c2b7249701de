"""Peak memory of one call, in-process (Linux ``/proc``), and of a whole process tree.

``peak_rss_during`` resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5), runs the
call and reads ``VmHWM``: the peak resident memory the call added on top of what was resident
before. While it measures, glibc is told to ``mmap`` every allocation above 64 KiB
(``mallopt(M_MMAP_THRESHOLD)``) so that freed tensors leave the resident set at once: otherwise a
later call could reuse heap pages an earlier one left resident and appear to need nothing.

``TreeMemoryPoller`` polls a process and all its descendants (a Ray driver starts the raylet, the
GCS and the workers as its children) and keeps the peak of their summed RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import threading
from collections.abc import Callable
from typing import Any

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS} has no {field} (peak memory needs Linux)")
    return int(match.group(1))


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Set this process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def _set_malloc_thresholds(nbytes: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
    libc.mallopt(_M_TRIM_THRESHOLD, nbytes)
    libc.malloc_trim(0)


def peak_rss_during(fn: Callable[[], Any]) -> int:
    """Bytes of resident memory ``fn()`` needed at its peak beyond what was resident before."""
    gc.collect()
    _set_malloc_thresholds(64 * 1024)
    try:
        reset_peak_rss()
        before = current_rss_bytes()
        fn()
        return max(0, peak_rss_bytes() - before)
    finally:
        _set_malloc_thresholds(_GLIBC_DEFAULT_THRESHOLD)


class TreeMemoryPoller:
    """Peak summed RSS of process ``pid`` and its descendants, polled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self._root = psutil.Process(pid)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemoryPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)
