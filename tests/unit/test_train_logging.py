"""Worker-side training output goes through logging, so each line reaches the driver once.

Inside a Ray Train (v2) worker, ``print`` is patched to log through the root logger and also to
echo to the worker's (wrapped) stdout: every printed line reached the driver twice, once per
stream. Logging goes through the handlers Ray Train configures, once.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import mocha.train
from mocha.train.job import load_job
from mocha.train.metrics import MetricsLog, StepMetrics

JOBS = Path(__file__).resolve().parents[2] / "jobs"
#: Modules whose code runs inside Ray Train workers.
WORKER_MODULES = ("loop.py", "metrics.py", "handoff.py", "checkpoint.py", "data.py", "engine.py", "prefetch.py", "shards.py")


def test_step_line_is_logged_once_and_not_printed(caplog, capsys):
    job = load_job(JOBS / "stage1.yaml")
    m = StepMetrics()
    m.loss, m.lm_loss, m.samples, m.tokens = 1.5, 1.5, 2, 10
    with caplog.at_level(logging.INFO, logger="mocha.train.metrics"):
        layout = {"world_size": 1, "ep_size": 1, "grad_accum": 1}
        MetricsLog(job, rank=0).step_record(job.schedule.log_every, m, layout, 0.1, 0.0, 1e-3)
    lines = [r.getMessage() for r in caplog.records if r.name == "mocha.train.metrics"]
    assert len(lines) == 1 and lines[0].startswith("[mocha] stage 1 step 1: loss 1.5000")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("module", WORKER_MODULES)
def test_worker_modules_do_not_print(module):
    tree = ast.parse((Path(mocha.train.__file__).parent / module).read_text())
    calls = [n.lineno for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert calls == [], f"mocha/train/{module} prints at lines {calls}; use its logger"
