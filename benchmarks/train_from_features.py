"""Training step from precomputed feature shards vs the same step running the frozen encoders online.

Same model, same data, same 2-worker ZeRO-2 job (``benchmarks.training_runs``): ``features_ep2``
reads the feature shards and never builds the encoders; ``online_ep2`` reads the image shards,
preprocesses and runs the four frozen encoders inside every step. The speed-up is the encoders'
share of the step; with the demo's tiny encoders it is small, with the real ones (2.3B frozen
parameters next to a 2.7B LLM) it is the encoders' forward time per step.
"""

from __future__ import annotations

from benchmarks.harness import BenchmarkResult
from benchmarks.training_runs import step_summary, train_sizes

NAME = "train_from_features"


def run(size: str, repeats: int) -> BenchmarkResult:
    online = step_summary(size, "online_ep2")
    features = step_summary(size, "features_ep2")
    return BenchmarkResult(
        name=NAME,
        what="stage-1 training step from precomputed feature shards (2 workers, ZeRO-2, ep_size=2)",
        baseline="the same job from image shards with the frozen encoders run online in every step",
        metric="speed-up = online step time / feature step time (median over steps after warm-up)",
        ratio=online["step_time_s"] / features["step_time_s"],
        sizes=train_sizes(size), repeats=features["steps"],
        seconds={"features_step_median": features["step_time_s"], "online_step_median": online["step_time_s"],
                 "features_fit": features["fit_s"], "online_fit": online["fit_s"]},
        extra={"data_wait_s": {"features": features["data_wait_s"], "online": online["data_wait_s"]}},
        notes="repeats = optimizer steps per fit; the fits run one after the other in one Ray session (not "
              "interleaved). The demo's encoders are tiny, so this measures the encoders' share at that size.",
    )
