"""The run's sample ledger: which samples (``__key__``) every optimizer step consumed.

Written so that anyone can check, after any number of restarts and resizes, that no sample of an
epoch was skipped or seen twice (``read_ledger`` + a comparison with the planned schedule)::

    <run_dir>/samples/step-00000500.jsonl    steps 1..500, one JSON line per step
    <run_dir>/samples/step-00001000.jsonl    steps 501..1000, ...

One line: ``{"step": 7, "world_size": 3, "written_at": 1733130000.0, "keys": {"0": [...], "1": [...]}}``
-- the step's sample ids by data stream (``mocha.train.data``), all of the step's
``global_batch_size`` of them.

How it scales: every worker keeps the ids of its own streams in memory between checkpoints only
(``global_batch / W`` short strings a step); at each checkpoint one ``gather_object`` brings them
to rank 0, which writes one file for the interval. 64 workers, 128 samples a step and 500 steps
between checkpoints make a ~2 MB file per checkpoint; nothing grows with the run's length on a
worker.

Consistency with checkpoints: the interval's file is written just before the checkpoint of its
last step, and ids of steps after the latest checkpoint live only in memory. A run that restarts
from a checkpoint therefore redoes exactly the steps it has no ledger for -- or, if it died
between the ledger file and the end of the checkpoint, rewrites the same file name with the
redone steps. ``read_ledger`` keeps, for each step, the most recently written line, so a line left
by an attempt whose steps were redone never counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch.distributed as dist

from mocha.io import storage
from mocha.io.layout import SAMPLES_DIR, SAMPLES_FILE


@dataclass
class LedgerStep:
    step: int
    world_size: int
    written_at: float
    keys: dict[int, list[str]]  # stream -> sample ids, in stream order

    @property
    def all_keys(self) -> list[str]:
        """The step's sample ids in stream order."""
        return [k for s in sorted(self.keys) for k in self.keys[s]]


class SampleLedger:
    """One worker's part of the ledger (every worker makes one; ``flush`` is collective)."""

    def __init__(self, run_dir: str, rank: int, world_size: int):
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.pending: dict[int, dict[int, list[str]]] = {}  # step -> this worker's streams' ids

    def record(self, step: int, keys: dict[int, list[str]]) -> None:
        self.pending[step] = keys

    def flush(self, step: int) -> None:
        """Gather every worker's pending ids on rank 0 and write ``samples/step-<step>.jsonl``."""
        mine = self.pending
        self.pending = {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list | None = [None] * dist.get_world_size() if self.rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if self.rank != 0 or not any(gathered):
            return
        merged: dict[int, dict[int, list[str]]] = {}
        for part in gathered:
            for s, keys in part.items():
                merged.setdefault(s, {}).update(keys)
        now = time.time()
        lines = [json.dumps({"step": s, "world_size": self.world_size, "written_at": now,
                             "keys": {str(k): v for k, v in sorted(merged[s].items())}})
                 for s in sorted(merged)]
        url = storage.join_url(self.run_dir, SAMPLES_DIR, SAMPLES_FILE.format(step=step))
        storage.write_bytes(url, ("\n".join(lines) + "\n").encode())


def read_ledger(run_dir: str) -> dict[int, LedgerStep]:
    """Every step's sample ids from ``<run_dir>/samples/`` (the newest line per step wins)."""
    folder = storage.join_url(run_dir, SAMPLES_DIR)
    steps: dict[int, LedgerStep] = {}
    for url in storage.list_files(folder, suffix=".jsonl"):
        for line in storage.read_bytes(url).decode().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            entry = LedgerStep(row["step"], row["world_size"], row["written_at"],
                               {int(s): keys for s, keys in row["keys"].items()})
            if entry.step not in steps or entry.written_at >= steps[entry.step].written_at:
                steps[entry.step] = entry
    return dict(sorted(steps.items()))
