"""Connect the pipeline driver to Ray, and the Ray Data settings the jobs rely on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: Environment variables that tell S3 clients where the endpoint is. They are forwarded to
#: Ray workers (a remote cluster's workers do not inherit the driver's environment).
#: Credentials are never forwarded: workers resolve them through their own standard chain.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")

#: Read by a locally started raylet: the niceness of its worker processes (Ray's default is 15).
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Use the running Ray session, else connect to ``address`` (or ``RAY_ADDRESS``), else
    start a local one (with ``num_cpus`` CPUs when given)."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray starts workers at niceness 15, so on a busy machine every other process comes first
        # and a parallel build falls behind a single-process loop; `ray job submit` runs jobs at 0.
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


@contextlib.contextmanager
def ordered_execution() -> Iterator[None]:
    """Ray Data settings for a job: rows come out in input order (shard assignment and
    byte-identical output depend on it) and Ray's own progress bars are off (the jobs show
    theirs). The previous settings are restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
