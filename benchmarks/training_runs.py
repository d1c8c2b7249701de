"""The training runs behind the three training benchmarks, run once per harness invocation.

A Ray Train fit costs tens of seconds of fixed start-up here, so the training benchmarks
(``train_from_features``, ``train_data_wait``, ``expert_parallel``) share one child process, one
private local Ray (2 CPUs) and one prepared workspace (the coloured-shapes dataset, a BPE
tokenizer, stage-1 image shards and their feature shards), and four stage-1 fits of the
demo's tiny model (``mocha.demo.pipeline.demo_job``) on 2 workers, ZeRO-2, fp32:

* ``online_ep2``: from image shards, frozen encoders run inside the step, ``ep_size=2``;
* ``features_ep2``: the same job from the precomputed feature shards (no encoders on the workers);
* ``features_ep1``: the same as ``features_ep2`` with ``ep_size=1`` (experts replicated);
* ``features_ep2_inline``: ``features_ep2`` with ``data.prefetch_batches: 0`` (the step's batches
  read, decoded and collated inline, not prepared ahead on the background thread).

Each fit's ``metrics.jsonl`` gives per-step ``step_time_s``, ``data_wait_s`` and
``data_wait_fraction``; the first ``warmup_steps`` steps (allocator and Ray Data warm-up) are
dropped and the median of the rest is taken. The fits run one after another, not interleaved
(one fit is one Ray Train run); rerun the harness to see their spread.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.isolation import child_main, local_ray, run_child



@dataclass(frozen=True)
class Fit:
    """How one benchmark fit differs from the demo's stage-1 job."""

    from_features: bool
    ep_size: int
    prefetch_batches: int | None = None  # None: the job's default


RUNS = {
    "online_ep2": Fit(from_features=False, ep_size=2),
    "features_ep2": Fit(from_features=True, ep_size=2),
    "features_ep1": Fit(from_features=True, ep_size=1),
    "features_ep2_inline": Fit(from_features=True, ep_size=2, prefetch_batches=0),
}


@dataclass(frozen=True)
class TrainSize:
    num_train: int
    steps: int
    warmup_steps: int
    global_batch_size: int
    width: int
    samples_per_shard: int


SIZES = {
    "tiny": TrainSize(num_train=32, steps=4, warmup_steps=1, global_batch_size=4, width=64, samples_per_shard=8),
    "small": TrainSize(num_train=128, steps=12, warmup_steps=2, global_batch_size=8, width=64, samples_per_shard=32),
    "full": TrainSize(num_train=512, steps=40, warmup_steps=4, global_batch_size=16, width=128, samples_per_shard=64),
}


def _prepare(root: Path, s: TrainSize):
    from mocha.demo.pipeline import DemoConfig, demo_model_config
    from mocha.demo.synthetic import generate_shapes_dataset, iter_all_texts
    from mocha.text.tokenizer import train_bpe_tokenizer
    from pipelines.features import FeatureJobConfig, build_features
    from pipelines.shard import ShardJobConfig, build_shards

    cfg = DemoConfig(out=str(root), num_train=s.num_train, num_eval=8, llm_pretrain_steps=0, stage1_steps=s.steps,
                     stage2_steps=s.steps,
                     global_batch_size=s.global_batch_size, width=s.width, samples_per_shard=s.samples_per_shard)
    paths = generate_shapes_dataset(root / "data" / "raw", num_train=s.num_train, num_eval=8)
    train_bpe_tokenizer(iter_all_texts(paths, templates=("plain", "phi")), root / "tokenizer", vocab_size=1024,
                        family="phi")
    data = root / "data" / "stage1"
    build_shards(ShardJobConfig(input=str(paths.stage1), images=str(paths.image_dir), output=str(data / "shards"),
                                samples_per_shard=s.samples_per_shard), progress=False)
    build_features(FeatureJobConfig(shards=str(data / "shards"), output=str(data / "features"),
                                    model=demo_model_config(cfg, "plain"), batch_size=32), progress=False)
    return cfg


def _job(cfg, root: Path, run: str):
    from mocha.demo.pipeline import demo_job

    spec = RUNS[run]
    job = demo_job(cfg, 1, root).model_dump()
    job["data"]["features"] = job["data"]["features"] if spec.from_features else None
    if spec.prefetch_batches is not None:
        job["data"]["prefetch_batches"] = spec.prefetch_batches
    job["deepspeed"]["ep_size"] = spec.ep_size
    job["checkpoint"]["every_steps"] = cfg.stage1_steps  # one checkpoint, at the end
    job["run"]["name"] = run
    job["schedule"]["log_every"] = 10**6
    from mocha.train.job import JobConfig

    return JobConfig.model_validate(job)


def child(size: str) -> dict[str, Any]:
    """In a fresh process: prepare the workspace and run the fits; per-run step metrics."""
    from mocha.train.launcher import fit

    s = SIZES[size]
    root = Path(tempfile.mkdtemp(prefix="mocha-bench-train-"))
    out: dict[str, Any] = {}
    try:
        with local_ray(num_cpus=2):
            start = time.perf_counter()
            cfg = _prepare(root, s)
            out["prepare_s"] = time.perf_counter() - start
            for run in RUNS:  # a failed fit is recorded and the next one still runs
                start = time.perf_counter()
                try:
                    result = fit(_job(cfg, root, run))
                except Exception as e:  # reported by the benchmarks that need this run
                    out[run] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
                    continue
                records = [json.loads(line) for line in Path(result.run_dir, "metrics.jsonl").read_text().splitlines()]
                out[run] = {"fit_s": time.perf_counter() - start, "records": records}
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


_OUTCOMES: dict[str, dict[str, Any] | Exception] = {}


def results(size: str) -> dict[str, Any]:
    """The fits' metrics, run once per process and size (a failure is kept and re-raised
    too, so the other training benchmarks do not rerun the fits)."""
    if size not in _OUTCOMES:
        try:
            _OUTCOMES[size] = run_child(__name__, {"size": size}, timeout=1800)[0]
        except Exception as e:  # re-raised for every benchmark that needs the fits
            _OUTCOMES[size] = e
    outcome = _OUTCOMES[size]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def steady(records: list[dict], key: str, warmup_steps: int) -> float:
    """Median of ``key`` over the steps after the warm-up."""
    values = [r[key] for r in records[warmup_steps:]] or [r[key] for r in records]
    return statistics.median(values)


def step_summary(size: str, run: str) -> dict[str, float]:
    s = SIZES[size]
    if "error" in results(size)[run]:
        raise RuntimeError(f"training fit {run!r} failed: {results(size)[run]['error']}")
    records = results(size)[run]["records"]
    if len(records) != s.steps:
        raise RuntimeError(f"{run}: expected {s.steps} steps in metrics.jsonl, got {len(records)}")
    return {"step_time_s": steady(records, "step_time_s", s.warmup_steps),
            "data_wait_s": steady(records, "data_wait_s", s.warmup_steps),
            "data_wait_fraction": steady(records, "data_wait_fraction", s.warmup_steps),
            "fit_s": results(size)[run]["fit_s"], "steps": len(records)}


def train_sizes(size: str) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(SIZES[size]), "workers": 2, "zero_stage": 2, "precision": "fp32",
            "model": "demo tiny MoCHA (4 tiny encoders, MoE connectors E=4 k=2, graph HGA, 2-layer Phi)"}


if __name__ == "__main__":
    child_main(child)
