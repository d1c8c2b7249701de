"""Contrastive pre-training of the demo's tiny vision encoders: the stand-in for the CLIP,
SigLIP, DINOv2 and ConvNeXt pre-training that real MoCHA starts from.

Why the demo needs it. MoCHA keeps its four encoders frozen; real ones arrive pre-trained on
hundreds of millions of images, so their patch tokens already say what is where. The demo's
tiny encoders are random. Measured on the demo data (768 training, 256 held-out images): a
linear read-out of each patch token, max over tokens, finds which of the 8 object kinds are in
a held-out image 86-95% of the time depending on the encoder (mean 92%), where always answering
"absent" already scores 75%; by the mean-pooled tokens 80-86%. Random layers blur the one thing
the questions ask about (which colour/shape is where) into the rest, and MoCHA's connectors, the
HGA and the LLM then have to undo that from a few thousand examples.

What it does. Each encoder's selected tokens (exactly what :class:`~mocha.model.encoders.VisionEncoder`
hands to the connectors) are mean-pooled and projected; a small text encoder (token embedding
and a GRU, so word order counts) embeds the image's caption, which lists the objects from left
to right. A CLIP-style symmetric InfoNCE loss pulls every image towards its own caption, one
loss per encoder (each is pre-trained on its own, as the real ones were). Images whose captions
list the same objects in the same order are not treated as negatives of each other. Only the
training images and their stage-1 captions are used; held-out images never are.

Afterwards the encoders are saved with ``save_pretrained``, one directory per kind, and the demo
loads them through ``EncoderConfig.pretrained`` (the same ``from_pretrained`` path that loads
the real checkpoints) and keeps them frozen, as the paper does. The text encoder and the
projection heads are thrown away. The output directory is named after a hash of everything
that determines the weights, so feature shards computed from other weights (whose config hash
names the directory) are never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import Tensor, nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from mocha.config import EncoderConfig, StrictModel
from mocha.model.encoders import VisionEncoder, build_encoder

RECORD_NAME = "pretrain.json"


class EncoderPretrainConfig(StrictModel):
    """Contrastive image-caption pre-training of the tiny encoders (see the module docstring)."""

    steps: int = Field(default=400, ge=1)
    batch_size: int = Field(default=64, ge=2)
    lr: float = Field(default=2e-3, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    embed_dim: int = Field(default=64, ge=8, description="width of the shared image-text embedding")
    seed: int = 0


class CaptionEncoder(nn.Module):
    """Caption token ids -> one vector: embedding, GRU (order-aware), last valid state."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        states, _ = self.rnn(self.embed(ids))
        return self.out(states[torch.arange(len(ids)), lengths - 1])


class PooledHead(nn.Module):
    """Encoder tokens ``[B, N, C]`` -> ``[B, dim]``: mean over tokens, LayerNorm, linear."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.norm(tokens.mean(dim=1)))


def contrastive_loss(image: Tensor, text: Tensor, same: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between L2-normalised ``image`` and ``text`` rows; ``same[i, j]`` marks
    pairs that count as matches (an image and every caption with its object sequence), the
    target spreads evenly over them."""
    logits = logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    target = same.float() / same.float().sum(dim=1, keepdim=True)
    return 0.5 * (torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
                  + torch.sum(-target.T * logits.log_softmax(dim=0), dim=1).mean())


