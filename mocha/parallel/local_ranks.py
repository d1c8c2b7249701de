"""Run a function on N local processes joined in a gloo process group on 127.0.0.1 (no Ray):
the multi-rank test bed of the distributed tests and the checkpoint benchmark.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with
``torch.multiprocessing``; rank ``r`` runs ``fn(rank, world_size, *args)`` after
``torch.distributed`` is initialised (gloo, env:// with the usual ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` variables, which is also what DeepSpeed expects). Each rank's
return value comes back as the list ``[result_rank0, result_rank1, ...]``; an exception in any
rank fails the call with that rank's traceback.

``fn`` must be a module-level function (spawned processes import it by name).
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, results, collected) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, fn(rank, world_size, *args), None))
        # tensors travel through shared memory owned by this process: stay until received
        collected.wait(timeout=300)
    except BaseException:  # report every failure (assertions included) to the parent
        results.put((rank, None, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results."""
    ctx = mp.get_context("spawn")
    results, collected = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, collected))
             for r in range(world_size)]
    for p in procs:
        p.start()
    by_rank: dict[int, Any] = {}
    errors: list[str] = []
    # Drain results while the ranks run (a large result would otherwise block its sender).
    while len(by_rank) < world_size:
        try:
            rank, value, error = results.get(timeout=1.0)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # a rank died without reporting (e.g. killed); the others may hang on it
            continue
        by_rank[rank] = value
        if error is not None:
            errors.append(f"rank {rank}:\n{error}")
            break
    collected.set()
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise AssertionError("distributed test failed\n" + "\n".join(errors))
    missing = [r for r in range(world_size) if r not in by_rank]
    if missing:
        raise AssertionError(f"ranks {missing} exited without a result (exit codes {[p.exitcode for p in procs]})")
    return [by_rank[r] for r in range(world_size)]
