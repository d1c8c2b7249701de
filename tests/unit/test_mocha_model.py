"""The full model on tiny random configs: splice, freezing per stage, losses, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mocha.model.mocha import MochaModel, causal_lm_loss, supervised_positions
from mocha.model.tiny import tiny_llm_config, tiny_model_config
from mocha.text.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MochaModel(tiny_model_config(), vocab_size=VOCAB).eval()  # no dropout: exact comparisons


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _pixels(model, images):
    per = [model.preprocess(im) for im in images]
    return {k: torch.stack([p[k] for p in per]) for k in per[0]}


def naive_splice(model, input_ids, attention_mask, labels, visual):
    """Per-sample reference: cut at the placeholder, insert the visual rows, right-pad."""
    embed = model.llm.get_input_embeddings()
    rows, masks, labs, v = [], [], [], 0
    for i in range(input_ids.shape[0]):
        ids = input_ids[i]
        pos = (ids == IMAGE_TOKEN_INDEX).nonzero()
        e = embed(ids.clamp(min=0))
        if len(pos):
            p = int(pos[0])
            n = visual.shape[1]
            e = torch.cat([e[:p], visual[v], e[p + 1:]])
            m = torch.cat([attention_mask[i, :p], torch.ones(n, dtype=torch.long), attention_mask[i, p + 1:]])
            lab = torch.cat([labels[i, :p], torch.full((n,), IGNORE_INDEX), labels[i, p + 1:]])
            v += 1
        else:
            m, lab = attention_mask[i], labels[i]
        rows.append(e), masks.append(m), labs.append(lab)
    length = max(r.shape[0] for r in rows)
    pad = lambda t, val: torch.cat([t, t.new_full((length - t.shape[0],) + t.shape[1:], val)])  # noqa: E731
    return (torch.stack([pad(r, 0.0) for r in rows]), torch.stack([pad(m, 0) for m in masks]),
            torch.stack([pad(lab, IGNORE_INDEX) for lab in labs]))


def test_splice_matches_per_sample_reference(model):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9))
    ids[0, 2] = IMAGE_TOKEN_INDEX   # image in the middle
    ids[2, 0] = IMAGE_TOKEN_INDEX   # image first; sample 1 is text-only
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone().masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    visual = torch.randn(2, model.num_visual_tokens, model.llm.config.hidden_size)
    got = model.splice(ids, mask, labels, visual)
    want = naive_splice(model, ids, mask, labels, visual)
    assert got[0].shape == (3, 9 + model.num_visual_tokens - 1, model.llm.config.hidden_size)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_supervised_positions_of_input_labels_are_the_positions_the_lm_loss_averages(model):
    """Training weights each micro-batch by its supervised positions, counted before the forward
    on the input labels: the count must equal what causal_lm_loss averages over after splicing."""
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, 8))
    ids[0, 1] = IMAGE_TOKEN_INDEX
    ids[2, 0] = IMAGE_TOKEN_INDEX
    labels = ids.clone().masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    labels[1, :4] = IGNORE_INDEX  # an instruction part
    labels[0, 0] = 7  # a label on a row's first position is never predicted
    visual = torch.randn(2, model.num_visual_tokens, model.llm.config.hidden_size)
    _, _, spliced = model.splice(ids, torch.ones_like(ids), labels, visual)
    assert supervised_positions(labels) == int((spliced[:, 1:] != IGNORE_INDEX).sum()) == 3 * 7 - 1 - 3  # row 0: placeholder; row 1: positions 1-3
    logits = torch.randn(3, spliced.shape[1], VOCAB)
    total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), spliced[:, 1:].reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(causal_lm_loss(logits, spliced) * supervised_positions(labels), total)


def test_splice_rejects_wrong_visual_count_and_two_placeholders(model):
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6]])
    with pytest.raises(ValueError, match="1 samples have an <image>"):
        model.splice(ids, torch.ones_like(ids), None, None)
    with pytest.raises(ValueError, match="at most one"):
        ids2 = torch.tensor([[IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX]])
        model.splice(ids2, torch.ones_like(ids2), None, torch.zeros(1, model.num_visual_tokens, 64))


def test_visual_tokens_follow_encoder_order_and_shapes(model):
    assert model.encoder_kinds == ("siglip", "convnext", "clip", "dinov2")
    feats = model.encode_images(_pixels(model, _images(2)))
    for kind, f in feats.items():
        assert f.shape == (2, model.encoder_tokens[kind], model.encoder_widths[kind])
    vis = model.project(feats)
    assert vis.tokens.shape == (2, model.num_visual_tokens, model.llm.config.hidden_size)
    assert set(vis.expert_load) == set(model.encoder_kinds)


@pytest.mark.parametrize("stage,expected", [(1, {"connectors"}), (2, {"connectors", "llm"})])
def test_only_intended_parts_get_gradients(stage, expected):
    torch.manual_seed(0)
    m = MochaModel(tiny_model_config(), vocab_size=VOCAB)
    m.set_trainable(stage)
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 10, 11, 12, 13]])
    out = m(ids, torch.ones_like(ids), labels=torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 11, 12, 13]]),
            pixel_values=_pixels(m, _images(1)))
    out.loss.backward()
    got = {n.split(".", 1)[0] for n, p in m.named_parameters() if p.grad is not None}
    assert got == expected
    assert all(not p.requires_grad for p in m.encoders.parameters())


def test_loss_combines_lm_and_router_losses(model):
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 10, 11, 12]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 11, 12]])
    out = model(ids, torch.ones_like(ids), labels=labels, pixel_values=_pixels(model, _images(1)))
    cfg = model.config.connector
    torch.testing.assert_close(out.loss, out.lm_loss + cfg.balance_coef * out.balance_loss + cfg.z_coef * out.z_loss)
    assert out.balance_loss > 0 and out.z_loss > 0


def test_lm_loss_ignores_masked_positions_and_is_zero_without_labels():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    want = (torch.nn.functional.cross_entropy(logits[0, 0:1], labels[0, 1:2])
            + torch.nn.functional.cross_entropy(logits[0, 2:3], labels[0, 3:4])) / 2
    torch.testing.assert_close(causal_lm_loss(logits, labels), want)
    assert causal_lm_loss(logits, torch.full((1, 4), IGNORE_INDEX)).item() == 0.0


def test_visual_input_on_text_only_batch_joins_loss_with_zero_weight(model):
    """Used to keep expert-parallel collectives matched: gradients flow (zero) to connectors."""
    ids = torch.tensor([[10, 11, 12, 13]])
    labels = ids.clone()
    feats = {k: torch.zeros(1, model.encoder_tokens[k], model.encoder_widths[k]) for k in model.encoder_kinds}
    plain = model(ids, torch.ones_like(ids), labels=labels)
    with_dummy = model(ids, torch.ones_like(ids), labels=labels, features=feats)
    torch.testing.assert_close(plain.loss, with_dummy.loss)


def test_features_path_equals_pixel_path(model):
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 10, 11]])
    px = _pixels(model, _images(1))
    a = model(ids, torch.ones_like(ids), pixel_values=px).logits
    b = model(ids, torch.ones_like(ids), features=model.encode_images(px)).logits
    assert torch.equal(a, b)


def test_save_load_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    m = MochaModel(tiny_model_config(llm=tiny_llm_config("llama"), template="vicuna_v1",
                                     hga={"mode": "attention", "num_heads": 4}), vocab_size=VOCAB).eval()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 10, 11]])
    px = _pixels(m, _images(1))
    want = m(ids, torch.ones_like(ids), pixel_values=px).logits
    m.save_pretrained(tmp_path / "full")
    m.save_pretrained(tmp_path / "full", parts=("connectors", "hga"))
    loaded = MochaModel.from_pretrained(tmp_path / "full").eval()
    assert torch.equal(loaded(ids, torch.ones_like(ids), pixel_values=px).logits, want)

    # the hand-off: a fresh model takes the connectors + HGA by exact key
    from safetensors.torch import load_file

    fresh = MochaModel(m.config, vocab_size=VOCAB)
    fresh.load_part_state_dict(load_file(tmp_path / "full" / "trainable.safetensors"), ("connectors", "hga"))
    for name, tensor in m.part_state_dict(("connectors", "hga")).items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    partial = {k: v for k, v in m.part_state_dict(("connectors", "hga")).items() if not k.startswith("connectors.dinov2")}
    with pytest.raises(KeyError, match="connectors.dinov2"):
        fresh.load_part_state_dict(partial, ("connectors", "hga"))


def test_llm_experts_are_part_of_the_architecture_and_load_back(tmp_path):
    """A model with MoE layers in its LLM (``llm_experts``) saves and loads back with the same
    layers and outputs; without the setting the upcycled weights would not fit the config."""
    from mocha.model.moe_llm import MoEFeedForward

    torch.manual_seed(0)
    cfg = tiny_model_config(llm_experts={"layers": [1], "num_experts": 4, "top_k": 2})
    m = MochaModel(cfg, vocab_size=VOCAB).eval()
    assert isinstance(m.llm.model.layers[1].mlp, MoEFeedForward)
    assert not isinstance(m.llm.model.layers[0].mlp, MoEFeedForward)
    with torch.no_grad():  # experts differ, as after training, so routing matters
        for p in m.llm.model.layers[1].mlp.experts.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 10, 11]])
    px = _pixels(m, _images(1))
    want = m(ids, torch.ones_like(ids), pixel_values=px).logits
    m.save_pretrained(tmp_path)
    loaded = MochaModel.from_pretrained(tmp_path).eval()
    assert loaded.config.llm_experts == cfg.llm_experts
    assert torch.equal(loaded(ids, torch.ones_like(ids), pixel_values=px).logits, want)
    import json

    saved = json.loads((tmp_path / "mocha_config.json").read_text())
    (tmp_path / "mocha_config.json").write_text(json.dumps({**saved, "llm_experts": None}))
    with pytest.raises(KeyError, match="unexpected.*mlp.experts"):
        MochaModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="top_k"):
        tiny_model_config(llm_experts={"layers": [1], "num_experts": 2, "top_k": 3})


def test_generate_is_deterministic_greedy(model):
    model.eval()
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 10, 11]])
    px = _pixels(model, _images(1))
    a = model.generate(ids, pixel_values=px, max_new_tokens=5, pad_token_id=0)
    b = model.generate(ids, pixel_values=px, max_new_tokens=5, pad_token_id=0)
    assert a.shape[1] <= 5 and torch.equal(a, b)


def test_random_init_encoders_are_reproducible_across_processes():
    """The feature pipeline and the trainers build the frozen random encoders independently:
    the weights must not depend on the global RNG state at build time."""
    from mocha.model.encoders import build_encoder
    from mocha.model.tiny import tiny_encoder_configs

    cfg = tiny_encoder_configs()[1]
    torch.manual_seed(1)
    a = build_encoder(cfg)
    torch.manual_seed(2)
    b = build_encoder(cfg)
    c = build_encoder(cfg.model_copy(update={"init_seed": 7}))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
