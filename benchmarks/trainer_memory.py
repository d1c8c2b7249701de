"""Peak memory of a trainer that trains from feature shards vs one that runs the encoders online.

Each side runs in its own fresh process (peak RSS is a per-process high-water mark): it builds
the stage-1 trainer's model exactly as ``mocha.train.loop.build_model`` does for the job, then
runs one forward/backward of a micro-batch: precomputed features on the ``features`` side,
pixels through the frozen encoders on the ``online`` side. The ratio is online peak / features
peak. Since the features trainer builds no encoder (their widths and token counts come from
their configs), its peak lacks the encoders' weights and activations; at the real size those
are ~1.9B frozen parameters (the paper's SigLIP-L, ConvNeXt-XXL, CLIP-L, DINOv2-L).

Sizes: ``tiny`` the demo's tiny model; ``small`` the real encoder architectures (real widths,
resolutions and token counts) cut to 2 layers per tower and 1 block per ConvNeXt stage, beside a
small LLM; ``full`` the real encoders at full depth beside the same small LLM (about 8 GB of fp32
encoder weights: run it on a host with the memory).
"""

from __future__ import annotations

from benchmarks.harness import BenchmarkResult
from benchmarks.isolation import child_main, run_child
from benchmarks.memory import mib

NAME = "trainer_memory"
MICRO_BATCH = 2

_SHALLOW = {"siglip": {"num_hidden_layers": 2}, "clip": {"num_hidden_layers": 2}, "dinov2": {"num_hidden_layers": 2},
            "convnext": {"depths": [1, 1, 1, 1]}}
_LLM = {"family": "phi", "config": {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 1024,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                    "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 0,
                                    "pad_token_id": 0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                           "partial_rotary_factor": 0.5}}}


def model_config(size: str):
    from mocha.config import ModelConfig
    from mocha.model.encoders import real_encoder_configs
    from mocha.model.tiny import tiny_model_config

    if size == "tiny":
        return tiny_model_config().model_copy(update={"template": "plain"})  # a stage-1 job
    encoders = real_encoder_configs()
    if size == "small":
        encoders = [e.model_copy(update={"config": _SHALLOW[e.kind]}) for e in encoders]
    return ModelConfig(encoders=encoders, llm=_LLM, template="plain", max_length=4096)


def child(size: str, from_features: bool) -> dict:
    """The measured side, in a fresh process: the trainer's model and one training micro-step."""
    import tempfile
    from pathlib import Path

    import torch

    from mocha.demo.pipeline import DemoConfig, demo_job
    from mocha.text.conversation import IMAGE_TOKEN_INDEX
    from mocha.train.job import JobConfig
    from mocha.train.loop import build_model

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="mocha-bench-mem-"))
    job = demo_job(DemoConfig(out=str(root), llm_pretrain_steps=0, width=64), 1, root).model_dump()
    job["model"] = model_config(size).model_dump()
    job["data"]["features"] = job["data"]["features"] if from_features else None
    job = JobConfig.model_validate(job)
    model = build_model(job, vocab_size=1024, device="cpu")

    ids = torch.randint(1, 1000, (MICRO_BATCH, 32))
    ids[:, 1] = IMAGE_TOKEN_INDEX
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(ids < 0, -100)}
    if from_features:
        inputs["features"] = {k: torch.randn(MICRO_BATCH, model.encoder_tokens[k], model.encoder_widths[k])
                              for k in model.encoder_kinds}
    else:
        inputs["pixel_values"] = {k: torch.randn(MICRO_BATCH, 3, enc.image_size, enc.image_size)
                                  for k, enc in model.encoders.items()}
    model(**inputs).loss.backward()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": params, "trainable": trainable, "visual_tokens": model.num_visual_tokens,
            "encoder_tokens": model.encoder_tokens}


def run(size: str, repeats: int) -> BenchmarkResult:
    import time

    sides = {}
    for name, from_features in (("features", True), ("online", False)):
        start = time.perf_counter()
        result, peak = run_child(__name__, {"size": size, "from_features": from_features}, timeout=1800)
        sides[name] = {**result, "peak_mib": mib(peak), "seconds": time.perf_counter() - start}
    if sides["features"]["trainable"] != sides["online"]["trainable"]:
        raise AssertionError(f"the two trainers train different parameter counts: {sides}")
    if sides["features"]["encoder_tokens"] != sides["online"]["encoder_tokens"]:
        raise AssertionError(f"token counts from encoder configs differ from built encoders: {sides}")
    return BenchmarkResult(
        name=NAME,
        what="peak RSS of a stage-1 trainer process (model build + one forward/backward) training from feature shards",
        baseline="the same trainer with the frozen encoders built and run online",
        metric="ratio = online peak RSS / features peak RSS (whole process, fresh per side)",
        ratio=sides["online"]["peak_mib"] / sides["features"]["peak_mib"],
        sizes={"model": size, "micro_batch": MICRO_BATCH, "visual_tokens": sides["online"]["visual_tokens"],
               "encoder_tokens": sides["online"]["encoder_tokens"]},
        repeats=1,
        seconds={f"{k}_process": v["seconds"] for k, v in sides.items()},
        extra={"peak_rss_mib": {k: v["peak_mib"] for k, v in sides.items()},
               "parameters": {k: v["parameters"] for k, v in sides.items()},
               "trainable_parameters": sides["features"]["trainable"]},
        notes="One process per side (peak RSS includes the interpreter, torch and transformers, ~0.5 GB); "
              "the features trainer never builds an encoder, so the gap is the encoders' weights and activations.",
    )


if __name__ == "__main__":
    child_main(child)