def request_key(encoders: list[EncoderConfig], cfg: EncoderPretrainConfig, captions_file: Path,
                tokenizer_dir: Path) -> str:
    """Hash of everything that determines the pre-trained weights."""
    blob = json.dumps({"encoders": [e.model_dump() for e in encoders], "pretrain": cfg.model_dump(),
                       "captions": hashlib.sha256(captions_file.read_bytes()).hexdigest(),
                       "tokenizer": hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def pretrained_encoder_configs(encoders: list[EncoderConfig], out_dir: Path) -> list[EncoderConfig]:
    """``encoders`` pointing at their pre-trained weights under ``out_dir`` (one folder per kind),
    same image size and token selection."""
    return [e.model_copy(update={"pretrained": str(out_dir / e.kind), "config": {}}) for e in encoders]


def _caption_objects(caption: str) -> str:
    """The object sequence of a caption, whichever of the caption patterns wrote it."""
    text = caption.rstrip(".").lower()
    for lead in ("an image with ", "there is "):
        if text.startswith(lead):
            text = text[len(lead):]
    return text.removesuffix(" in the image")


def _load_pairs(captions_file: Path, image_dir: Path) -> tuple[list[Image.Image], list[str]]:
    records = json.loads(captions_file.read_text(encoding="utf-8"))
    images = [Image.open(image_dir / r["image"]).convert("RGB") for r in records]
    captions = [r["conversations"][-1]["value"] for r in records]
    return images, captions


def pretrain_encoders(encoders: list[EncoderConfig], tokenizer: PreTrainedTokenizerBase, tokenizer_dir: str | Path,
                      captions_file: str | Path, image_dir: str | Path, out_root: str | Path,
                      cfg: EncoderPretrainConfig) -> tuple[list[EncoderConfig], dict[str, Any]]:
    """Pre-train random ``encoders`` contrastively on ``captions_file`` (a LLaVA JSON list whose
    last turn is the caption, e.g. the demo's ``stage1.json``) and save them under
    ``out_root/<key>/<kind>``. Returns the encoder configs that load them and the record written
    to ``out_root/<key>/pretrain.json`` (steps, losses, seconds). A directory already holding a
    record of the same request is reused as it is."""
    pretrained = [e.kind for e in encoders if e.pretrained is not None]
    if pretrained:
        raise ValueError(f"pretrain_encoders starts from random encoders; {pretrained} already name pretrained weights")
    captions_file, image_dir, tokenizer_dir = Path(captions_file), Path(image_dir), Path(tokenizer_dir)
    key = request_key(encoders, cfg, captions_file, tokenizer_dir)
    out_dir = Path(out_root) / key[:16]
    record_path = out_dir / RECORD_NAME
    if record_path.exists() and json.loads(record_path.read_text()).get("key") == key:
        print(f"[pretrain-encoders] reusing {out_dir} (same encoders, captions and settings)", flush=True)
        return pretrained_encoder_configs(encoders, out_dir), json.loads(record_path.read_text())

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    models: dict[str, VisionEncoder] = {e.kind: build_encoder(e) for e in encoders}
    images, captions = _load_pairs(captions_file, image_dir)
    if len(images) < cfg.batch_size:
        raise ValueError(f"{captions_file} has {len(images)} image-caption pairs, fewer than batch_size={cfg.batch_size}")
    pixels = {kind: torch.stack([enc.preprocess(im) for im in images]) for kind, enc in models.items()}
    encoded = [tokenizer(c, add_special_tokens=False).input_ids for c in captions]
    lengths = torch.tensor([len(ids) for ids in encoded])
    ids = torch.full((len(encoded), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
    _, object_ids = np.unique([_caption_objects(c) for c in captions], return_inverse=True)
    object_ids = torch.from_numpy(object_ids)

    text = CaptionEncoder(len(tokenizer), cfg.embed_dim)
    heads = nn.ModuleDict({kind: PooledHead(enc.hidden_size, cfg.embed_dim) for kind, enc in models.items()})
    logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    for enc in models.values():
        enc.model.requires_grad_(True)
    params = [p for enc in models.values() for p in enc.model.parameters()]
    params += list(text.parameters()) + list(heads.parameters()) + [logit_scale]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
        * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))

    start = time.perf_counter()
    losses: list[float] = []
    progress = tqdm(range(cfg.steps), desc="pre-training the tiny encoders (image-caption contrastive)", unit="step")
    for step in progress:
        batch = torch.from_numpy(rng.choice(len(images), size=cfg.batch_size, replace=False))
        caption_vectors = text(ids[batch], lengths[batch])
        same = object_ids[batch][:, None] == object_ids[batch][None, :]
        loss = sum(contrastive_loss(heads[kind](enc.tokens(pixels[kind][batch])), caption_vectors, same, logit_scale)
                   for kind, enc in models.items()) / len(models)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            logit_scale.clamp_(0, float(np.log(100)))
        losses.append(loss.item())
        if step % 25 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    seconds = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, enc in models.items():
        enc.model.requires_grad_(False)
        enc.model.save_pretrained(out_dir / kind)
    record = {"key": key, "steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": round(seconds, 1),
              "first_loss": round(losses[0], 4), "final_loss": round(float(np.mean(losses[-25:])), 4),
              "pairs": len(images), "config": cfg.model_dump()}
    record_path.write_text(json.dumps(record, indent=2))
    print(f"[pretrain-encoders] {cfg.steps} steps in {seconds:.0f} s: contrastive loss {record['first_loss']:.2f} -> "
          f"{record['final_loss']:.2f} -> {out_dir}", flush=True)
    return pretrained_encoder_configs(encoders, out_dir), record
