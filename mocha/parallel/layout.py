"""The parallel layout of a run -- world size, ZeRO stage, expert-parallel size -- validated once.

Both the job spec (before any worker starts, from the configured expert counts) and the engine
(inside the workers, from the MoE layers the model really has) call :func:`check_layout`, so the
two can never disagree. The rules:

* ``ep_size`` divides the world size (expert-parallel groups are consecutive ranks) and every MoE
  layer's expert count (each rank of a group holds ``E / ep_size`` experts).
* ZeRO stage 3 runs with MoE layers only when ``ep_size == 1``: the layers are then ordinary
  replicated modules that ZeRO-3 partitions like any other. DeepSpeed refuses its native MoE layer
  (which expert parallelism needs) under ZeRO-3.

``ep_size: auto`` (:func:`resolve_ep_size`) picks, at the moment the worker group starts, the
largest size that satisfies these rules for the current world size -- what lets an elastic run
resize to any worker count.
"""

from __future__ import annotations

from collections.abc import Mapping

AUTO = "auto"


class LayoutError(ValueError):
    """A parallel layout DeepSpeed would refuse or mis-handle; the message names the field."""


def check_layout(world_size: int, zero_stage: int, ep_size: int, expert_counts: Mapping[str, int],
                 ep_field: str = "deepspeed.ep_size") -> None:
    """Raise :class:`LayoutError` naming ``ep_field`` when the layout cannot run.

    ``expert_counts`` maps each MoE layer (or config field) to its number of experts."""
    if ep_size < 1 or world_size % ep_size:
        raise LayoutError(f"{ep_field} ({ep_size}) must divide the number of workers ({world_size})")
    for name, experts in expert_counts.items():
        if experts % ep_size:
            raise LayoutError(f"{ep_field} ({ep_size}) must divide num_experts ({experts}) of {name}")
    if ep_size > 1 and zero_stage == 3:
        raise LayoutError(
            f"DeepSpeed rejects MoE with ZeRO stage 3 when experts are parallel ({ep_field}={ep_size}): use "
            "zero_stage 1 or 2 with expert parallelism, or ep_size 1 (experts replicated) with ZeRO-3")


def resolve_ep_size(requested: int | str, world_size: int, zero_stage: int, expert_counts: Mapping[str, int],
                    ep_field: str = "deepspeed.ep_size") -> int:
    """The expert-parallel size for ``world_size`` workers.

    ``"auto"``: the largest size dividing the world size and every expert count (1 without MoE
    layers, and 1 under ZeRO-3). A number is checked as it is (:func:`check_layout`)."""
    if requested == AUTO:
        if not expert_counts or zero_stage == 3:
            return 1
        size = max(s for s in range(1, world_size + 1)
                   if world_size % s == 0 and all(e % s == 0 for e in expert_counts.values()))
    else:
        size = int(requested)
    check_layout(world_size, zero_stage, size, expert_counts, ep_field)
    return size
