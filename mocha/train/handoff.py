"""Weights that cross stage boundaries: the stage-1 -> stage-2 hand-off (connectors + HGA,
loaded by exact key) and the consolidated export at the end of a run."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from mocha.config import ConfigError
from mocha.train.job import JobConfig
from mocha.io.layout import EXPORT_DIR, TRAINABLE_NAME

log = logging.getLogger(__name__)  # runs in a Ray Train worker: not print (see mocha.train.metrics)

HANDOFF_PARTS = ("connectors", "hga")


def load_trainable(model, url: str) -> None:
    """Load ``trainable.safetensors`` (connectors + HGA) from a local dir or ``s3://`` URL.
    Every connector must be present (the official scripts silently skip DINOv2's)."""
    from safetensors.torch import load

    from mocha.io import storage

    blob = storage.read_bytes(storage.join_url(url, TRAINABLE_NAME))
    state = load(blob)
    try:
        model.load_part_state_dict(state, HANDOFF_PARTS)
    except KeyError as e:
        raise ConfigError(f"init.trainable_from={url}: {e.args[0]}") from None


def consolidated_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights in single-process names, experts gathered from their
    expert-parallel ranks. Collective when distributed; every rank gets the full dict.
    (Under ZeRO-1/2 every rank holds full copies of the non-expert parameters.)"""
    import torch.distributed as dist

    from mocha.parallel.expert import global_expert_state_dict

    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return global_expert_state_dict(model, local) if dist.is_initialized() else local


def save_export(job: JobConfig, model, state: dict[str, torch.Tensor], tokenizer) -> str:
    """Write ``<storage>/<run>/export``: the whole model as a transformers-native folder
    (``mocha.export.hf``: loads with or without mocha), the trainable part alone for the next
    stage (``trainable.safetensors`` + ``mocha_config.json``). Returns the export URL."""
    from mocha.export.hf import HFExportOptions, write_hf_folder
    from mocha.io import storage

    url = storage.join_url(job.run_dir, EXPORT_DIR)
    with tempfile.TemporaryDirectory(prefix="mocha-export-") as tmp:
        write_hf_folder(tmp, model, tokenizer, HFExportOptions(source=f"run {job.run.name}"), state_dict=state)
        model.save_pretrained(tmp, state_dict=state, parts=HANDOFF_PARTS)
        for path in sorted(Path(tmp).iterdir()):
            storage.upload_file(path, storage.join_url(url, path.name))
    log.info(f"[mocha] exported the trained model to {url}")
    return url
