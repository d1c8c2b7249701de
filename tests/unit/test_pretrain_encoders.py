"""Contrastive pre-training of the demo's tiny encoders: the loss, the saved encoders that the
demo loads through ``EncoderConfig.pretrained`` (frozen, trained weights, same token shapes), and
reuse keyed by everything that determines the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mocha.demo.pretrain_encoders import (RECORD_NAME, EncoderPretrainConfig, _caption_objects, contrastive_loss,
                                          pretrain_encoders)
from mocha.demo.synthetic import generate_shapes_dataset, iter_all_texts
from mocha.model.encoders import build_encoder
from mocha.model.tiny import tiny_encoder_configs
from mocha.text.tokenizer import load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_encoders")
    paths = generate_shapes_dataset(root / "raw", num_train=96, num_eval=8)
    train_bpe_tokenizer(iter_all_texts(paths, templates=("plain", "phi")), root / "tokenizer", vocab_size=512)
    return paths, root / "tokenizer", load_tokenizer(root / "tokenizer")


def test_contrastive_loss_rewards_matching_pairs_and_ignores_same_caption_negatives():
    torch.manual_seed(0)
    image = torch.randn(6, 8)
    different = torch.eye(6, dtype=torch.bool)
    scale = torch.tensor(np.log(10.0))
    aligned = contrastive_loss(image, image, different, scale)
    shuffled = contrastive_loss(image, image[torch.randperm(6)], different, scale)
    assert aligned < shuffled
    # images 0 and 1 have the same caption: image 0 lying next to caption 1 (and 1 next to 0) is
    # no mismatch when they are marked as the same
    text = image[[1, 0, 2, 3, 4, 5]]
    same = different.clone()
    same[0, 1] = same[1, 0] = True
    assert contrastive_loss(image, text, same, scale) < contrastive_loss(image, text, different, scale)


@pytest.mark.parametrize("caption", ["A red circle and a blue square.", "An image with a red circle and a blue square.",
                                     "There is a red circle and a blue square in the image."])
def test_caption_patterns_reduce_to_the_object_sequence(caption):
    assert _caption_objects(caption) == "a red circle and a blue square"


def test_pretraining_saves_loadable_encoders_that_separate_objects_and_is_reused(data, tmp_path):
    paths, tokenizer_dir, tokenizer = data
    random_cfgs = [c for c in tiny_encoder_configs() if c.kind in ("convnext", "clip")]  # two kinds keep it quick
    cfg = EncoderPretrainConfig(steps=120, batch_size=32, lr=3e-3, warmup_steps=5)
    cfgs, record = pretrain_encoders(random_cfgs, tokenizer, tokenizer_dir, paths.stage1, paths.image_dir, tmp_path, cfg)
    assert record["final_loss"] < 0.85 * record["first_loss"]
    out_dir = tmp_path / record["key"][:16]
    assert json.loads((out_dir / RECORD_NAME).read_text()) == record
    assert [c.kind for c in cfgs] == [c.kind for c in random_cfgs]
    for trained, random in zip(cfgs, random_cfgs):
        assert trained.pretrained == str(out_dir / trained.kind)
        assert (trained.image_size, trained.select_layer) == (random.image_size, random.select_layer)
        loaded, fresh = build_encoder(trained), build_encoder(random)
        assert (loaded.num_tokens, loaded.hidden_size) == (fresh.num_tokens, fresh.hidden_size)
        assert not any(p.requires_grad for p in loaded.parameters())  # frozen again
        pixels = torch.stack([loaded.preprocess(Image.open(paths.image_dir / "train_00000.png").convert("RGB"))])
        assert not torch.allclose(loaded(pixels), fresh(pixels))  # trained weights, not the random init

    weights = out_dir / "clip" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again, reused = pretrain_encoders(random_cfgs, tokenizer, tokenizer_dir, paths.stage1, paths.image_dir, tmp_path, cfg)
    assert reused == record and again == cfgs and weights.stat().st_mtime_ns == stamp
    other, _ = pretrain_encoders(random_cfgs, tokenizer, tokenizer_dir, paths.stage1, paths.image_dir, tmp_path,
                                 cfg.model_copy(update={"steps": 2}))
    assert other[0].pretrained != cfgs[0].pretrained  # other weights, other directory (feature hashes differ)


def test_pretraining_refuses_already_pretrained_encoders(data, tmp_path):
    paths, tokenizer_dir, tokenizer = data
    cfgs = [c.model_copy(update={"pretrained": "openai/clip-vit-large-patch14-336"}) if c.kind == "clip" else c
            for c in tiny_encoder_configs()]
    with pytest.raises(ValueError, match=r"\['clip'\] already name pretrained weights"):
        pretrain_encoders(cfgs, tokenizer, tokenizer_dir, paths.stage1, paths.image_dir, tmp_path, EncoderPretrainConfig())
