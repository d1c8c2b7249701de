"""`mocha export` and `mocha generate`: the exported folder reloads into mocha to the same tokens
(loading it without mocha: test_hf_export.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mocha.cli import main
from mocha.config import ConfigError
from mocha.export.pretrained import export_pretrained, load_pretrained
from mocha.eval.runner import AnswerOptions, VisualQuestionAnswerer
from mocha.text.conversation import tokenize_prompt
from tests.eval_models import build_tiny_model, write_images

PROMPT = "Is there a red circle in the image?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained model's in-memory state and the run export training writes (save_export)."""
    root = tmp_path_factory.mktemp("run")
    model, tokenizer = build_tiny_model(root / "tokenizer")
    export = root / "export"
    model.save_pretrained(export)
    model.save_pretrained(export, parts=("connectors", "hga"))
    tokenizer.save_pretrained(export)
    image = Image.open(root / "images" / write_images(root / "images", 1)[0]).convert("RGB")
    return root, model, tokenizer, image


def _generate(model, tokenizer, image) -> torch.Tensor:
    ids = torch.tensor([tokenize_prompt([{"from": "human", "value": "<image>\n" + PROMPT}], tokenizer,
                                        model.config.template)])
    pixels = {k: v.unsqueeze(0) for k, v in model.preprocess(image).items()}
    return model.generate(ids, pixel_values=pixels, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def test_export_then_load_generates_the_same_tokens(run, tmp_path):
    root, model, tokenizer, image = run
    assert main(["export", "--checkpoint", str(root / "export"), "--out", str(tmp_path / "out")]) == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modeling_mocha.py",
            "processor_config.json", "README.md"} <= files
    exported_vocab = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=False).get_vocab()
    assert exported_vocab.pop("<image>") == len(tokenizer)  # the processor's image token, added last
    assert exported_vocab == tokenizer.get_vocab()
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "out")
    expected = _generate(model, tokenizer, image)
    assert expected.shape[1] > 1
    assert torch.equal(_generate(loaded, loaded_tokenizer, image), expected)


def _write_checkpoint(directory, weights: dict[str, torch.Tensor]):
    """A training checkpoint in mocha.train.checkpoint's format as one rank writes it: one shard of
    flat fp32 fragments ``param/<name>@0``, index.json, state.json last."""
    from mocha.io.tensor_files import TensorSpec, write_tensors
    from mocha.train.checkpoint import FORMAT_VERSION

    shard = "shard-00000-of-00001.safetensors"
    size = write_tensors(str(directory / "shards" / shard),
                         [TensorSpec(f"param/{n}@0", torch.float32, t.numel()) for n, t in weights.items()],
                         (t.float().reshape(-1) for t in weights.values()))
    (directory / "index.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "kinds": ["param"], "shards": {shard: size},
        "shapes": {n: list(t.shape) for n, t in weights.items()},
        "fragments": {f"param/{n}": [[shard, 0, t.numel()]] for n, t in weights.items()}}))
    # A complete state.json: checkpoints are read through its strict schema (mocha.train.checkpoint_state).
    (directory / "state.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "world_size": 1, "global_steps": 3, "global_samples": 24,
        "skipped_steps": 0, "optimizer": {"step": 3, "lr": 1e-4}, "scheduler": None,
        "rng": [{"python": [3, [0] * 625, None], "numpy": ["MT19937", [0] * 624, 0, 0, 0.0]}],
        "extra_state": {"step": 3}}))


def _checkpoint_of(model, directory):
    """What a stage-2 training checkpoint holds: trainable params only (fp32), global names."""
    model.set_trainable(2)
    _write_checkpoint(directory, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})


def test_checkpoint_overlaid_on_base_export(run, tmp_path, capsys):
    root, model, tokenizer, image = run
    trained, _ = build_tiny_model(tmp_path / "tok", seed=1)  # same architecture, other trainable weights
    trained.load_part_state_dict(model.part_state_dict(["encoders"]), ["encoders"])  # frozen parts shared
    _checkpoint_of(trained, tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert "is a training checkpoint (trainable weights only); pass --base" in capsys.readouterr().err

    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--base", str(root / "export"),
                 "--out", str(tmp_path / "out")]) == 0
    loaded, _ = load_pretrained(tmp_path / "out")
    want = trained.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(_generate(loaded, tokenizer, image), _generate(trained.eval(), tokenizer, image))


def test_checkpoint_of_another_model_is_rejected(run, tmp_path):
    """Library call: the mismatch is a ConfigError naming the tensor, and nothing is written."""
    root, *_ = run
    _write_checkpoint(tmp_path / "ckpt", {"connectors.nope.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="connectors.nope.weight"):
        export_pretrained(tmp_path / "ckpt", tmp_path / "out", base=root / "export")
    assert not (tmp_path / "out").exists()


def test_generate_cli_prints_the_answer(run, capsys):
    root, model, tokenizer, _ = run
    image_path = root / "images" / "img_0.png"
    assert main(["generate", "--checkpoint", str(root / "export"), "--image", str(image_path),
                 "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    qa = VisualQuestionAnswerer(model, tokenizer, AnswerOptions(suffix="", max_new_tokens=8))
    expected = qa.answer_images([Image.open(image_path).convert("RGB")], ["<image>\n" + PROMPT])[0]
    assert printed == expected
    assert printed == tokenizer.decode(_generate(model, tokenizer, Image.open(image_path).convert("RGB"))[0],
                                       skip_special_tokens=True).strip()


def test_out_folder_that_is_not_an_export_is_refused_unless_overwrite(run, tmp_path, capsys):
    root, *_ = run
    user = tmp_path / "Documents"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    assert main(["export", "--checkpoint", str(root / "export"), "--out", str(user)]) == 2
    assert "not a MoCHA export" in capsys.readouterr().err and (user / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        export_pretrained(root / "export", tmp_path / "file")
    # An earlier export is replaced without --overwrite; a user folder only with it. Both are
    # swapped in whole: no temporary or set-aside folder is left next to them.
    assert main(["export", "--checkpoint", str(root / "export"), "--out", str(tmp_path / "prev")]) == 0
    assert main(["export", "--checkpoint", str(root / "export"), "--out", str(tmp_path / "prev")]) == 0
    assert main(["export", "--checkpoint", str(root / "export"), "--out", str(user), "--overwrite"]) == 0
    assert not (user / "thesis.tex").exists() and (user / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Documents", "file", "prev"]


def test_failed_swap_keeps_the_previous_export(tmp_path):
    from mocha.export.pretrained import replace_atomically

    old, staging = tmp_path / "out", tmp_path / ".out.abc123"
    old.mkdir()
    (old / "model.safetensors").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_atomically(staging, old)  # staging missing: the rename fails midway
    assert (old / "model.safetensors").read_text() == "old"
    staging.mkdir()
    (staging / "model.safetensors").write_text("new")
    replace_atomically(staging, old)
    assert (old / "model.safetensors").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
