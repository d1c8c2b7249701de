"""The paper's real-size architectures, built on the ``meta`` device (no weights, no download):
parameter counts against the published ones and visual tokens per image from the configs."""

from __future__ import annotations

import pytest
import torch

from mocha.config import EncoderConfig
from mocha.model.encoders import build_encoder
from mocha.model.llm import build_llm, real_llm_config
from mocha.plan.params import count_parameters, measure_model, real_model_config

# Published sizes: CLIP ViT-L/14-336 vision tower 303.5M (HF CLIPVisionModel); SigLIP-L/16-384
# vision tower 316M (HF model card; 428M for so400m); DINOv2 ViT-L/14 304M (DINOv2 paper, model card);
# ConvNeXt-XXL 846.47M in timm *with* its 1000-class head (3072*1000 + 1000 = 3.07M), i.e.
# 843.40M backbone; Phi-2 2.78B; Vicuna-7B v1.5 (Llama-2-7B) 6.74B.
ENCODERS = {
    # kind: (parameters, image size, tokens per image, token width): the official MoCHA towers
    "clip": (303.5e6, 336, 24 * 24, 1024),
    "siglip": (316e6, 384, 24 * 24, 1024),
    "dinov2": (304e6, 336, 24 * 24, 1024),
    "convnext": (846.47e6 - 3.073e6, 336, 10 * 10, 3072 // 3),  # official: 100 tokens
}
LLMS = {"phi": (2.78e9, 2560), "llama": (6.74e9, 4096)}


@pytest.mark.parametrize("kind", ENCODERS)
def test_real_encoder_size_and_tokens(kind):
    params, image_size, tokens, width = ENCODERS[kind]
    enc = build_encoder(EncoderConfig(kind=kind), device="meta")
    assert count_parameters(enc) == pytest.approx(params, rel=0.01)
    assert (enc.image_size, enc.num_tokens, enc.hidden_size) == (image_size, tokens, width)
    # the token count derived from the config is what the model really outputs
    out = enc(torch.empty(1, 3, image_size, image_size, device="meta"))
    assert tuple(out.shape) == (1, tokens, width)


@pytest.mark.parametrize("family", LLMS)
def test_real_llm_size(family):
    params, hidden = LLMS[family]
    model = build_llm(real_llm_config(family), device="meta")
    assert count_parameters(model) == pytest.approx(params, rel=0.01)
    assert model.config.hidden_size == hidden


def test_real_model_totals():
    size = measure_model(real_model_config("phi"))
    assert [e.kind for e in size.encoders] == ["siglip", "convnext", "clip", "dinov2"]
    assert size.visual_tokens == 576 + 100 + 576 + 576 == 1828
    assert size.encoder_params == pytest.approx(sum(v[0] for v in ENCODERS.values()), rel=0.01)
    assert size.llm.hidden == 2560


def test_pretrained_configs_name_the_checkpoints_and_are_sized_from_the_architecture_alone():
    cfg = real_model_config("llama", pretrained=True)
    assert cfg.llm.pretrained == "lmsys/vicuna-7b-v1.5" and cfg.template == "vicuna_v1"
    assert cfg.encoders[2].pretrained == "openai/clip-vit-large-patch14-336"
    # measuring never reads a checkpoint (HF_HUB_OFFLINE in tests: a download would fail)
    size, arch = measure_model(cfg), measure_model(real_model_config("llama"))
    assert (size.total_params, size.visual_tokens) == (arch.total_params, arch.visual_tokens)


def test_count_parameters_trainable_only():
    layer = torch.nn.Linear(4, 3)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 15 and count_parameters(layer, trainable_only=True) == 12
