"""Run part of a benchmark in a fresh Python process, and a private local Ray inside it.

Benchmarks that start Ray or measure a process's peak memory run their measured part in a child
process (``python -m <module> --child '<json args>'``): peak RSS is a per-process high-water mark,
and a Ray session must not leak between benchmarks. The child prints its result as one JSON line
last on stdout; the parent also polls the child's whole process tree (driver, raylet, GCS, Ray
workers) for the peak of their summed RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from benchmarks.memory import TreeMemoryPoller

CHILD_FLAG = "--child"


def run_child(module: str, args: dict[str, Any], timeout: float = 900) -> tuple[dict[str, Any], int]:
    """Run ``module``'s child entry point with ``args``; returns (its JSON result, peak tree RSS bytes)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", module, CHILD_FLAG, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    with TreeMemoryPoller(proc.pid) as poller:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise RuntimeError(f"{module} child timed out after {timeout} s; stderr tail:\n{stderr[-3000:]}") from None
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} child failed (exit {proc.returncode}); stderr tail:\n{stderr[-3000:]}")
    return json.loads(lines[-1]), poller.peak_bytes


def child_main(run: Any) -> None:
    """Entry point of a child: ``run(**args)`` and print its JSON result on the last line."""
    if len(sys.argv) != 3 or sys.argv[1] != CHILD_FLAG:
        raise SystemExit(f"usage: python -m <benchmark module> {CHILD_FLAG} '<json args>' (run by the harness)")
    result = run(**json.loads(sys.argv[2]))
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A private local Ray session (own temp dir, ``num_cpus`` CPUs, no dashboard), shut down after;
    its temp dir is removed, except after a failure (it holds the worker logs)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="mocha-bench-ray-")
    os.environ["RAY_TMPDIR"] = temp_dir
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    except BaseException:
        ray.shutdown()
        print(f"[bench] Ray logs kept for inspection under {temp_dir}", file=sys.stderr, flush=True)
        raise
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
