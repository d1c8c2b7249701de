"""Data-wait fraction of the training step with Ray Data ingest.

From ``metrics.jsonl`` of the feature-shard fit (``benchmarks.training_runs``): each worker reads
its streams' shards with ``ray.data.read_webdataset`` and the loop records the time it waited
for (and collated) the step's micro-batches; ``data_wait_fraction`` = data-wait time / step time,
summed over workers. The median over steps after the warm-up is reported, and the worst step.
"""

from __future__ import annotations

from benchmarks.harness import BenchmarkResult
from benchmarks.training_runs import SIZES, results, step_summary, train_sizes

NAME = "train_data_wait"


def run(size: str, repeats: int) -> BenchmarkResult:
    features = step_summary(size, "features_ep2")
    online = step_summary(size, "online_ep2")
    records = results(size)["features_ep2"]["records"][SIZES[size].warmup_steps:]
    return BenchmarkResult(
        name=NAME,
        what="data-wait fraction of the training step, Ray Data ingest of feature shards (2 workers)",
        baseline="- (fraction of our own step time)",
        metric="median data_wait_fraction over steps after warm-up (metrics.jsonl)",
        ratio=features["data_wait_fraction"], goal_op="<", goal_value=0.05,
        sizes=train_sizes(size), repeats=features["steps"],
        seconds={"data_wait_median": features["data_wait_s"], "step_median": features["step_time_s"]},
        extra={"worst_step_fraction": max((r["data_wait_fraction"] for r in records), default=None),
               "online_encoders_fraction": online["data_wait_fraction"]},
        notes="data wait includes decoding the step's samples and collating them (the loop times both); "
              "online_encoders_fraction is the same from image shards (image decode + preprocess in the wait).",
    )
