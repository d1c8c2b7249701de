"""Frozen vision encoders on tiny random configs: token selection against the transformers
models' own hidden states, freezing, preprocessing, and the real loading code paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil

from mocha.config import MOCHA_ENCODER_ORDER, EncoderConfig
from mocha.model.encoders import (
    ENCODERS,
    VisionEncoder,
    build_encoder,
    build_encoders,
    timm_convnext_state_dict,
)
from mocha.model.tiny import tiny_encoder_configs

TINY = {c.kind: c for c in tiny_encoder_configs()}
KINDS = list(MOCHA_ENCODER_ORDER)


def _encoder(kind: str, **updates) -> VisionEncoder:
    return build_encoder(TINY[kind].model_copy(update=updates))


def _pixels(enc: VisionEncoder, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, enc.image_size, enc.image_size, generator=g)


def _hidden_states(enc: VisionEncoder, pixels: torch.Tensor):
    with torch.no_grad():
        return enc.model(pixel_values=pixels, output_hidden_states=True)


def _photo(width: int = 70, height: int = 50, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- shapes, dtype, freezing


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_and_dtype(kind):
    enc = _encoder(kind)
    out = enc(_pixels(enc, batch=4))
    assert out.shape == (4, enc.num_tokens, enc.hidden_size)
    assert out.dtype == torch.float32


def test_tiny_encoders_have_distinct_widths_and_expected_token_counts():
    encs = build_encoders(tiny_encoder_configs())
    assert list(encs) == KINDS
    assert {k: (e.num_tokens, e.hidden_size) for k, e in encs.items()} == {
        "siglip": (25, 48), "convnext": (9, 32), "clip": (16, 64), "dinov2": (16, 40)}


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_encoder_returns_bfloat16(kind):
    enc = build_encoder(TINY[kind], dtype=torch.bfloat16)
    out = enc(_pixels(enc))  # float32 pixels are cast to the model's dtype
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in enc.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_no_gradient_reaches_encoder_or_pixels(kind):
    enc = _encoder(kind)
    assert all(not p.requires_grad for p in enc.parameters())
    pixels = _pixels(enc).requires_grad_(True)
    head = torch.nn.Linear(enc.hidden_size, 1)
    feats = enc(pixels)
    assert not feats.requires_grad
    head(feats).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert pixels.grad is None
    assert all(p.grad is None for p in enc.parameters())


def test_parent_train_keeps_encoders_in_eval_mode():
    parent = torch.nn.ModuleDict({"encoders": build_encoders(tiny_encoder_configs()), "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    for enc in parent["encoders"].values():
        assert not any(m.training for m in enc.modules())


def test_dropout_in_config_never_fires():
    enc = _encoder("clip", config={**TINY["clip"].config, "attention_dropout": 0.9})
    enc.train()
    x = _pixels(enc)
    assert torch.equal(enc(x), enc(x))


# ---------------------------------------------------------------- token selection


def test_clip_takes_penultimate_layer_and_drops_cls():
    enc = _encoder("clip")
    x = _pixels(enc)
    hs = _hidden_states(enc, x).hidden_states
    assert len(hs) == 3  # embeddings + 2 layers: -2 is the first layer's output, not the last
    assert hs[-2].shape[1] == enc.num_tokens + 1
    torch.testing.assert_close(enc(x), hs[-2][:, 1:], rtol=0, atol=0)


def test_siglip_keeps_every_patch_token():
    enc = _encoder("siglip")
    x = _pixels(enc)
    hs = _hidden_states(enc, x).hidden_states
    assert enc.num_tokens == (40 // 8) ** 2 == hs[-2].shape[1]
    torch.testing.assert_close(enc(x), hs[-2], rtol=0, atol=0)


def test_dinov2_takes_prenorm_last_layer_and_drops_cls():
    enc = _encoder("dinov2")
    x = _pixels(enc)
    outputs = _hidden_states(enc, x)
    prenorm = outputs.hidden_states[-1]
    assert prenorm.shape[1] == enc.num_tokens + 1
    torch.testing.assert_close(enc(x), prenorm[:, 1:], rtol=0, atol=0)
    # The official tower's x_prenorm, not the LayerNorm-ed last_hidden_state.
    assert not torch.allclose(enc(x), outputs.last_hidden_state[:, 1:])


def test_convnext_flattens_last_stage_row_major_and_pools_channels_by_three():
    enc = _encoder("convnext")
    x = _pixels(enc)
    fmap = _hidden_states(enc, x).hidden_states[-1]  # [B, C, h, w]
    b, c, h, w = fmap.shape
    assert (h, w, c) == (3, 3, 96) and enc.num_tokens == 9 and enc.hidden_size == 32
    out = enc(x)
    for row in range(h):
        for col in range(w):
            expected = fmap[:, :, row, col].reshape(b, c // 3, 3).mean(-1)
            torch.testing.assert_close(out[:, row * w + col], expected)


def test_convnext_without_channel_pool_returns_raw_stage_output():
    enc = _encoder("convnext", channel_pool=1)
    x = _pixels(enc)
    fmap = _hidden_states(enc, x).hidden_states[-1]
    assert enc.hidden_size == 96
    torch.testing.assert_close(enc(x), fmap.permute(0, 2, 3, 1).reshape(x.shape[0], 9, 96), rtol=0, atol=0)


def test_select_layer_override():
    enc = _encoder("siglip", select_layer=-1)
    x = _pixels(enc)
    torch.testing.assert_close(enc(x), _hidden_states(enc, x).hidden_states[-1], rtol=0, atol=0)


def test_token_count_from_config_matches_forward_for_other_sizes():
    for kind, size in [("convnext", 64), ("dinov2", 36), ("siglip", 48), ("clip", 40)]:
        enc = _encoder(kind, image_size=size)
        assert enc(_pixels(enc, batch=1)).shape[1] == enc.num_tokens
    assert _encoder("convnext", image_size=64).num_tokens == (64 // 2 // 8) ** 2


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="select_layer=5 out of range"):
        _encoder("clip", select_layer=5)
    with pytest.raises(ValueError, match="channel_pool=5"):
        _encoder("clip", channel_pool=5)
    with pytest.raises(ValueError, match=r"expected pixel_values \[B, 3, 32, 32\]"):
        _encoder("clip")(torch.zeros(1, 3, 24, 24))
    with pytest.raises(ValueError, match="encoder kinds must be distinct"):
        build_encoders([TINY["clip"], TINY["clip"]])


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("kind", KINDS)
def test_preprocess_is_deterministic_float32_square(kind):
    enc = _encoder(kind)
    image = _photo()
    a, b = enc.preprocess(image), enc.preprocess(image.copy())
    assert a.shape == (3, enc.image_size, enc.image_size) and a.dtype == torch.float32
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind,mean,std", [
    ("clip", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ("siglip", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("dinov2", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("convnext", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
])
def test_preprocess_normalises_with_the_encoders_mean_and_std(kind, mean, std):
    rgb = (200, 30, 120)
    pixels = _encoder(kind).preprocess(Image.new("RGB", (57, 41), rgb))
    expected = [(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)]
    for channel in range(3):
        torch.testing.assert_close(pixels[channel], torch.full_like(pixels[channel], expected[channel]),
                                   rtol=0, atol=1e-5)


def test_preprocess_converts_grayscale_to_three_channels():
    pixels = _encoder("siglip").preprocess(Image.new("L", (40, 40), 128))
    assert pixels.shape[0] == 3 and torch.equal(pixels[0], pixels[1])


# The checkpoints' own preprocessor_config.json (as published on the hub), so the registry's
# defaults are checked against the reference processors, not against themselves.
REAL_PROCESSORS = {
    "clip": (CLIPImageProcessorPil, {
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 336}),
    "siglip": (SiglipImageProcessorPil, {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}}),
    # facebook/dinov2-large's processor at the official 336 px (shortest edge 336 * 256/224 = 384, crop 336)
    "dinov2": (BitImageProcessorPil, {
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 384}}),
    # timm pretrained_cfg of convnext_xxlarge.clip_laion2b_soup_ft_in1k: bicubic, crop_pct 1.0,
    # OpenAI CLIP mean/std; at the official 336 px that is the CLIP processor the official code feeds it.
    "convnext": (CLIPImageProcessorPil, {
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 336}),
}


@pytest.mark.parametrize("kind", KINDS)
def test_default_preprocessing_equals_the_real_checkpoints_processor(kind):
    enc = build_encoder(EncoderConfig(kind=kind), device="meta")  # real-size, no weights
    processor_cls, params = REAL_PROCESSORS[kind]
    image = _photo(width=517, height=389)
    expected = processor_cls(**params)(images=image, return_tensors="pt")["pixel_values"][0]
    assert enc.image_size == expected.shape[-1]
    torch.testing.assert_close(enc.preprocess(image), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- loading real checkpoints


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_then_load_gives_identical_outputs(kind, tmp_path):
    enc = _encoder(kind, init_seed=123)  # differs from the seed-0 init a broken loader would fall back to
    enc.model.save_pretrained(tmp_path)
    enc.processor.save_pretrained(tmp_path)
    loaded = build_encoder(TINY[kind].model_copy(update={"pretrained": str(tmp_path), "config": {}}))
    assert type(loaded.model) is type(enc.model)
    geometry = ("num_tokens", "hidden_size", "image_size")
    assert [getattr(loaded, a) for a in geometry] == [getattr(enc, a) for a in geometry]
    x = _pixels(enc)
    torch.testing.assert_close(loaded(x), enc(x), rtol=0, atol=0)
    image = _photo()
    torch.testing.assert_close(loaded.preprocess(image), enc.preprocess(image), rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.parameters())


def test_checkpoint_processor_config_is_used(tmp_path):
    enc = _encoder("siglip")
    enc.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "image_mean": [0.25, 0.25, 0.25],
        "image_std": [0.5, 0.5, 0.5], "size": {"height": 384, "width": 384}}))
    loaded = build_encoder(TINY["siglip"].model_copy(update={"pretrained": str(tmp_path), "config": {}}))
    pixels = loaded.preprocess(Image.new("RGB", (10, 10), (255, 255, 255)))
    assert pixels.shape == (3, 40, 40)  # resized for this encoder, not the file's 384
    torch.testing.assert_close(pixels, torch.full_like(pixels, (1 - 0.25) / 0.5))


def test_checkpoint_without_processor_config_uses_registry_parameters(tmp_path):
    enc = _encoder("clip")
    enc.model.save_pretrained(tmp_path)  # no preprocessor_config.json
    loaded = build_encoder(TINY["clip"].model_copy(update={"pretrained": str(tmp_path), "config": {}}))
    image = _photo()
    torch.testing.assert_close(loaded.preprocess(image), enc.preprocess(image), rtol=0, atol=0)


def test_pretrained_clip_at_another_resolution_interpolates_positions(tmp_path):
    enc = _encoder("clip")
    enc.model.save_pretrained(tmp_path)
    bigger = build_encoder(EncoderConfig(kind="clip", pretrained=str(tmp_path), image_size=48))
    assert bigger.num_tokens == (48 // 8) ** 2
    assert bigger(_pixels(bigger, batch=1)).shape == (1, 36, 64)


def _timm_layout(hf_state: dict[str, torch.Tensor], depths: list[int]) -> dict[str, torch.Tensor]:
    """A ConvNextModel state dict written with timm's key names (spelled out independently of
    the converter), plus a classifier, as in a timm hub checkpoint."""
    timm = {
        "stem.0.weight": hf_state["embeddings.patch_embeddings.weight"],
        "stem.0.bias": hf_state["embeddings.patch_embeddings.bias"],
        "stem.1.weight": hf_state["embeddings.layernorm.weight"],
        "stem.1.bias": hf_state["embeddings.layernorm.bias"],
        "head.norm.weight": hf_state["layernorm.weight"],
        "head.norm.bias": hf_state["layernorm.bias"],
        "head.fc.weight": torch.zeros(10, hf_state["layernorm.weight"].numel()),
        "head.fc.bias": torch.zeros(10),
    }
    for s, depth in enumerate(depths):
        hf = f"encoder.stages.{s}"
        if s > 0:
            for i in (0, 1):
                for p in ("weight", "bias"):
                    timm[f"stages.{s}.downsample.{i}.{p}"] = hf_state[f"{hf}.downsampling_layer.{i}.{p}"]
        for j in range(depth):
            layer = f"{hf}.layers.{j}"
            timm[f"stages.{s}.blocks.{j}.gamma"] = hf_state[f"{layer}.layer_scale_parameter"]
            for timm_name, hf_name in [("conv_dw", "dwconv"), ("norm", "layernorm"), ("mlp.fc1", "pwconv1"),
                                       ("mlp.fc2", "pwconv2")]:
                for p in ("weight", "bias"):
                    timm[f"stages.{s}.blocks.{j}.{timm_name}.{p}"] = hf_state[f"{layer}.{hf_name}.{p}"]
    return {k: v.contiguous() for k, v in timm.items()}


def test_timm_convnext_checkpoint_loads_into_transformers_model(tmp_path):
    tiny = TINY["convnext"]
    enc = _encoder("convnext", init_seed=123)
    depths = tiny.config["depths"]
    save_file(_timm_layout(enc.model.state_dict(), depths), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "convnext_xxlarge", "num_classes": 10,
        "pretrained_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    loaded = build_encoder(tiny.model_copy(update={"pretrained": str(tmp_path)}))
    x = _pixels(enc)
    torch.testing.assert_close(loaded(x), enc(x), rtol=0, atol=0)
    # timm's XXL LayerNorms use eps 1e-5 everywhere; transformers would default to 1e-6.
    norms = [m for m in loaded.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)


def test_timm_conversion_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unexpected key in timm ConvNeXt checkpoint: 'stages.0.blocks.0.extra'"):
        timm_convnext_state_dict({"stages.0.blocks.0.extra": torch.zeros(1)})


def test_registry_defaults_name_the_paper_checkpoints():
    assert {k: s.default_pretrained for k, s in ENCODERS.items()} == {
        "clip": "openai/clip-vit-large-patch14-336",
        "siglip": "google/siglip-large-patch16-384",  # the official MoCHA SigLIP tower
        "dinov2": "facebook/dinov2-large",
        "convnext": "timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k",
    }
