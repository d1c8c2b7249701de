"""Shared fixtures: offline hub, a real local S3 (moto_server on 127.0.0.1), one local Ray cluster.

Services are started lazily by the tests that need them and stopped at session end.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# Never touch a model hub from tests; keep caches out of ~/.cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server, run in a thread of the test process);
    clients, Ray workers included, find it through AWS_ENDPOINT_URL.

    (A separate ``moto_server`` process answered pyarrow's CompleteMultipartUpload with an empty
    error on this machine in some test runs; the threaded server, moto's documented way to run
    its server from tests, does not.)"""

    def __init__(self, root: Path):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError("the moto S3 server did not start")
                time.sleep(0.2)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint for the session; its env vars are exported so every client
    (boto3, pyarrow, Ray workers started later) resolves it through the standard chain."""
    server = S3Server(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    return s3_server.create_bucket(name)


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    """A local Ray cluster (2 CPUs) for one test module, isolated in its own RAY_TMPDIR and shut
    down after the module, so that modules which start their own cluster (``ray start --head``
    for job submission) never run beside it (two clusters on one machine interfere).
    It depends on ``s3_server`` so that every Ray worker inherits the S3 endpoint variables."""
    import ray

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(ray_tmp), log_to_driver=True,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k.startswith(("AWS_", "HF_", "TRANSFORMERS_"))}})
    yield ray
    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if saved_tmpdir is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = saved_tmpdir
