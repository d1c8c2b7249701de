"""Checkpoint memory and bandwidth: peak additional host memory per rank during a save and a load,
as a multiple of the rank's 1/N share of the training state, for the sharded checkpoints vs the
consolidated ones they replaced.

Each configuration (N = 1, 2, 4 gloo ranks; two model sizes, the larger with >= 100M trainable
parameters) builds a DeepSpeed ZeRO-2 engine (fp32, torch AdamW) over a stack of trainable Linear
layers, takes one optimizer step (so AdamW's moments exist), and on every rank measures with
``benchmarks.memory.peak_rss_during``:

* ours: ``mocha.train.checkpoint.save_checkpoint`` then ``load_checkpoint`` of the same state;
* baseline: what the consolidated checkpoints did on every rank -- the full fp32 weight and both
  moments of every parameter assembled (``safe_get_full_fp32_param`` /
  ``safe_get_full_optimizer_state``) and kept until written.

The ratio is peak additional bytes / (12 bytes x trainable parameters / N), the worst rank. The
issue's bound for ours: <= 1.25 plus the largest tensor's share; the baseline is ~N. Save and
load bandwidth (MB/s over the bytes of all shards) are reported per N.
"""

from __future__ import annotations

import tempfile

from benchmarks.harness import BenchmarkResult

NAME = "checkpoint_memory"

#: (layers, width) of the trainable Linear stack per size: "small" and "large" model.
MODELS: dict[str, dict[str, tuple[int, int]]] = {
    "tiny": {"small": (2, 64), "large": (2, 256)},
    "small": {"small": (8, 1024), "large": (24, 2048)},  # 8.4M and 100.7M parameters
    "full": {"small": (8, 1024), "large": (24, 2048)},
}
WORLDS: dict[str, tuple[int, ...]] = {"tiny": (1, 2), "small": (1, 2, 4), "full": (1, 2, 4)}


def _measure(rank: int, world: int, layers: int, width: int, directory: str) -> dict:
    """On one rank: peak extra RSS of our save, our load and the consolidated gather."""
    import time

    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from torch import nn

    from benchmarks.memory import peak_rss_during
    from mocha.train.checkpoint import load_checkpoint, save_checkpoint
    from mocha.train.engine import DeepSpeedSettings, build_deepspeed_config, initialize_engine

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    engine = initialize_engine(model, build_deepspeed_config(DeepSpeedSettings(zero_stage=2, lr=1e-4)))
    loss = engine(torch.randn(1, width)).square().mean()
    engine.backward(loss)
    engine.step()
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4

    timing: dict[str, float] = {}

    def save():
        start = time.perf_counter()
        stats = save_checkpoint(engine, model, directory, {"step": 1})
        timing["save_s"], timing["bytes"] = time.perf_counter() - start, stats.bytes

    def load():
        start = time.perf_counter()
        load_checkpoint(engine, model, directory)
        timing["load_s"] = time.perf_counter() - start

    def consolidated():
        kept = {}
        for i, p in enumerate(model.parameters()):
            kept[f"w{i}"] = safe_get_full_fp32_param(p).float().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                kept[f"{key}{i}"] = safe_get_full_optimizer_state(p, key).float().clone()
        return kept

    save_peak = peak_rss_during(save)
    load_peak = peak_rss_during(load)
    baseline_peak = peak_rss_during(consolidated)
    share = 12 * params / world
    return {"params": params, "share": share, "largest_share": largest / share,
            "save": save_peak / share, "load": load_peak / share, "baseline": baseline_peak / share, **timing}


def run(size: str, repeats: int) -> BenchmarkResult:
    from mocha.parallel.local_ranks import run_distributed

    rows: dict[str, dict] = {}
    for model_name, (layers, width) in MODELS[size].items():
        for world in WORLDS[size]:
            with tempfile.TemporaryDirectory(prefix="mocha-ckpt-bench-") as directory:
                per_rank = run_distributed(_measure, world, layers, width, directory)
            worst = {k: max(r[k] for r in per_rank) for k in ("save", "load", "baseline", "largest_share")}
            first = per_rank[0]
            rows[f"{model_name}/N={world}"] = {
                "trainable_params": first["params"], "save_ratio": round(worst["save"], 3),
                "load_ratio": round(worst["load"], 3), "consolidated_ratio": round(worst["baseline"], 3),
                "bound": round(1.25 + worst["largest_share"], 3),
                "save_mb_per_s": round(first["bytes"] / 1e6 / first["save_s"], 1),
                "load_mb_per_s": round(first["bytes"] / 1e6 / first["load_s"], 1),
                "checkpoint_mb": round(first["bytes"] / 1e6, 1)}
    worst_ours = max(max(r["save_ratio"], r["load_ratio"]) - (r["bound"] - 1.25) for r in rows.values())
    return BenchmarkResult(
        name=NAME,
        what="peak additional host memory per rank during a checkpoint save and load, per 1/N share of "
             "fp32 weights + AdamW moments (ZeRO-2, N = " + ", ".join(map(str, WORLDS[size])) + ")",
        baseline="consolidated checkpoints (every rank assembles every full tensor and moment)",
        metric="worst (save or load ratio - largest tensor's share) over model sizes and N; "
               "goal: <= 1.25 (the baseline's ratio grows like N)",
        ratio=float(worst_ours), goal_op="<", goal_value=1.2501,
        sizes={k: list(v) for k, v in MODELS[size].items()}, repeats=1,
        seconds={k: v["save_mb_per_s"] for k, v in rows.items()},
        extra=rows,
        notes="seconds holds save bandwidth (MB/s) per configuration; extra holds every ratio, the bound "
              "1.25 + largest tensor's share, and save/load MB/s",
    )
