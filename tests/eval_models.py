"""A tiny saved MoCHA model with its own tokenizer and a few images, for evaluation tests.

The LLM is the llama family with its weights redrawn at a larger scale (std 0.3): at the
default init a 2-layer model answers every prompt the same way, which would let a test
comparing two generation paths pass on plumbing that ignores its inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mocha.model.mocha import MochaModel
from mocha.model.tiny import tiny_llm_config, tiny_model_config
from mocha.text.tokenizer import train_bpe_tokenizer

CORPUS = ["Is there a red circle in the image?", "Is there a blue square in the image?", "Yes.", "No.",
          "What colour is the triangle?", "A green diamond and a yellow triangle.", "There are two shapes."]


#: LLM family -> the conversation template its models are trained with.
FAMILY_TEMPLATES = {"llama": "vicuna_v1", "phi": "phi"}


def build_tiny_model(tokenizer_dir: Path, seed: int = 0, family: str = "llama"):
    """(model in eval mode, tokenizer); the LLM's vocabulary is exactly the tokenizer's."""
    tokenizer = train_bpe_tokenizer(CORPUS * 10, tokenizer_dir, vocab_size=400, family=family)
    llm = tiny_llm_config(family)
    llm = llm.model_copy(update={"config": {**llm.config, "vocab_size": len(tokenizer)}})
    torch.manual_seed(seed)
    model = MochaModel(tiny_model_config(llm=llm, template=FAMILY_TEMPLATES[family]), vocab_size=len(tokenizer))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("llm."):
                param.normal_(0.0, 0.3)
    return model.eval(), tokenizer


def save_tiny_pretrained(directory: Path, seed: int = 0):
    """Save a tiny model + tokenizer in pretrained form; returns (model, tokenizer)."""
    with tempfile.TemporaryDirectory(prefix="mocha-test-tokenizer-") as tokenizer_dir:
        model, tokenizer = build_tiny_model(Path(tokenizer_dir), seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def write_images(directory: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` random 48x48 PNGs; returns their file names."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(directory / name)
        names.append(name)
    return names
