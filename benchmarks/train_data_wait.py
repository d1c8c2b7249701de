"""Data-wait fraction of the training step with Ray Data ingest.

From ``metrics.jsonl`` of the feature-shard fit (``benchmarks.training_runs``): each worker reads
its streams' shards with ``ray.data.read_webdataset``; a background thread reads, decodes and
collates the next steps' micro-batches (``data.prefetch_batches``, the job default) while the
current step computes, and the loop records how long it still waited for the step's batches.
``data_wait_fraction`` = data-wait time / step time, summed over workers. The median over steps
after the warm-up is reported, and the worst step; the same fit with ``prefetch_batches: 0``
(everything inline, the loop before prefetching) is reported beside it.
"""

from __future__ import annotations

from benchmarks.harness import BenchmarkResult
from benchmarks.training_runs import SIZES, results, step_summary, train_sizes

NAME = "train_data_wait"


def run(size: str, repeats: int) -> BenchmarkResult:
    features = step_summary(size, "features_ep2")
    inline = step_summary(size, "features_ep2_inline")
    online = step_summary(size, "online_ep2")
    records = results(size)["features_ep2"]["records"][SIZES[size].warmup_steps:]
    return BenchmarkResult(
        name=NAME,
        what="data-wait fraction of the training step, Ray Data ingest of feature shards (2 workers, "
             "next steps prefetched on a background thread)",
        baseline="- (fraction of our own step time)",
        metric="median data_wait_fraction over steps after warm-up (metrics.jsonl)",
        ratio=features["data_wait_fraction"], goal_op="<", goal_value=0.05,
        sizes=train_sizes(size), repeats=features["steps"],
        seconds={"data_wait_median": features["data_wait_s"], "step_median": features["step_time_s"],
                 "inline_data_wait_median": inline["data_wait_s"], "inline_step_median": inline["step_time_s"]},
        extra={"worst_step_fraction": max((r["data_wait_fraction"] for r in records), default=None),
               "inline_fraction": inline["data_wait_fraction"],
               "online_encoders_fraction": online["data_wait_fraction"]},
        notes="data wait = time the loop blocked for the step's collated micro-batches, i.e. the read + decode "
              "+ collate work the prefetch thread (data.prefetch_batches=2) did not hide; inline_* = the same "
              "fit with prefetch_batches=0 (all of that work in the step, as before prefetching); "
              "online_encoders_fraction is the prefetched fit from image shards (image decode + preprocess).",
    )
