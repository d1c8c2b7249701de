"""Trainers that train from feature shards hold only what they train: no frozen encoder is built,
no encoder weight is read. Widths and token counts come from the encoder configs."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch.nn.modules.module import register_module_parameter_registration_hook

from mocha.config import EncoderConfig
from mocha.model.encoders import build_encoder, encoder_geometry
from mocha.model.mocha import MochaModel
from mocha.model.tiny import tiny_encoder_configs, tiny_model_config

ENCODER_PACKAGES = tuple(f"transformers.models.{name}." for name in ("clip", "siglip", "dinov2", "convnext"))


@contextlib.contextmanager
def encoder_parameters():
    """Every parameter registered on a module of a transformers vision-encoder package while the
    block runs, as (module class, device)."""
    seen: list[tuple[str, torch.device]] = []

    def hook(module, name, param):
        if type(module).__module__.startswith(ENCODER_PACKAGES) and param is not None:
            seen.append((type(module).__name__, param.device))

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_the_hook_sees_an_encoder_being_built():  # the detector works, so its silence below means something
    with encoder_parameters() as seen:
        build_encoder(tiny_encoder_configs()[0])
    assert seen and all(device.type == "cpu" for _, device in seen)


def test_trainer_model_from_features_builds_no_encoder(tmp_path):
    from mocha.demo.pipeline import DemoConfig, demo_job
    from mocha.train.loop import build_model

    job = demo_job(DemoConfig(out=str(tmp_path), llm_pretrain_steps=0, width=64), 2, tmp_path)
    assert job.data.features is not None
    with encoder_parameters() as seen:
        model = build_model(job, vocab_size=1024, device="cpu")
    assert seen == []
    assert model.encoders is None and not any(n.startswith("encoders.") for n, _ in model.named_parameters())
    online = MochaModel(job.model, vocab_size=1024, with_encoders=True)
    assert (model.encoder_tokens, model.encoder_widths) == (online.encoder_tokens, online.encoder_widths)
    assert model.num_visual_tokens == online.num_visual_tokens


def test_pretrained_encoders_are_sized_from_config_json_without_their_weights(tmp_path):
    """Checkpoint folders holding only config.json: a weight read would fail, so the model built
    for training from features provably reads none."""
    cfgs = []
    for cfg in tiny_encoder_configs():
        folder = tmp_path / cfg.kind
        encoder = build_encoder(cfg)
        encoder.model.save_pretrained(folder)
        expected = (encoder.num_tokens, encoder.hidden_size)
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
        pretrained = cfg.model_copy(update={"pretrained": str(folder), "config": {}})
        geometry = encoder_geometry(pretrained)
        assert (geometry.num_tokens, geometry.hidden_size) == expected, cfg.kind
        cfgs.append(pretrained)
    model_cfg = tiny_model_config(encoders=cfgs)
    with encoder_parameters() as seen:
        model = MochaModel(model_cfg, with_encoders=False)
    assert seen == [] and model.encoders is None
    with pytest.raises(OSError):  # the online build does need the weights
        MochaModel(model_cfg, with_encoders=True)


def test_timm_convnext_checkpoint_is_sized_from_its_timm_config(tmp_path):
    """The paper's ConvNeXt-XXL ships as a timm checkpoint: at the official 336 px, stride 32 ->
    10x10 = 100 tokens (384 px: 12x12 = 144), 3072 channels pooled by 3 -> 1024."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "convnext_xxlarge", "num_classes": 1024}))
    geometry = encoder_geometry(EncoderConfig(kind="convnext", pretrained=str(tmp_path)))
    assert (geometry.image_size, geometry.num_tokens, geometry.hidden_size) == (336, 100, 1024)
    geometry = encoder_geometry(EncoderConfig(kind="convnext", pretrained=str(tmp_path), image_size=384))
    assert (geometry.image_size, geometry.num_tokens, geometry.hidden_size) == (384, 144, 1024)
