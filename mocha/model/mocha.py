"""The full MoCHA model: frozen encoders -> MoE connectors -> HGA -> spliced into the LLM.

Readable without any distributed machinery: expert parallelism, ZeRO and checkpointing are
applied from outside (``mocha.train``). Data flow for a batch::

    pixel_values[kind] --encoder--> features[kind] [B_img, N_k, D_k]      (or precomputed features)
    features[kind] --connector[kind]--> [B_img, N_k, H]   (+ balance / z losses, expert load)
    concat in encoder order (HGA group ids 0..G-1) --HGA--> visual tokens [B_img, N_vis, H]
    input_ids with one IMAGE_TOKEN_INDEX placeholder per image sample --splice--> LLM inputs_embeds

The splice is vectorised (no loop over the batch): text token j of a sample whose placeholder
sits at position p moves to j (j < p) or j + N_vis - 1 (j > p); the visual tokens fill
[p, p + N_vis). Samples without an image keep their tokens and get N_vis - 1 padding slots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from mocha.config import ModelConfig
from mocha.model.connector import build_connector
from mocha.model.encoders import build_encoder, encoder_geometry, expand_to_square
from mocha.model.hga import build_hga
from mocha.model.llm import build_llm, llm_hidden_size
from mocha.text.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mocha.io.layout import (EXPORT_CONFIG_NAME, EXPORT_HF_CONFIG_NAME, EXPORT_WEIGHTS_INDEX_NAME, EXPORT_WEIGHTS_NAME,
                             TRAINABLE_NAME)


#: Parameter-name prefixes of the model's parts (used for freezing, hand-off and export).
PARTS = ("encoders", "connectors", "hga", "llm")


@dataclass
class VisualTokens:
    """Projected visual tokens for the image samples of a batch, plus the router statistics."""

    tokens: Tensor  # [B_img, N_vis, H]
    balance_loss: Tensor  # scalar: sum over connectors
    z_loss: Tensor  # scalar: sum over connectors
    expert_load: dict[str, Tensor] = field(default_factory=dict)  # kind -> [E]
    hga_gate: Tensor | None = None  # [B_img, N_vis]


@dataclass
class MochaOutput:
    loss: Tensor | None
    lm_loss: Tensor | None
    balance_loss: Tensor
    z_loss: Tensor
    logits: Tensor
    expert_load: dict[str, Tensor]
    hga_gate: Tensor | None


class MochaModel(nn.Module):
    """MoCHA vision-language model.

    ``with_encoders=False`` builds the model without the frozen encoders, for training from
    precomputed feature shards: the encoders are then never built nor their weights read (their
    widths and token counts come from their configs, :func:`~mocha.model.encoders.encoder_geometry`).
    """

    def __init__(self, config: ModelConfig, vocab_size: int | None = None, with_encoders: bool = True,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.config = config
        self.llm = build_llm(config.llm, vocab_size=vocab_size, device=device)
        if config.llm_experts is not None:
            from mocha.model.moe_llm import upcycle_llm_ffn

            experts = config.llm_experts
            upcycle_llm_ffn(self.llm, experts.layers, experts.num_experts, experts.top_k)
        hidden = llm_hidden_size(self.llm)
        # Widths and token counts come from the encoder configs alone: a trainer that trains from
        # feature shards never builds (or reads the weights of) a frozen encoder.
        geometry = [encoder_geometry(cfg) for cfg in config.encoders]
        self.encoder_kinds: tuple[str, ...] = tuple(g.kind for g in geometry)
        self.encoder_widths = {g.kind: g.hidden_size for g in geometry}
        self.encoder_tokens = {g.kind: g.num_tokens for g in geometry}
        self.encoders = None
        if with_encoders:
            self.encoders = nn.ModuleDict({cfg.kind: build_encoder(cfg, device=device) for cfg in config.encoders})
            for g in geometry:
                built = self.encoders[g.kind]
                if (built.num_tokens, built.hidden_size) != (g.num_tokens, g.hidden_size):
                    raise RuntimeError(f"{g.kind}: the built encoder gives {built.num_tokens} tokens of width "
                                       f"{built.hidden_size}, its config {g.num_tokens} of {g.hidden_size}")
        self.connectors = nn.ModuleDict({
            kind: build_connector(config.connector, self.encoder_widths[kind], hidden) for kind in self.encoder_kinds
        }).to(device)
        self.hga = build_hga(config.hga, hidden, [self.encoder_tokens[k] for k in self.encoder_kinds]).to(device)
        self.num_visual_tokens = sum(self.encoder_tokens.values())

    # ------------------------------------------------------------------ trainability
    def set_trainable(self, stage: int) -> None:
        """Stage 1: connectors (+ HGA if learnable) train. Stage 2: connectors, HGA and LLM.
        Encoders are always frozen."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        trainable = {"connectors", "hga"} | ({"llm"} if stage == 2 else set())
        for name, param in self.named_parameters():
            param.requires_grad_(name.split(".", 1)[0] in trainable)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ vision path
    def preprocess(self, image) -> dict[str, Tensor]:
        """PIL image -> {kind: pixel tensor [3, S, S]}: the shared step every encoder sees (pad to a
        square with the mean colour, ``config.pad_to_square``), then each encoder's own processor."""
        if self.encoders is None:
            raise RuntimeError("this model was built without encoders (training from features)")
        if self.config.pad_to_square:
            image = expand_to_square(image.convert("RGB"))
        return {kind: enc.preprocess(image) for kind, enc in self.encoders.items()}

    @torch.no_grad()
    def encode_images(self, pixel_values: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.encoders is None:
            raise RuntimeError("this model was built without encoders; pass precomputed features")
        return {kind: self.encoders[kind](pixel_values[kind]) for kind in self.encoder_kinds}

    def project(self, features: dict[str, Tensor]) -> VisualTokens:
        missing = [k for k in self.encoder_kinds if k not in features]
        if missing:
            raise KeyError(f"features missing for encoders {missing}; got {sorted(features)}")
        projected, balance, z, load = [], [], [], {}
        dtype = next(self.connectors.parameters()).dtype
        for kind in self.encoder_kinds:
            out = self.connectors[kind](features[kind].to(dtype))
            projected.append(out.hidden_states)
            balance.append(out.balance_loss)
            z.append(out.z_loss)
            load[kind] = out.expert_load
        hga_out = self.hga(torch.cat(projected, dim=1))
        return VisualTokens(hga_out.hidden_states, torch.stack(balance).sum(), torch.stack(z).sum(), load,
                            hga_out.gate)

    # ------------------------------------------------------------------ splice
    def splice(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None,
               visual: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Replace each sample's IMAGE_TOKEN_INDEX placeholder by its visual tokens (vectorised).

        ``visual`` holds one row per sample that has a placeholder, in batch order.
        Returns (inputs_embeds [B, L'], attention_mask, labels) with L' = L + N_vis - 1 when any
        sample has an image, else L.
        """
        is_image = input_ids == IMAGE_TOKEN_INDEX
        per_sample = is_image.sum(dim=1)
        if (per_sample > 1).any():
            raise ValueError("each sample may hold at most one <image> placeholder")
        embed = self.llm.get_input_embeddings()
        text_embeds = embed(input_ids.masked_fill(is_image, 0))
        has_image = per_sample.bool()
        n_img = int(has_image.sum())
        if n_img == 0:
            return text_embeds, attention_mask, labels
        if visual is None or visual.shape[0] != n_img:
            got = None if visual is None else visual.shape[0]
            raise ValueError(f"{n_img} samples have an <image> placeholder but visual tokens for {got} were given")
        bsz, length = input_ids.shape
        n_vis = visual.shape[1]
        new_len = length + n_vis - 1
        pos = torch.arange(length, device=input_ids.device).expand(bsz, length)
        placeholder = torch.where(has_image, is_image.float().argmax(dim=1), torch.full_like(per_sample, length))
        shift = (pos > placeholder[:, None]).long() * (n_vis - 1)
        target = pos + shift  # where each text token lands
        keep = ~is_image

        out_embeds = text_embeds.new_zeros(bsz, new_len, text_embeds.shape[-1])
        out_mask = attention_mask.new_zeros(bsz, new_len)
        rows = torch.arange(bsz, device=input_ids.device)[:, None].expand(bsz, length)
        out_embeds[rows[keep], target[keep]] = text_embeds[keep]
        out_mask[rows[keep], target[keep]] = attention_mask[keep]
        img_rows = has_image.nonzero()[:, 0, None].expand(n_img, n_vis)
        img_cols = placeholder[has_image][:, None] + torch.arange(n_vis, device=input_ids.device)
        out_embeds[img_rows, img_cols] = visual.to(out_embeds.dtype)
        out_mask[img_rows, img_cols] = 1
        out_labels = None
        if labels is not None:
            out_labels = labels.new_full((bsz, new_len), IGNORE_INDEX)
            out_labels[rows[keep], target[keep]] = labels[keep]
        return out_embeds, out_mask, out_labels

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                pixel_values: dict[str, Tensor] | None = None, features: dict[str, Tensor] | None = None
                ) -> MochaOutput:
        """One of ``pixel_values`` / ``features`` (per encoder kind, rows = image samples in batch
        order) must be given when the batch holds image placeholders.

        Visual inputs for a batch *without* placeholders are allowed: they run through the
        connectors and HGA and join the loss with weight zero. Distributed training uses this
        to keep every rank's expert-parallel all-to-alls matched on text-only micro-batches.

        The LM loss is the mean token cross-entropy over the supervised (label != -100)
        positions; a batch with none gives 0, not NaN.
        """
        if features is None and pixel_values is not None:
            features = self.encode_images(pixel_values)
        visual = self.project(features) if features is not None else None
        has_placeholder = bool((input_ids == IMAGE_TOKEN_INDEX).any())
        spliced = visual.tokens if visual is not None and has_placeholder else None
        embeds, mask, labels = self.splice(input_ids, attention_mask, labels, spliced)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        zero = logits.new_zeros(())
        balance = visual.balance_loss if visual is not None else zero
        z = visual.z_loss if visual is not None else zero
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            cfg = self.config.connector
            loss = lm_loss + cfg.balance_coef * balance + cfg.z_coef * z
            if visual is not None and spliced is None:
                loss = lm_loss + 0.0 * (visual.tokens.sum() + balance + z)
        return MochaOutput(loss=loss, lm_loss=lm_loss, balance_loss=balance, z_loss=z, logits=logits,
                           expert_load=visual.expert_load if visual else {},
                           hga_gate=visual.hga_gate if visual else None)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 pixel_values: dict[str, Tensor] | None = None, features: dict[str, Tensor] | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, pad_token_id: int | None = None) -> Tensor:
        """Generate a continuation for prompts holding one image placeholder each.
        Returns only the new token ids [B, <= max_new_tokens]. Prompts must be left-padded."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if features is None and pixel_values is not None:
            features = self.encode_images(pixel_values)
        visual = self.project(features).tokens if features is not None else None
        embeds, mask, _ = self.splice(input_ids, attention_mask, None, visual)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=eos_token_id,
                                 pad_token_id=pad_token_id, **kwargs)

    # ------------------------------------------------------------------ weights
    def part_state_dict(self, parts: Iterable[str]) -> dict[str, Tensor]:
        parts = tuple(parts)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in parts}

    def load_part_state_dict(self, state: dict[str, Tensor], parts: Iterable[str]) -> None:
        """Load the given parts by exact key: every key of those parts must be present, no extra."""
        expected = set(self.part_state_dict(parts))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"state dict does not match parts {tuple(parts)}: missing {missing[:8]}"
                           f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           f"{'...' if len(unexpected) > 8 else ''}")
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, directory: str | Path, parts: Iterable[str] | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write ``mocha_config.json`` and the weights as safetensors.

        The config is self-contained: every sub-model that is present is described by its full
        architecture, so ``from_pretrained`` rebuilds the model offline from the directory alone
        (encoders absent from the weights — a model trained from feature shards — are rebuilt
        from their config: ``pretrained`` ids or seeded random init). ``parts`` limits the
        weights to those parts (``("connectors", "hga")`` is the stage-1 -> stage-2 hand-off,
        written as ``trainable.safetensors``). ``state_dict`` overrides the module's own (a
        consolidated state gathered from expert-parallel ranks).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / EXPORT_CONFIG_NAME).write_text(json.dumps(self.self_contained_config().model_dump(), indent=2))
        state = self.state_dict() if state_dict is None else state_dict
        if parts is not None:
            parts = tuple(parts)
            state = {k: v for k, v in state.items() if k.split(".", 1)[0] in parts}
        name = TRAINABLE_NAME if parts is not None else EXPORT_WEIGHTS_NAME
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, str(directory / name),
                  metadata={"format": "pt", "parts": ",".join(parts or PARTS)})
        return directory

    def self_contained_config(self, encoders: nn.ModuleDict | None = None) -> ModelConfig:
        """The config with the LLM's (and, when loaded, the encoders') hub ids replaced by their
        full architecture configs. ``encoders``: built encoders to describe when this model was
        built without them (training from features)."""
        cfg = self.config.model_copy(deep=True)
        cfg.llm = cfg.llm.model_copy(update={"pretrained": None, "config": _architecture(self.llm.config)})
        encoders = self.encoders if encoders is None else encoders
        if encoders is not None:
            cfg.encoders = [e.model_copy(update={"pretrained": None,
                                                 "config": _architecture(encoders[e.kind].model.config)})
                            for e in cfg.encoders]
        return cfg

    @classmethod
    def from_pretrained(cls, directory: str | Path, with_encoders: bool = True) -> "MochaModel":
        """Load a saved model: ``save_pretrained``'s layout or a transformers-native export
        (``config.json`` with a ``mocha`` entry, weights in one file or sharded with an index)."""
        directory = Path(directory)
        config = read_saved_config(directory)
        state = read_saved_weights(directory)
        key = _embedding_key(state)
        vocab = state["llm." + key].shape[0] if key else None
        model = cls(config, vocab_size=vocab, with_encoders=with_encoders)
        saved_encoders = any(k.startswith("encoders.") for k in state)
        if not with_encoders:
            state = {k: v for k, v in state.items() if not k.startswith("encoders.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if saved_encoders or not k.startswith("encoders.")]
        if missing or unexpected:
            raise KeyError(f"the weights in {directory} do not match its config: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
        return model


def read_saved_config(directory: str | Path) -> ModelConfig:
    """The MoCHA config of a saved model: ``mocha_config.json``, else the ``mocha`` entry of a
    transformers-native export's ``config.json``."""
    directory = Path(directory)
    if (directory / EXPORT_CONFIG_NAME).is_file():
        return ModelConfig.model_validate_json((directory / EXPORT_CONFIG_NAME).read_text())
    hf_config = directory / EXPORT_HF_CONFIG_NAME
    if hf_config.is_file():
        data = json.loads(hf_config.read_text())
        if data.get("model_type") == "mocha" and isinstance(data.get("mocha"), dict):
            return ModelConfig.model_validate(data["mocha"])
    raise FileNotFoundError(f"{directory} holds neither {EXPORT_CONFIG_NAME} nor a {EXPORT_HF_CONFIG_NAME} of "
                            f"model_type 'mocha': "
                            f"not a saved MoCHA model")


def read_saved_weights(directory: str | Path) -> dict[str, Tensor]:
    """Every weight of a saved model: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` lists (each checked to exist and to hold its listed names)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / EXPORT_WEIGHTS_NAME).is_file():
        return load_file(str(directory / EXPORT_WEIGHTS_NAME))
    index_path = directory / EXPORT_WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{directory} holds neither {EXPORT_WEIGHTS_NAME} nor {EXPORT_WEIGHTS_INDEX_NAME}")
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (directory / shard).is_file():
            raise FileNotFoundError(f"{index_path} lists {shard}, which is missing")
        state.update(load_file(str(directory / shard)))
    if set(state) != set(weight_map):
        differ = sorted(set(state) ^ set(weight_map))
        raise KeyError(f"{index_path} does not match its shards' tensors: {differ[:8]}")
    return state


def _architecture(config) -> dict:
    """A transformers config as plain architecture kwargs (no bookkeeping keys)."""
    skip = {"transformers_version", "architectures", "dtype", "torch_dtype", "model_type"}
    return {k: v for k, v in config.to_dict().items() if k not in skip and not k.startswith("_")}


def supervised_positions(labels: Tensor) -> int:
    """How many positions :func:`causal_lm_loss` averages over for a batch's *input* labels
    (before the image placeholder is spliced): every label but the first of a row that is not
    ``IGNORE_INDEX``. Splicing only inserts ignored visual positions and never truncates, so the
    count is the same after it. Lets a training loop weight micro-batches by token count."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy averaged over supervised positions (0 when there are none)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)


def _embedding_key(state: dict[str, Tensor]) -> str | None:
    for key in state:
        if key.startswith("llm.") and key.endswith("embed_tokens.weight"):
            return key[len("llm."):]
    return None
