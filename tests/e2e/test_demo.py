"""`mocha demo` at a reduced size, end to end: real Ray Data, Ray Train, DeepSpeed (2 workers,
ep_size 2), real evaluation and report.

What the trained model must show at this size: the text pre-training taught the LLM to answer
yes/no questions about described scenes (at least 95% of held-out ones), its stage-2 loss fell
to under half, it answers POPE's existence questions in the trained "Yes."/"No." form, and it answers them clearly better than the
same model before MoCHA training (pre-trained LLM, untrained connectors): the visual tokens
carry which objects are in a held-out image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_reduced_demo_learns_and_writes_its_report(ray_cluster, tmp_path):
    from mocha.demo.pipeline import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), num_train=384, num_eval=24, llm_pretrain_steps=1000,
                     stage1_steps=120, stage2_steps=220, global_batch_size=16)
    summary = run_demo(cfg)
    root = Path(cfg.out)

    before, after = summary["untrained"], summary["trained"]
    pope_answers = [json.loads(line) for line in (root / "eval" / "trained" / "pope_random_answers.jsonl")
                    .read_text().splitlines()]
    in_form = sum(a["text"] in ("Yes.", "No.") for a in pope_answers) / len(pope_answers)
    assert in_form >= 0.9, sorted({a["text"] for a in pope_answers})
    # measured 100% (50% before); an LLM that did not learn the look-up caps everything after it
    assert summary["llm_pretraining"]["yes_no_accuracy_after"] >= 0.95, summary["llm_pretraining"]
    # measured +37 points on 2 CPU cores (50.0% -> 87.1%); untrained connectors or a hand-off that is
    # not loaded leave it near 50%
    assert after["pope_accuracy"] >= before["pope_accuracy"] + 0.25, (before["pope_accuracy"], after["pope_accuracy"])
    # MME's yes/no forms about the image (the untrained model answers them at chance): measured
    # existence and colour 52% -> 88%
    mme_before, mme_after = before["scores"]["mme"]["subtasks"], after["scores"]["mme"]["subtasks"]
    for subtask in ("existence", "color"):
        assert mme_after[subtask]["accuracy"] >= mme_before[subtask]["accuracy"] + 0.2, (subtask, mme_before, mme_after)
    assert (root / "llm" / "model.safetensors").exists() and "pre-trained on text" in (root / "report.md").read_text()
    stage2 = [json.loads(line) for line in (root / "train" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert stage2[-1]["lm_loss"] < 0.5 * stage2[0]["lm_loss"]
    report = (root / "report.md").read_text()
    for png in ("losses.png", "expert_load.png", "hga_gates.png"):
        assert f"plots/{png}" in report and (root / "plots" / png).stat().st_size > 1000
    assert "POPE (after stage 2)" in report and "MME (after stage 2)" in report
    examples = (root / "examples.md").read_text()
    assert "(examples.md)" in report
    for section in ("POPE adversarial", "POPE popular", "POPE random", "MME existence", "MME count", "MME color"):
        assert examples.count(f"| {section} | ![eval_") == 2, section  # its first yes and first no question
    assert json.loads((root / "summary.json").read_text())["trained"]["pope_accuracy"] == after["pope_accuracy"]
    # the run directory holds what the demo promises
    for stage in (1, 2):
        run = root / "train" / f"stage{stage}"
        assert (run / "metrics.jsonl").exists() and any(run.glob("checkpoints/step-*/state.json"))
    assert (root / "train" / "stage2" / "export" / "model.safetensors").exists()
    assert (root / "jobs" / "stage2.yaml").exists()
