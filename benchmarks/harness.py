"""What every benchmark shares: interleaved timing, the result record, the machine description.

Absolute times on a shared machine are noise, so every benchmark reports a *ratio* of two
measurements taken in the same process: a warm-up call of each side first, then ``repeats``
rounds that each time every side back to back (rotating which goes first), and the ratio of
the medians. Both sides must produce the same outputs; each benchmark checks that
before timing and raises :class:`OutputMismatch` otherwise.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Size = Literal["tiny", "small", "full"]
SIZES: tuple[Size, ...] = ("tiny", "small", "full")

#: Default timed rounds per size (``--repeats`` overrides); the median is reported.
DEFAULT_REPEATS: dict[str, int] = {"tiny": 2, "small": 5, "full": 7}


class OutputMismatch(AssertionError):
    """Ours and the baseline disagree: the ratio would be meaningless."""


@dataclass
class Timing:
    """Seconds per call of each timed side (``"ours"``, ``"baseline"``, ...), one entry per round."""

    runs: dict[str, list[float]]

    def median(self, side: str) -> float:
        return statistics.median(self.runs[side])

    @property
    def speedup(self) -> float:
        """Baseline time / our time (> 1: ours is faster)."""
        return self.median("baseline") / self.median("ours")

    def medians(self) -> dict[str, float]:
        return {f"{side}_median": self.median(side) for side in self.runs}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> Timing:
    """Time every callable of ``sides`` once per round, in an order that rotates each round,
    after ``warmup`` untimed calls of each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    names = list(sides)
    timing = Timing(runs={name: [] for name in names})
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            timing.runs[name].append(_timed(sides[name]))
    return timing


def machine() -> dict[str, Any]:
    """Where the numbers were taken."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


@dataclass
class BenchmarkResult:
    """One benchmark's entry in ``results.json`` / ``RESULTS.md``.

    ``ratio`` is defined by ``metric`` (usually baseline time / our time); ``goal`` is met when
    ``ratio`` compares to ``goal_value`` as ``goal_op`` says. ``passed`` is ``None`` when the
    benchmark has no goal or could not run (``error`` then says why).
    """

    name: str
    what: str
    baseline: str
    metric: str
    ratio: float | None
    goal_op: Literal[">=", "<", ""] = ""
    goal_value: float | None = None
    size: str = "small"
    sizes: dict[str, Any] = field(default_factory=dict)
    repeats: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # medians and other measured times
    extra: dict[str, Any] = field(default_factory=dict)  # peak memory, start-up, secondary ratios
    notes: str = ""
    torch_threads: int = 0
    machine: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def goal(self) -> str:
        return f"{self.goal_op} {self.goal_value:g}" if self.goal_op and self.goal_value is not None else "-"

    @property
    def passed(self) -> bool | None:
        if self.ratio is None or not self.goal_op or self.goal_value is None:
            return None
        return self.ratio >= self.goal_value if self.goal_op == ">=" else self.ratio < self.goal_value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "goal": self.goal, "passed": self.passed}


def check_close(name: str, ours: Any, baseline: Any, atol: float, rtol: float = 0.0) -> float:
    """Raise :class:`OutputMismatch` unless two tensors agree; return the max absolute difference."""
    import torch

    ours, baseline = torch.as_tensor(ours).detach(), torch.as_tensor(baseline).detach()
    if ours.shape != baseline.shape:
        raise OutputMismatch(f"{name}: shape {tuple(ours.shape)} != baseline {tuple(baseline.shape)}")
    diff = (ours.double() - baseline.double()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not torch.allclose(ours.double(), baseline.double(), atol=atol, rtol=rtol):
        raise OutputMismatch(f"{name}: ours and baseline differ by up to {worst:.3g} (atol {atol:g}, rtol {rtol:g})")
    return worst
