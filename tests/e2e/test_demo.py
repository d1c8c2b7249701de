"""`mocha demo` at a reduced size, end to end: real Ray Data, Ray Train, DeepSpeed (2 workers,
ep_size 2), real evaluation. The trained model must beat the untrained one on POPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_reduced_demo_learns_and_writes_its_report(ray_cluster, tmp_path):
    from mocha.demo.pipeline import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), num_train=256, num_eval=24, stage1_steps=10, stage2_steps=80,
                     global_batch_size=16, width=96)
    summary = run_demo(cfg)
    root = Path(cfg.out)

    before, after = summary["untrained"]["pope_accuracy"], summary["trained"]["pope_accuracy"]
    assert after > before + 0.1, (before, after)
    assert after > 0.6
    report = (root / "report.md").read_text()
    for png in ("losses.png", "expert_load.png", "hga_gates.png"):
        assert f"plots/{png}" in report and (root / "plots" / png).stat().st_size > 1000
    assert "POPE (after stage 2)" in report and "MME (after stage 2)" in report
    assert json.loads((root / "summary.json").read_text())["trained"]["pope_accuracy"] == after
    # the run directory holds what the demo promises
    for stage in (1, 2):
        run = root / "train" / f"stage{stage}"
        assert (run / "metrics.jsonl").exists() and any(run.glob("checkpoint_*/state.json"))
    assert (root / "train" / "stage2" / "export" / "model.safetensors").exists()
    assert (root / "jobs" / "stage2.yaml").exists()
