"""Per-step training metrics: reduced over workers, reported to Ray, kept as ``metrics.jsonl``.

``metrics.jsonl`` (one JSON object per optimizer step) is written into every checkpoint and to
``<storage>/<run>/metrics.jsonl``; a resumed run restores the history from its checkpoint, so
the file always covers the whole run exactly once.

The losses are the step's, whatever the worker count: each worker adds its share of the step's
objective (``mocha.train.loop``: token-weighted LM loss, sample-weighted auxiliary losses) and the
shares are summed over workers. ``world_size``, ``ep_size`` and ``grad_accum`` record the layout
the step ran with (they change when an elastic run resizes); ``samples`` is the step's global
batch.

``data_wait_s`` is the time the loop blocked waiting for the step's collated micro-batches
(mean over workers); ``data_wait_fraction`` = summed waits / summed step times. The batches are
prepared ahead on a background thread (``data.prefetch_batches``), so this is the part of the
read + decode + collate work that prefetching did not hide; with ``prefetch_batches: 0`` it is
all of that work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from mocha.io.layout import METRICS_NAME
from mocha.train.job import JobConfig

#: Worker-side progress goes through logging, not print: inside a Ray Train (v2) worker,
#: ``print`` is patched to log through the root logger *and* echo to the worker's wrapped
#: stdout, so every printed line reached the driver twice. The root logger Ray Train configures
#: in its workers writes each record once to the console and once to its worker log file.
log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    """This worker's share of one step: losses already weighted so that the sum over workers is the
    step's value; counts summed."""

    loss: float = 0.0
    lm_loss: float = 0.0
    balance_loss: float = 0.0
    z_loss: float = 0.0
    moe_llm_loss: float = 0.0
    tokens: int = 0
    samples: int = 0
    masked_samples: int = 0
    over_budget_samples: int = 0  # text cut by max_length, or masked because nothing fit (see conversation.py)
    expert_load: dict[str, torch.Tensor] = field(default_factory=dict)


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dist = torch.distributed
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
        reduced = values.to(device, copy=True)  # NCCL reduces only GPU tensors
        dist.all_reduce(reduced)
        values = reduced.to(values.device)
    return values


class MetricsLog:
    def __init__(self, job: JobConfig, rank: int):
        self.job, self.rank = job, rank
        self.records: list[dict] = []

    def step_record(self, step: int, m: StepMetrics, layout: dict[str, int], elapsed: float, data_wait: float,
                    lr: float) -> dict:
        """Sum this step's shares over workers; rank 0 logs and keeps the record. ``layout``: the
        step's ``world_size``, ``ep_size`` and ``grad_accum`` (micro-batches per worker)."""
        scalars = torch.tensor([m.loss, m.lm_loss, m.balance_loss, m.z_loss, m.moe_llm_loss,
                                m.tokens, m.samples, m.masked_samples, m.over_budget_samples, elapsed, data_wait],
                               dtype=torch.float64)
        kinds = sorted(m.expert_load)
        loads = torch.stack([m.expert_load[k] for k in kinds]).double() if kinds else torch.zeros(0)
        scalars = _all_reduce_sum(scalars)
        loads = _all_reduce_sum(loads) if kinds else loads
        loss, lm, bal, z, moe, tokens, samples, masked, over_budget, elapsed_sum, wait_sum = scalars.tolist()
        world = layout["world_size"]
        step_time = elapsed_sum / world
        record = {
            "step": step, "stage": self.job.stage, "loss": loss, "lm_loss": lm,
            "balance_loss": bal, "z_loss": z, "lr": lr,
            "tokens_per_s": tokens / step_time if step_time > 0 else 0.0,
            "samples": int(samples), "masked_samples": int(masked), "over_budget_samples": int(over_budget),
            "step_time_s": step_time, "data_wait_s": wait_sum / world,
            "data_wait_fraction": (wait_sum / elapsed_sum) if elapsed_sum > 0 else 0.0,
            **layout,
        }
        if self.job.model.llm_experts is not None:
            record["moe_llm_loss"] = moe
        for i, kind in enumerate(kinds):
            total = loads[i].sum().item()
            record[f"expert_load/{kind}"] = [round(v / total, 6) if total else 0.0 for v in loads[i].tolist()]
        if self.rank == 0:
            self.records.append(record)
            if step % self.job.schedule.log_every == 0:
                log.info(f"[mocha] stage {self.job.stage} step {step}: loss {record['loss']:.4f} "
                         f"(lm {record['lm_loss']:.4f}, balance {record['balance_loss']:.4f}, z {record['z_loss']:.4f}) "
                         f"lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s data-wait {record['data_wait_fraction']:.1%} "
                         f"[{world} workers]")
        return record

    def truncation_summary(self) -> tuple[str, bool]:
        """The whole run's count of samples over the sequence budget (the history includes the
        steps before a resume), and whether it is over the warning threshold."""
        from mocha.text.conversation import truncation_report

        total = sum(r["samples"] for r in self.records)
        over = sum(r.get("over_budget_samples", 0) for r in self.records)
        return truncation_report(over, total, self.job.model.max_length, f"stage {self.job.stage} run {self.job.run.name}")

    def write(self, checkpoint_url: str | None = None) -> None:
        """Write the history to the run dir and, when given, into a checkpoint folder (rank 0;
        local or s3://)."""
        from mocha.io import storage

        text = "".join(json.dumps(r) + "\n" for r in self.records).encode()
        if checkpoint_url is not None:
            storage.write_bytes(storage.join_url(checkpoint_url, METRICS_NAME), text)
        storage.write_bytes(storage.join_url(self.job.run_dir, METRICS_NAME), text)

    def restore(self, checkpoint_url: str) -> None:
        from mocha.io import storage

        url = storage.join_url(checkpoint_url, METRICS_NAME)
        if storage.exists(url):
            self.records = [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]
