"""The demo's ``report.md``: before/after scores, training curves, expert load, HGA gates, and its
page of examples (``examples.md``, :mod:`mocha.demo.examples`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _records(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_demo_report(root: Path, summary: dict[str, Any]) -> Path:
    from PIL import Image

    from mocha.demo.evaluate import load_or_build
    from mocha.demo.examples import EXAMPLES_PAGE, pick_examples, write_examples_page
    from mocha.demo.synthetic import DatasetPaths
    from mocha.eval.gates import collect_hga_gates
    from mocha.report.plots import write_training_plots
    from mocha.report.report import ReportSection, score_sections, write_report
    from mocha.report.tables import markdown_table

    records = _records(summary["runs"]["stage1"]) + _records(summary["runs"]["stage2"])
    paths = DatasetPaths.under(root / "data" / "raw")
    model, _ = load_or_build(summary["export"])
    eval_images = sorted(paths.image_dir.glob("eval_*.png"))[:32]
    gates = collect_hga_gates(model, [Image.open(p).convert("RGB") for p in eval_images])
    plots = write_training_plots(records, root / "plots", gates=gates)

    before, after = summary["untrained"], summary["trained"]
    write_examples_page(root, paths.image_dir, pick_examples(before["answers_dir"], after["answers_dir"]))
    headline = markdown_table(
        ["model", "POPE accuracy (mean of 3 splits)", "MME total score"],
        [["before MoCHA training (same LLM, untrained connectors)", f"{before['pope_accuracy']:.1%}",
          f"{before['mme_total']:.1f}"],
         ["after stage 1 + stage 2", f"{after['pope_accuracy']:.1%}", f"{after['mme_total']:.1f}"]])
    cfg = summary["config"]
    timings = markdown_table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in summary["timings"].items()])
    samples = markdown_table(["image", "question", "answer", "reference"],
                             [[a["image"], a["question"], a["answer"], a["reference"]] for a in summary["answers"]])
    sections = [
        ReportSection("Summary",
                      f"Coloured-shapes demo: {cfg['num_train']} training images, {cfg['num_eval']} held out; "
                      f"stage 1 {cfg['stage1_steps']} steps, stage 2 {cfg['stage2_steps']} steps on {cfg['workers']} "
                      f"Ray Train workers (DeepSpeed ZeRO-2, ep_size {cfg['ep_size']}), LLM width {cfg['width']}. "
                      + _pretraining_sentence(summary.get("llm_pretraining")),
                      [headline]),
        *score_sections(after["scores"], "after stage 2"),
        *score_sections(before["scores"], "before MoCHA training"),
        ReportSection("Training", "Loss curves per stage, then the fraction of tokens each connector expert "
                      "received at each step (top-1 routing), then the HGA gate per encoder group on held-out images.",
                      images=[plots[k] for k in ("losses", "expert_load", "hga_gates") if k in plots]),
        ReportSection("Generated answers", "Greedy decoding on held-out images.", [samples]),
        ReportSection("Examples", f"[{EXAMPLES_PAGE}]({EXAMPLES_PAGE}): for the first yes- and no-labelled "
                      "question of every POPE split and MME subtask, the held-out image, the question and the "
                      "answers before and after MoCHA training."),
        ReportSection("Timings", "", [timings]),
    ]
    return write_report(root, *sections, title="MoCHA demo report")


def _pretraining_sentence(record: dict[str, Any] | None) -> str:
    if record is None:
        return "The LLM was not pre-trained (random weights): stage 1 has nothing to align the visual tokens to."
    return (f"The LLM was first pre-trained on text ({record['steps']} steps, batch {record['batch_size']}, "
            f"{record['seconds']:.0f} s; the stand-in for Phi-2's pre-training): loss {record['first_loss']:.2f} -> "
            f"{record['final_loss']:.2f}, yes/no accuracy on held-out described scenes "
            f"{record['yes_no_accuracy_before']:.1%} -> {record['yes_no_accuracy_after']:.1%}.")
