"""LLaVA-1.5's preprocessing, on by default with a switch each: images padded to a square with
the mean colour before every encoder, ``<image>`` moved to the front of its turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mocha.config import ModelConfig
from mocha.model.encoders import PAD_COLOUR, expand_to_square
from mocha.text.conversation import IMAGE_TOKEN_INDEX, image_first, tokenize_conversation, tokenize_prompt


def test_defaults_are_on_and_padding_is_part_of_the_feature_hash():
    config = ModelConfig()
    assert config.pad_to_square and config.image_token_first
    off = config.model_copy(update={"pad_to_square": False})
    assert off.encoder_config_hash() != config.encoder_config_hash()  # features of the other setting are refused
    assert config.model_copy(update={"image_token_first": False}).encoder_config_hash() == config.encoder_config_hash()


@pytest.mark.parametrize("size, offset", [((20, 10), (0, 5)), ((7, 16), (4, 0))])
def test_expand_to_square_centres_the_image_on_the_mean_colour(size, offset):
    image = Image.new("RGB", size, (250, 0, 0))
    square = np.asarray(expand_to_square(image))
    side = max(size)
    assert square.shape == (side, side, 3) and PAD_COLOUR == (122, 116, 104)  # OpenAI CLIP mean x 255
    x, y = offset
    inside = np.zeros((side, side), dtype=bool)
    inside[y:y + size[1], x:x + size[0]] = True
    assert (square[inside] == (250, 0, 0)).all() and (square[~inside] == PAD_COLOUR).all()
    same = Image.new("RGB", (9, 9))
    assert expand_to_square(same) is same


def test_model_preprocess_pads_before_every_encoder_and_the_switch_turns_it_off():
    from mocha.model.mocha import MochaModel
    from mocha.model.tiny import tiny_model_config

    wide = Image.new("RGB", (60, 20), (0, 200, 0))
    padded, plain = (MochaModel(tiny_model_config(pad_to_square=p)) for p in (True, False))
    got_padded, got_plain = padded.preprocess(wide), plain.preprocess(wide)
    for kind, encoder in padded.encoders.items():
        torch.testing.assert_close(got_padded[kind], encoder.preprocess(expand_to_square(wide)), rtol=0, atol=0)
        torch.testing.assert_close(got_plain[kind], encoder.preprocess(wide), rtol=0, atol=0)
        assert not torch.equal(got_padded[kind], got_plain[kind])  # the padding reached every encoder


def test_image_first_moves_the_placeholder_to_the_front_of_its_turn():
    turns = [{"from": "human", "value": "What is in the picture? <image>"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Black."}]
    moved = image_first(turns)
    assert moved[0]["value"] == "<image>\nWhat is in the picture?" and moved[1:] == turns[1:]
    assert turns[0]["value"] == "What is in the picture? <image>"  # input untouched
    text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    assert image_first(text_only) == text_only


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mocha.text.tokenizer import train_bpe_tokenizer

    texts = ["What is in the picture? A cat.", "USER: ASSISTANT: hi"] * 30
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def test_tokenised_image_placeholder_comes_first_in_training_and_prompts(tokenizer):
    turns = [{"from": "human", "value": "What is in the picture? <image>"}, {"from": "gpt", "value": "A cat."}]
    late = tokenize_conversation(turns, tokenizer, "phi")
    early = tokenize_conversation(turns, tokenizer, "phi", image_token_first=True)
    prefix = len(tokenizer("A chat between a curious user and an artificial intelligence assistant. The assistant "
                           "gives helpful, detailed, and polite answers to the user's questions. USER: ",
                           add_special_tokens=False).input_ids)
    assert early.status == late.status == "ok"
    assert early.input_ids.index(IMAGE_TOKEN_INDEX) == prefix < late.input_ids.index(IMAGE_TOKEN_INDEX)
    prompt = tokenize_prompt(turns[:1], tokenizer, "phi", image_token_first=True)
    assert prompt == early.input_ids[:len(prompt)]  # generation sees what training saw


@pytest.mark.parametrize("template", ["phi", "vicuna_v1"])
def test_export_chat_template_and_processor_follow_both_switches(template, tokenizer):
    """The transformers-native export renders and preprocesses as training did: the chat template
    moves <image> first (as image_first), the processor pads to a square before the encoders."""
    from jinja2 import Environment

    from mocha.export.chat_template import chat_template
    from mocha.export.hf_processing import MochaProcessor
    from mocha.model.tiny import tiny_encoder_configs
    from mocha.text.conversation import build_prompt

    turns = [{"from": "human", "value": "What is in the picture? <image>"}]
    for content in (turns[0]["value"], [{"type": "text", "text": "What is in the picture? "}, {"type": "image"}]):
        messages = [{"role": "user", "content": content}]
        rendered = Environment().from_string(chat_template(template, image_token_first=True)).render(messages=messages)
        assert rendered == build_prompt(image_first(turns), template)
        as_given = Environment().from_string(chat_template(template)).render(messages=messages)
        assert as_given != rendered  # the switch matters

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    encoders = [c.model_dump() for c in tiny_encoder_configs()]
    wide = Image.new("RGB", (60, 20), (0, 200, 0))
    pixels = {pad: MochaProcessor(tokenizer, encoders=encoders, template=template, num_image_tokens=3,
                                  pad_to_square=pad)(images=[wide], text="<image>\nHi") for pad in (True, False)}
    from mocha.model.mocha import MochaModel
    from mocha.model.tiny import tiny_model_config

    model = MochaModel(tiny_model_config(pad_to_square=True))
    for kind, expected in model.preprocess(wide).items():
        torch.testing.assert_close(pixels[True][f"pixel_values_{kind}"][0], expected, rtol=0, atol=0)
        assert not torch.equal(pixels[False][f"pixel_values_{kind}"][0], expected)
