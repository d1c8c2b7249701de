"""The schema of a training checkpoint's ``state.json``, validated like a job YAML.

``state.json`` is written last by ``mocha.train.checkpoint.save_checkpoint`` and read back on
resume. A hand-edited, truncated or foreign file must fail at load time naming the file and the
field (``optimizer.step: Input should be greater than or equal to 0``), not later as a
``TypeError`` deep inside DeepSpeed or as a NaN learning rate. :func:`parse_checkpoint_state`
is that check; the model is strict (unknown keys, wrong types, negative counters and
non-finite numbers are rejected; no string-to-number coercion).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mocha.config import ConfigError, format_validation_error

#: The ``format_version`` read by default (``mocha.train.checkpoint`` passes its own).
CHECKPOINT_FORMAT_VERSION = 2


class _StrictState(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class OptimizerState(_StrictState):
    step: int = Field(ge=0, description="Adam step count (0: no moments saved)")
    lr: float = Field(ge=0, description="learning rate of every param group at save time")


class SchedulerState(_StrictState):
    last_epoch: int = Field(ge=-1, description="LambdaLR position")


class RankRngState(_StrictState):
    """One rank's Python and NumPy generator states (torch's are in rng.safetensors)."""

    python: tuple[int, list[int], float | None]
    numpy: tuple[str, list[int], int, int, float]


class CheckpointState(_StrictState):
    format_version: int = Field(ge=1)
    world_size: int = Field(ge=1)
    global_steps: int = Field(ge=0)
    global_samples: int = Field(ge=0)
    skipped_steps: int = Field(ge=0)
    optimizer: OptimizerState
    scheduler: SchedulerState | None
    rng: list[RankRngState]
    extra_state: dict[str, Any]

    def model_post_init(self, __context: Any) -> None:
        if len(self.rng) != self.world_size:
            raise ValueError(f"rng: {len(self.rng)} rank states for world_size {self.world_size}")


def parse_checkpoint_state(path_or_text: str | Path, source: str | None = None,
                           expected_version: int = CHECKPOINT_FORMAT_VERSION) -> CheckpointState:
    """Validate a ``state.json`` given as a path or as its text; ``source`` names it in errors
    (default: the path). Raises :class:`~mocha.config.ConfigError` naming the file and every bad
    field; a missing file raises ``FileNotFoundError``."""
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and not path_or_text.lstrip().startswith(("{", "["))):
        path = Path(path_or_text)
        source = source or str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint state file")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        text, source = str(path_or_text), source or "state.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be an object, got {type(data).__name__}")
    if data.get("format_version") != expected_version:
        raise ConfigError(f"{source}: format_version: checkpoint format {data.get('format_version')!r}, "
                          f"expected {expected_version}")
    try:
        # JSON mode: arrays fill the tuple fields, integers the float fields; strings never become
        # numbers, and NaN / Infinity (which Python's json writes and reads) are rejected.
        return CheckpointState.model_validate_json(text)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
