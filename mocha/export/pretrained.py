"""Load and write MoCHA models: pretrained directories and transformers-native exports.

A *pretrained directory* holds ``mocha_config.json`` (self-contained: every sub-model's full
architecture), ``model.safetensors`` (all weights) and the tokenizer files; loading it needs
only ``mocha`` and transformers. Training writes one per run (``<run>/export``). A
*transformers-native export* (``mocha export``; ``mocha.export.hf``) holds the same config inside
``config.json``, weights possibly sharded, the tokenizer and the remote code that loads it
without mocha; everything here that reads a pretrained directory reads one of those too.

A *training checkpoint* (``mocha.train.checkpoint``) holds the trainable parameters only (fp32,
global names, sharded by the ranks that wrote it, with ``index.json`` and ``state.json``); it has
no config and no frozen weights. :func:`export_pretrained` turns one into
a pretrained directory by overlaying its weights on a *base* pretrained directory — the run's
own export, or the stage-1 export for a stage-2 checkpoint — whose frozen parts and tokenizer
are kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from mocha.config import ConfigError
from mocha.export.hf import HFExportOptions
from mocha.io.layout import (CHECKPOINT_INDEX_NAME, CHECKPOINT_STATE_NAME, EXPORT_CONFIG_NAME, EXPORT_HF_CONFIG_NAME,
                             EXPORT_WEIGHTS_INDEX_NAME, EXPORT_WEIGHTS_NAME)


def is_pretrained_dir(directory: str | Path) -> bool:
    """A saved model: ``save_pretrained``'s layout or a transformers-native export
    (``mocha.export.hf``: ``config.json`` of model_type mocha, weights whole or sharded)."""
    directory = Path(directory)
    has_weights = (directory / EXPORT_WEIGHTS_NAME).is_file() or (directory / EXPORT_WEIGHTS_INDEX_NAME).is_file()
    if (directory / EXPORT_CONFIG_NAME).is_file():
        return has_weights
    try:
        hf_config = json.loads((directory / EXPORT_HF_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return has_weights and isinstance(hf_config, dict) and hf_config.get("model_type") == "mocha"


def is_checkpoint_dir(directory: str | Path) -> bool:
    directory = Path(directory)
    return ((directory / CHECKPOINT_STATE_NAME).is_file() and (directory / CHECKPOINT_INDEX_NAME).is_file()
            and not (directory / EXPORT_CONFIG_NAME).exists())


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, tokenizer) from a pretrained directory."""
    from mocha.model.mocha import MochaModel
    from mocha.text.tokenizer import load_tokenizer

    directory = Path(directory)
    if not is_pretrained_dir(directory):
        hint = " (a training checkpoint: convert it with `mocha export --checkpoint ... --base ...`)" \
            if is_checkpoint_dir(directory) else ""
        raise FileNotFoundError(f"{directory} is not a saved MoCHA model: it needs mocha_config.json (or a mocha "
                                f"config.json) and model.safetensors (or its shard index){hint}")
    tokenizer = load_tokenizer(directory)
    model = MochaModel.from_pretrained(directory).to(device).eval()
    return model, tokenizer


def overlay_checkpoint(model, checkpoint_dir: str | Path) -> list[str]:
    """Copy a training checkpoint's weights into ``model`` by exact name; returns the names.
    Every checkpoint tensor must name a parameter or buffer of the model with the same shape
    (``ConfigError`` otherwise: the checkpoint does not belong to this base model)."""
    from mocha.train.checkpoint import read_trainable_weights

    path = str(checkpoint_dir)
    state = read_trainable_weights(path)
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ConfigError(f"{path}: {len(unknown)} tensors the base model does not have, e.g. {unknown[:5]}; "
                       f"is --base the model this checkpoint was trained from?")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if state[k].shape != own[k].shape]
    if wrong:
        raise ConfigError(f"{path}: shapes differ from the base model: {wrong[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
    return sorted(state)


def check_export_target(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse to replace ``out_dir`` when it is a file, or a non-empty folder that is not a
    previous export, unless ``overwrite`` (a mistyped ``--out`` must not erase a user's folder)."""
    out_dir = Path(out_dir)
    if overwrite or not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ConfigError(f"--out {out_dir} exists and is not a folder; pass --overwrite to replace it")
    if any(out_dir.iterdir()) and not is_pretrained_dir(out_dir):
        raise ConfigError(f"--out {out_dir} is a non-empty folder that is not a MoCHA export (a run's export "
                          f"or `mocha export` output); refusing to replace it. Pass --overwrite "
                          f"to replace it anyway, or choose another folder.")


def replace_atomically(staging: Path, out_dir: Path) -> None:
    """Put the complete folder ``staging`` at ``out_dir`` (a sibling on the same filesystem): an
    existing ``out_dir`` is first renamed aside and deleted only after the new one is in place;
    if the swap fails the old one is put back."""
    aside = None
    if out_dir.exists() or out_dir.is_symlink():
        aside = out_dir.with_name(f".{out_dir.name}.replaced-{staging.name.rsplit('.', 1)[-1]}")
        out_dir.rename(aside)
    try:
        staging.rename(out_dir)
    except BaseException:
        if aside is not None:
            aside.rename(out_dir)
        raise
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()


def export_pretrained(source: str | Path, out_dir: str | Path, base: str | Path | None = None,
                      options: HFExportOptions | None = None, overwrite: bool = False) -> Path:
    """Write ``out_dir`` as a transformers-native folder (``mocha.export.hf``) from ``source``.

    ``source`` is a pretrained directory (either layout; reloaded with ``from_pretrained``, so the
    result is canonical and verified loadable) or a training checkpoint, which needs ``base`` (a
    pretrained directory supplying the architecture, the weights the checkpoint does not hold,
    and the tokenizer). ``options``: dtype, shard size, model-card facts. The output appears
    complete or not at all (written to a sibling temporary folder, then renamed). An existing
    ``out_dir`` is replaced only when it is empty or a previous export, or with ``overwrite``
    (:func:`check_export_target`); it is swapped out, never deleted before the new one is in place.
    """
    from mocha.export.hf import write_hf_folder
    from mocha.model.mocha import MochaModel

    source, out_dir = Path(source), Path(out_dir)
    check_export_target(out_dir, overwrite)
    if is_pretrained_dir(source):
        if base is not None:
            raise ConfigError(f"{source} is already a complete model; --base applies to training checkpoints only")
        model_dir, checkpoint = source, None
    elif is_checkpoint_dir(source):
        if base is None:
            raise ConfigError(f"{source} is a training checkpoint (trainable weights only); pass --base with the "
                             f"pretrained directory it was trained from (e.g. the run's export)")
        if not is_pretrained_dir(base):
            raise FileNotFoundError(f"--base {base} is not a saved MoCHA model (a run's export or `mocha export` "
                                    f"output)")
        model_dir, checkpoint = Path(base), source
    else:
        raise FileNotFoundError(f"{source} is neither a saved MoCHA model (a run's export or `mocha export` output) "
                                f"nor a training checkpoint (state.json + model.safetensors)")

    from mocha.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = MochaModel.from_pretrained(model_dir)
    if checkpoint is not None:
        overlay_checkpoint(model, checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_hf_folder(staging, model, tokenizer, options or HFExportOptions(source=str(source)))
        replace_atomically(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
