"""Conversation templates and label masking (mocha.text.conversation)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, trainers
from transformers import PreTrainedTokenizerFast

from mocha.text.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    STATUS_MISMATCH,
    STATUS_NO_SUPERVISED_TOKENS,
    STATUS_OK,
    STATUS_TOO_LONG_IMAGE_CUT,
    STATUS_TRUNCATED,
    TEMPLATES,
    VICUNA_SYSTEM,
    ConversationError,
    build_prompt,
    render_conversation,
    tokenize_conversation,
    tokenize_prompt,
)
from mocha.text.tokenizer import train_bpe_tokenizer

MULTI_TURN = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "2"},
    {"from": "human", "value": "Is there a blue square in the image?"},
    {"from": "gpt", "value": "No, there is no blue square."},
]
REPLIES = [t["value"] for t in MULTI_TURN if t["from"] == "gpt"]

#: (template, tokenizer family) pairs as they are used in practice.
PAIRS = [("phi", "phi"), ("vicuna_v1", "llama"), ("plain", "phi"), ("plain", "llama")]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    corpus = [render_conversation(MULTI_TURN, name) for name in TEMPLATES] * 5
    return {
        family: train_bpe_tokenizer(corpus, tmp_path_factory.mktemp(family), vocab_size=400, family=family)
        for family in ("phi", "llama")
    }


def learned_runs(sample):
    """Maximal runs of consecutive learned positions, as token-id lists."""
    runs, current = [], []
    for label in sample.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template,family", PAIRS)
def test_unmasked_labels_decode_to_replies_plus_turn_end(tokenizers, template, family):
    tokenizer = tokenizers[family]
    sample = tokenize_conversation(MULTI_TURN, tokenizer, template)
    assert sample.status == STATUS_OK and sample.trainable
    assert len(sample.labels) == len(sample.input_ids)
    # Every learned label is the input id at its position (labels are not shifted here).
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(sample.labels, sample.input_ids))
    turn_end = TEMPLATES[template].turn_end
    runs = [tokenizer.decode(run) for run in learned_runs(sample)]
    if template == "plain":
        # Plain concatenates captions directly: the learned text is one run.
        assert runs == ["".join(reply + turn_end for reply in REPLIES)]
    else:
        # The separating space after "ASSISTANT:" is merged into the reply's first word.
        assert runs == [" " + reply + turn_end for reply in REPLIES]


@pytest.mark.parametrize("template,family", [("phi", "phi"), ("vicuna_v1", "llama")])
def test_chat_layout_bos_and_image_position(tokenizers, template, family):
    tokenizer = tokenizers[family]
    sample = tokenize_conversation(MULTI_TURN, tokenizer, template)
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    position = sample.input_ids.index(IMAGE_TOKEN_INDEX)
    assert sample.labels[position] == IGNORE_INDEX
    before = tokenizer.decode(sample.input_ids[:position])
    expected_bos = "<s>" if template == "vicuna_v1" else ""
    assert before == expected_bos + VICUNA_SYSTEM + " USER: "
    assert tokenizer.decode(sample.input_ids[position + 1 :]).startswith("\nWhat colour is the circle? ASSISTANT: The circle")
    assert (sample.input_ids[0] == tokenizer.bos_token_id) == (template == "vicuna_v1")


@pytest.mark.parametrize("family", ["phi", "llama"])
def test_plain_keeps_only_image_placeholder_from_human_turn(tokenizers, family):
    tokenizer = tokenizers[family]
    conversation = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A red circle."}]
    sample = tokenize_conversation(conversation, tokenizer, "plain")
    bos = [tokenizer.bos_token_id] if family == "llama" else []  # follows the tokenizer's default
    prefix = bos + [IMAGE_TOKEN_INDEX]
    assert sample.input_ids[: len(prefix)] == prefix
    assert sample.labels[: len(prefix)] == [IGNORE_INDEX] * len(prefix)
    assert tokenizer.decode(sample.input_ids[len(prefix) :]) == "A red circle.\n"
    assert sample.labels[len(prefix) :] == sample.input_ids[len(prefix) :]


def test_several_images_become_one_placeholder_id_each(tokenizers):
    conversation = [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "Yes."}]
    sample = tokenize_conversation(conversation, tokenizers["phi"], "phi")
    positions = [i for i, tok in enumerate(sample.input_ids) if tok == IMAGE_TOKEN_INDEX]
    assert len(positions) == 2
    assert tokenizers["phi"].decode(sample.input_ids[positions[0] + 1 : positions[1]]) == " and "


@pytest.mark.parametrize("template,family", [("phi", "phi"), ("vicuna_v1", "llama")])
def test_generation_prompt_is_the_training_prefix(tokenizers, template, family):
    tokenizer = tokenizers[family]
    prompt = build_prompt(MULTI_TURN, template)
    assert prompt.endswith("Is there a blue square in the image? ASSISTANT:")
    assert render_conversation(MULTI_TURN, template).startswith(prompt)
    # A trailing reference answer is left out, and the prompt ids are what training saw.
    assert build_prompt(MULTI_TURN[:-1], template) == prompt
    prompt_ids = tokenize_prompt(MULTI_TURN, tokenizer, template)
    train_ids = tokenize_conversation(MULTI_TURN, tokenizer, template).input_ids
    assert train_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(train_ids[len(prompt_ids) :]) == " " + REPLIES[-1] + TEMPLATES[template].turn_end


def test_tokenization_mismatch_masks_whole_sample():
    # A char-level BPE without pre-tokenizer, trained to merge "T: Red" across the
    # "ASSISTANT:" / reply border: no token boundary where the reply starts.
    conversation = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red."}]
    model = Tokenizer(models.BPE())
    corpus = [render_conversation(conversation, "phi")] + [": Red"] * 50
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>")
    sample = tokenize_conversation(conversation, tokenizer, "phi", sample_id="s7")
    assert sample.status == STATUS_MISMATCH and not sample.trainable
    assert sample.labels == [IGNORE_INDEX] * len(sample.input_ids)
    assert "s7" in sample.detail and "T: Red" in sample.detail


def test_too_long_for_the_image_is_rejected_not_cut(tokenizers):
    tokenizer = tokenizers["phi"]
    plain_len = len(tokenize_conversation(MULTI_TURN, tokenizer, "phi").input_ids)
    image_position = tokenize_conversation(MULTI_TURN, tokenizer, "phi").input_ids.index(IMAGE_TOKEN_INDEX)
    num_image_tokens = 64
    # Image tokens end at image_position + 64: one short of that rejects the sample.
    too_short = image_position + num_image_tokens - 1
    sample = tokenize_conversation(MULTI_TURN, tokenizer, "phi", max_length=too_short, num_image_tokens=num_image_tokens)
    assert sample.status == STATUS_TOO_LONG_IMAGE_CUT and not sample.trainable
    assert sample.labels == [IGNORE_INDEX] * len(sample.input_ids)
    assert len(sample.input_ids) == plain_len  # returned whole for counting, never cut
    # Exactly enough room for the image tokens but no reply: nothing to learn.
    just_the_image = image_position + num_image_tokens
    sample = tokenize_conversation(MULTI_TURN, tokenizer, "phi", max_length=just_the_image, num_image_tokens=num_image_tokens)
    assert sample.status == STATUS_NO_SUPERVISED_TOKENS and not sample.trainable


def test_text_tail_is_truncated_when_the_image_fits(tokenizers):
    tokenizer = tokenizers["phi"]
    full = tokenize_conversation(MULTI_TURN, tokenizer, "phi")
    num_image_tokens = 16
    full_expanded = len(full.input_ids) + num_image_tokens - 1
    max_length = full_expanded - 5
    sample = tokenize_conversation(MULTI_TURN, tokenizer, "phi", max_length=max_length, num_image_tokens=num_image_tokens)
    assert sample.status == STATUS_TRUNCATED and sample.trainable
    assert len(sample.input_ids) + num_image_tokens - 1 == max_length
    assert sample.input_ids == full.input_ids[: len(sample.input_ids)]
    assert sample.labels == full.labels[: len(sample.labels)]
    assert IMAGE_TOKEN_INDEX in sample.input_ids
    fits = tokenize_conversation(MULTI_TURN, tokenizer, "phi", max_length=full_expanded, num_image_tokens=num_image_tokens)
    assert fits.status == STATUS_OK and fits.input_ids == full.input_ids


@pytest.mark.parametrize(
    "conversation,message",
    [
        ([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hi"}], "turn 0 is from 'gpt'"),
        ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"}], "turn 1 is from 'human'"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}], "turn 1 ('gpt') has an empty"),
        ([{"from": "human", "value": "Hi"}], "last turn must be a gpt reply"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}], "gpt reply containing"),
        ([{"from": "human"}], "turn 0 must be an object"),
        ([], "non-empty list"),
    ],
)
def test_malformed_conversations_name_the_sample(tokenizers, conversation, message):
    with pytest.raises(ConversationError, match="sample 'img_42'") as error:
        tokenize_conversation(conversation, tokenizers["phi"], "phi", sample_id="img_42")
    assert message in str(error.value)


def test_template_needs_its_family_turn_end_token(tokenizers):
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        tokenize_conversation(MULTI_TURN, tokenizers["llama"], "phi")
    with pytest.raises(ValueError, match="unknown conversation template"):
        tokenize_conversation(MULTI_TURN, tokenizers["phi"], "chatml")
