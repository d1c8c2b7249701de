"""Job submission the Ray way, against a real `ray start --head` on 127.0.0.1.

- `ray job submit --working-dir DIR -- ./stage1.yaml`: the job file runs itself (shebang).
- `mocha submit stage1.yaml` (Ray Job SDK): prints the job id, follows the logs.
Both jobs finish and leave a checkpoint in their storage path. This module starts its own
cluster and does not use the `ray_cluster` fixture (two clusters on one machine interfere).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head node on loopback, started from this environment, stopped by its own CLI."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-head-", dir="/tmp"))
    gcs, dash, agent, client, metrics = (free_port() for _ in range(5))
    # Ray 2.60 token auth: a token of our own in the environment of the head and of every
    # client (nothing read from or written to ~/.ray).
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         # every port explicit: the defaults (52365, 10001, ...) may be taken by another Ray here
         "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
         "--metrics-export-port", str(metrics),
         "--temp-dir", str(ray_tmp), "--disable-usage-stats"], env=env, timeout=180, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    _stop_cluster(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_cluster(ray_tmp: Path) -> None:
    """Stop exactly this cluster (its processes name its temp dir), not every Ray on the machine."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(ray_tmp) in " ".join(proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def project(head, tmp_path_factory):
    """A working dir holding a tiny job (executable YAML) and its data, built on the head."""
    from mocha.demo.pipeline import DemoConfig, demo_job
    from mocha.demo.synthetic import generate_shapes_dataset, iter_all_texts
    from mocha.text.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("project")
    paths = generate_shapes_dataset(root / "data" / "raw", num_train=32, num_eval=8)
    train_bpe_tokenizer(iter_all_texts(paths, templates=("plain",)), root / "tokenizer", vocab_size=1024)
    # built on the head by the CLI (a Ray client in this process would need the token mode set
    # before `import ray`)
    shards = _run([str(BIN / "mocha"), "data", "shard", "--input", str(paths.stage1), "--images", str(paths.image_dir),
                   "--output", str(root / "data" / "stage1" / "shards"), "--samples-per-shard", "8",
                   "--ray-address", head["gcs"]], head, root)
    assert shards.returncode == 0, shards.stdout[-2000:] + shards.stderr[-2000:]
    job = demo_job(DemoConfig(out=str(root), llm_pretrain_steps=0, stage1_steps=2, global_batch_size=4, width=32), 1, root)
    data = job.model_dump(mode="json")
    data["data"]["features"] = None
    data["checkpoint"]["every_steps"] = 2
    path = root / "stage1.yaml"
    path.write_text("#!/usr/bin/env -S python -m mocha train\n" + yaml.safe_dump(data, sort_keys=False))
    path.chmod(0o755)
    return root, path, data


def _run(cmd, head, cwd, timeout=420):
    """Run a client command; retry (bounded) while the fresh head's job agent is not up yet."""
    for _ in range(30):
        out = subprocess.run(cmd, env=head["env"], cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in out.stderr + out.stdout:
            return out
        time.sleep(2)
    return out


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads((d / "state.json").read_text())["extra_state"]["step"]
                  for d in run_dir.glob("checkpoints/step-*") if (d / "state.json").exists())


def test_ray_job_submit_runs_the_executable_job_file(head, project):
    root, path, data = project
    out = _run([str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(root),
                "--", f"./{path.name}", "--set", "run.name=via-ray-cli"], head, root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    run_dir = Path(data["run"]["storage_path"]) / "via-ray-cli"
    assert _checkpoint_steps(run_dir) == [2]
    assert (run_dir / "export" / "model.safetensors").exists()


def test_mocha_submit_uses_the_job_sdk_and_follows_logs(head, project):
    root, path, data = project
    out = _run([str(BIN / "mocha"), "submit", path.name, "--address", head["dashboard"],
                "--set", "run.name=via-sdk"], head, root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "submitted job" in out.stdout and "SUCCEEDED" in out.stdout
    assert "[mocha]" in out.stdout  # the job's own log lines were followed
    assert _checkpoint_steps(Path(data["run"]["storage_path"]) / "via-sdk") == [2]
