"""``MochaForConditionalGeneration``: a MoCHA model behind transformers' ``PreTrainedModel`` +
``GenerationMixin`` interface, for loading an export with ``trust_remote_code=True``.

It travels with every export as ``modeling_mocha.py`` (``mocha.export.remote_code`` bundles it
together with the mocha modules it uses), and is registered in ``config.json``'s ``auto_map``
under ``AutoModelForImageTextToText``, with ``AutoModelForCausalLM`` as an alias.

Why ImageTextToText: transformers 5 files every model that reads images and text and writes text
(LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics, PaliGemma, ...) under ``AutoModelForImageTextToText``
(``AutoModelForVision2Seq`` is its deprecated name), whose pipeline tag is ``image-text-to-text``;
``AutoModelForCausalLM`` maps text-only decoders, and LLaVA is not in it. Evaluation harnesses
(lmms-eval, VLMEvalKit) and inference servers pick the class by that convention. A remote-code
``auto_map`` may list a class under several auto classes, so the CausalLM entry costs nothing and
serves text-only harnesses that only know ``AutoModelForCausalLM``.

The inputs follow transformers' LLaVA convention: the processor expands each ``<image>`` into
``num_image_tokens`` copies of ``image_token_id``, and the model scatters the visual tokens (the
encoders -> MoE connectors -> HGA path of :class:`mocha.model.mocha.MochaModel`) into those
positions. That gives exactly the embedding sequence MochaModel's splice builds from one
placeholder, so ``generate`` returns the tokens ``mocha generate`` returns (prompt first, as every
transformers decoder does). Pixel values come as one tensor per encoder, ``pixel_values_<kind>``,
because each encoder has its own resolution and normalisation.

Weights carry MochaModel's own names (``encoders.*``, ``connectors.*``, ``hga.*``, ``llm.*``): the
wrapper registers MochaModel's four parts as its own children, so one folder loads both here and
with ``MochaModel.from_pretrained``.

Loading: transformers builds remote-code models inside a ``meta``-device context; the MoCHA
parts compute non-persistent buffers (HGA group layout, CLIP/SigLIP position ids, rotary
frequencies) in their constructors, and the loader leaves buffers that are not in the checkpoint
uninitialised. The parts are therefore built on the CPU, where those buffers come out exact and
are kept aside; the checkpoint is loaded, then the kept buffers are put back. A folder with
missing, unexpected or mis-shaped weights is an error, not a warning.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mocha.config import ModelConfig
from mocha.export.hf_configuration import PIXEL_VALUES_PREFIX, MochaConfig
from mocha.model.mocha import MochaModel, causal_lm_loss


class MochaForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = MochaConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: list[str] = []

    def __init__(self, config: MochaConfig):
        super().__init__(config)
        if not config.mocha:
            raise ValueError("MochaConfig.mocha is empty: not the config of a MoCHA export")
        device = torch.get_default_device()
        device = torch.device("cpu") if device.type == "meta" else device
        with device:
            core = MochaModel(ModelConfig.model_validate(config.mocha), device=device)
        # MochaModel's parts become this model's children (same weight names as MochaModel); the
        # MochaModel itself is kept as a plain attribute for its methods, not as a second owner.
        self.encoders = core.encoders
        self.connectors = core.connectors
        self.hga = core.hga
        self.llm = core.llm
        object.__setattr__(self, "core", core)
        # transformers' loader leaves non-persistent buffers (not in the checkpoint) uninitialised;
        # they are exact here, computed by the constructors on a real device: keep them to restore.
        object.__setattr__(self, "_constructed_buffers", {
            name: buffer.detach().clone() for name, buffer in _non_persistent_buffers(self)})
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: every weight of the model must be in the
        folder and nothing else (transformers only warns)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {k: sorted(map(str, v))[:8] for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"the weights do not match the MoCHA config: {problems}")
        model.restore_constructed_buffers()
        return (model, info) if want_info else model

    def restore_constructed_buffers(self) -> None:
        """Put back the non-persistent buffers as the constructors computed them (on the
        buffers' current device, in their current dtype)."""
        with torch.no_grad():
            for name, buffer in _non_persistent_buffers(self):
                buffer.copy_(self._constructed_buffers[name].to(device=buffer.device, dtype=buffer.dtype))

    def _init_weights(self, module) -> None:
        """Every weight comes from the checkpoint (``from_pretrained`` rejects missing ones)."""

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    # ------------------------------------------------------------------ inputs
    def image_embeddings(self, pixel_values: dict[str, Tensor]) -> Tensor:
        """``{kind: [B_img, 3, S, S]}`` -> visual tokens ``[B_img, N_vis, H]``."""
        missing = [k for k in self.core.encoder_kinds if k not in pixel_values]
        if missing:
            raise ValueError(f"pixel values missing for encoders {missing}: pass "
                             f"{[PIXEL_VALUES_PREFIX + k for k in missing]} (the processor's output)")
        return self.core.project(self.core.encode_images(pixel_values)).tokens

    def embed_inputs(self, input_ids: Tensor, pixel_values: dict[str, Tensor], first_step: bool) -> Tensor:
        """Token embeddings with the visual tokens at the ``image_token_id`` positions."""
        image_mask = input_ids == self.config.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0) if pixel_values else input_ids)
        if not pixel_values:
            if first_step and bool(image_mask.any()):
                raise ValueError("input_ids hold image tokens but no pixel values were given")
            return embeds
        visual = self.image_embeddings(pixel_values)
        slots, given = int(image_mask.sum()), visual.shape[0] * visual.shape[1]
        if slots != given:
            raise ValueError(f"input_ids hold {slots} image tokens but {visual.shape[0]} image(s) give {given} visual "
                             f"tokens ({visual.shape[1]} each): use the processor, one image per <image>")
        return embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), visual.to(embeds.dtype))

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values=None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                pixel_values_clip: Tensor | None = None, pixel_values_siglip: Tensor | None = None,
                pixel_values_dinov2: Tensor | None = None, pixel_values_convnext: Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """``labels`` (same length as ``input_ids``, -100 where nothing is learned) give the mean
        next-token cross-entropy, as in mocha's training."""
        pixels = {kind: value for kind, value in (("clip", pixel_values_clip), ("siglip", pixel_values_siglip),
                                                  ("dinov2", pixel_values_dinov2), ("convnext", pixel_values_convnext))
                  if value is not None}
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            first_step = past_key_values is None or past_key_values.get_seq_length() == 0
            inputs_embeds = self.embed_inputs(input_ids, pixels, first_step)
        elif pixels:
            raise ValueError("pixel values go with input_ids (image token positions), not with inputs_embeds")
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        loss = causal_lm_loss(out.logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool | None = False, **kwargs):
        """Pixel values go into the first forward only (the prompt); later steps reuse the cache."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration,
                                                       **kwargs)
        if not is_first_iteration and inputs.get("past_key_values") is not None:
            for key in [k for k in inputs if k.startswith(PIXEL_VALUES_PREFIX)]:
                inputs.pop(key)
        return inputs


def _non_persistent_buffers(module: torch.nn.Module):
    """(qualified name, buffer) of every buffer that is not saved in the state dict."""
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            buffer = sub._buffers.get(name)
            if buffer is not None:
                yield (f"{prefix}.{name}" if prefix else name), buffer
