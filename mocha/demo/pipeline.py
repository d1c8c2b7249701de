"""The end-to-end demo on the embedded default: the real pipeline, small.

1. generate the coloured-shapes dataset (LLaVA JSON + PNGs, POPE and MME files);
2. train a BPE tokenizer on its text (loaded back through ``AutoTokenizer``);
3. pre-train the tiny LLM on text (:mod:`mocha.demo.pretrain_llm`, the stand-in for Phi-2's
   pre-training; the jobs load it through ``llm.pretrained``);
4. ``mocha data shard`` -> ``mocha data features`` with the tiny encoders (Ray Data, local);
5. stage 1 then stage 2 with Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, ``ep_size=2``, from
   the feature shards, with checkpoints;
6. evaluate the model before and after MoCHA training on POPE and MME, generate a few answers;
7. write ``report.md`` with scores and plots next to checkpoints, metrics and the export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from mocha.config import StrictModel
from mocha.train.job import JobConfig


class DemoConfig(StrictModel):
    out: str = Field(default="runs/demo", description="run directory")
    num_train: int = Field(default=768, ge=16, description="training images (each gives a caption and a conversation)")
    num_eval: int = Field(default=64, ge=8, description="held-out images for POPE / MME")
    llm_pretrain_steps: int = Field(default=1000, ge=0, description="text pre-training steps of the tiny LLM "
                                    "(0: MoCHA training starts from a random LLM, which stage 1 cannot align to)")
    stage1_steps: int = Field(default=150, ge=1, description="stage-1 (caption alignment) optimizer steps")
    stage2_steps: int = Field(default=600, ge=1, description="stage-2 (instruction tuning) optimizer steps")
    stage1_lr: float = Field(default=2e-3, gt=0, description="stage-1 peak learning rate")
    stage2_lr: float = Field(default=1e-3, gt=0, description="stage-2 peak learning rate")
    global_batch_size: int = Field(default=16, ge=2)
    width: int = Field(default=128, ge=16, multiple_of=8, description="LLM hidden size (the tiny model's width; a multiple of 8)")
    layers: int = Field(default=2, ge=1, description="LLM layers")
    workers: int = Field(default=2, ge=1)
    ep_size: int = Field(default=2, ge=1)
    samples_per_shard: int = Field(default=64, ge=1)
    seed: int = 0
    num_cpus: int = Field(default=2, ge=1, description="CPUs given to the local Ray")


def demo_model_config(cfg: DemoConfig, template: str, llm_dir: str | Path | None = None):
    """The demo's tiny MoCHA. ``llm_dir``: the text-pre-trained LLM (``save_pretrained`` form)
    to load instead of building the random one described here."""
    from mocha.model.tiny import tiny_model_config

    if llm_dir is not None:
        return tiny_model_config(llm={"family": "phi", "pretrained": str(llm_dir)}, template=template, max_length=256)
    llm = {"family": "phi", "config": {"vocab_size": 1024, "hidden_size": cfg.width, "intermediate_size": 4 * cfg.width,
                                       "num_hidden_layers": cfg.layers, "num_attention_heads": 4,
                                       "num_key_value_heads": 4, "max_position_embeddings": 512,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                                       "resid_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}}
    return tiny_model_config(llm=llm, template=template, max_length=256)


def pretrained_llm_dir(cfg: DemoConfig, root: Path) -> Path | None:
    """Where the demo keeps its text-pre-trained LLM (None when pre-training is off)."""
    return root / "llm" if cfg.llm_pretrain_steps else None


def demo_job(cfg: DemoConfig, stage: int, root: Path, init_from: str | None = None) -> JobConfig:
    """The job spec of one demo stage (also written to ``<out>/jobs/stage{N}.yaml``)."""
    data = root / "data" / f"stage{stage}"
    return JobConfig.model_validate({
        "stage": stage,
        "model": demo_model_config(cfg, "plain" if stage == 1 else "phi", pretrained_llm_dir(cfg, root)).model_dump(),
        "tokenizer": str(root / "tokenizer"),
        "init": {"trainable_from": init_from},
        "data": {"shards": str(data / "shards"), "features": str(data / "features"), "num_streams": cfg.workers},
        "schedule": {"global_batch_size": cfg.global_batch_size, "micro_batch_size": cfg.global_batch_size // cfg.workers,
                     "max_steps": cfg.stage1_steps if stage == 1 else cfg.stage2_steps,
                     "lr": cfg.stage1_lr if stage == 1 else cfg.stage2_lr, "warmup_ratio": 0.05, "min_lr_ratio": 0.1,
                     "precision": "fp32", "seed": cfg.seed, "log_every": 10},
        "deepspeed": {"zero_stage": 2, "ep_size": cfg.ep_size},
        "checkpoint": {"every_steps": max(10, (cfg.stage1_steps if stage == 1 else cfg.stage2_steps) // 3), "keep": 2},
        "scaling": {"num_workers": cfg.workers, "cpus_per_worker": 0.5},
        "run": {"name": f"stage{stage}", "storage_path": str(root / "train"), "max_failures": 1},
    })


def _step(msg: str) -> float:
    print(f"\n[demo] === {msg}", flush=True)
    return time.perf_counter()


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import ray

    from mocha.demo.evaluate import evaluate_model, sample_answers
    from mocha.demo.pretrain_llm import LLMPretrainConfig, pretrain_llm
    from mocha.demo.synthetic import generate_shapes_dataset, iter_all_texts
    from mocha.text.tokenizer import train_bpe_tokenizer
    from mocha.train.launcher import fit
    from pipelines.features import FeatureJobConfig, build_features
    from pipelines.shard import ShardJobConfig, build_shards

    root = Path(cfg.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = t = _step(f"1/7 generating the coloured-shapes dataset ({cfg.num_train} train, {cfg.num_eval} held-out images)")
    paths = generate_shapes_dataset(root / "data" / "raw", num_train=cfg.num_train, num_eval=cfg.num_eval, seed=cfg.seed)
    timings["dataset_s"] = time.perf_counter() - t

    t = _step("2/7 training a BPE tokenizer on the dataset text")
    tokenizer = train_bpe_tokenizer(iter_all_texts(paths, templates=("plain", "phi")), root / "tokenizer",
                                    vocab_size=1024, family="phi")
    print(f"[demo] tokenizer: {len(tokenizer)} tokens -> {root / 'tokenizer'}")
    timings["tokenizer_s"] = time.perf_counter() - t

    llm_dir = pretrained_llm_dir(cfg, root)
    llm_pretraining = None
    if llm_dir is not None:
        t = _step(f"3/7 pre-training the tiny LLM on text ({cfg.llm_pretrain_steps} steps; the stand-in for Phi-2's pre-training)")
        llm_pretraining = pretrain_llm(demo_model_config(cfg, "phi").llm, tokenizer, root / "tokenizer", llm_dir,
                                       LLMPretrainConfig(steps=cfg.llm_pretrain_steps, seed=cfg.seed))
        timings["llm_pretrain_s"] = time.perf_counter() - t

    if not ray.is_initialized():
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    t = _step("4/7 shards and frozen-encoder features (Ray Data)")
    for stage, source in ((1, paths.stage1), (2, paths.stage2)):
        data = root / "data" / f"stage{stage}"
        report = build_shards(ShardJobConfig(input=str(source), images=str(paths.image_dir), output=str(data / "shards"),
                                             samples_per_shard=cfg.samples_per_shard))
        print(f"[demo] stage {stage} shards: {report.manifest['num_samples']} samples in {report.manifest['num_shards']} "
              f"shards, {report.manifest['num_quarantined']} quarantined")
        feats = build_features(FeatureJobConfig(shards=str(data / "shards"), output=str(data / "features"),
                                                model=demo_model_config(cfg, "plain" if stage == 1 else "phi", llm_dir),
                                                batch_size=64))
        print(f"[demo] stage {stage} features: {feats.summary()}")
    timings["data_s"] = time.perf_counter() - t

    jobs_dir = root / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    t = _step("5/7 evaluating the model before MoCHA training (baseline: same LLM, untrained connectors)")
    untrained = evaluate_model(None, demo_model_config(cfg, "phi", llm_dir), root / "tokenizer", paths, root / "eval" / "untrained",
                               seed=cfg.seed)
    timings["eval_untrained_s"] = time.perf_counter() - t

    t = _step(f"6/7 training: stage 1 ({cfg.stage1_steps} steps) then stage 2 ({cfg.stage2_steps} steps), "
              f"{cfg.workers} workers, ZeRO-2, ep_size {cfg.ep_size}")
    job1 = demo_job(cfg, 1, root)
    (jobs_dir / "stage1.yaml").write_text(yaml.safe_dump(job1.model_dump(mode="json"), sort_keys=False))
    run1 = fit(job1)
    job2 = demo_job(cfg, 2, root, init_from=run1.export_dir)
    (jobs_dir / "stage2.yaml").write_text(yaml.safe_dump(job2.model_dump(mode="json"), sort_keys=False))
    run2 = fit(job2)
    timings["train_s"] = time.perf_counter() - t

    t = _step("7/7 evaluating the trained model, generating answers, writing the report")
    trained = evaluate_model(run2.export_dir, None, None, paths, root / "eval" / "trained", seed=cfg.seed)
    answers = sample_answers(run2.export_dir, paths, n=4)
    timings["eval_trained_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    from mocha.demo.report import write_demo_report

    summary = {"untrained": untrained, "trained": trained, "answers": answers, "timings": timings,
               "llm_pretraining": llm_pretraining,
               "config": cfg.model_dump(), "runs": {"stage1": run1.run_dir, "stage2": run2.run_dir},
               "export": run2.export_dir}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report = write_demo_report(root, summary)
    print(f"\n[demo] POPE accuracy: untrained {untrained['pope_accuracy']:.1%} -> trained {trained['pope_accuracy']:.1%}")
    print(f"[demo] MME total score: untrained {untrained['mme_total']:.1f} -> trained {trained['mme_total']:.1f}")
    print(f"[demo] report: {report}  (total {timings['total_s'] / 60:.1f} min)")
    return summary
