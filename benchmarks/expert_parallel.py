"""Expert-parallel overhead: training step time with ``ep_size=2`` vs ``ep_size=1`` on 2 workers.

Both fits train from the same feature shards (``benchmarks.training_runs``). With ``ep_size=1``
every worker holds all experts of every connector (plain data parallel); with ``ep_size=2`` each
holds half and tokens travel to their expert's rank and back with two all-to-alls per connector
(gloo on CPU here). The ratio is the price (> 1) or gain (< 1) of that exchange at this size.
"""

from __future__ import annotations

from benchmarks.harness import BenchmarkResult
from benchmarks.training_runs import step_summary, train_sizes

NAME = "expert_parallel"


def run(size: str, repeats: int) -> BenchmarkResult:
    ep2 = step_summary(size, "features_ep2")
    ep1 = step_summary(size, "features_ep1")
    return BenchmarkResult(
        name=NAME,
        what="training step time with expert parallelism, ep_size=2 (2 workers, ZeRO-2, from features)",
        baseline="the same job with ep_size=1 (experts replicated on both workers)",
        metric="ep_size=2 step time / ep_size=1 step time (median over steps after warm-up)",
        ratio=ep2["step_time_s"] / ep1["step_time_s"],
        sizes=train_sizes(size), repeats=ep2["steps"],
        seconds={"ep2_step_median": ep2["step_time_s"], "ep1_step_median": ep1["step_time_s"],
                 "ep2_fit": ep2["fit_s"], "ep1_fit": ep1["fit_s"]},
        notes="no goal set by the issue: reported as measured. Fits run one after the other, not interleaved.",
    )
