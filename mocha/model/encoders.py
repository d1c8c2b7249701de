"""Frozen vision encoders: one registry entry per kind (clip, siglip, dinov2, convnext).

Every encoder is a Hugging Face ``transformers`` vision model wrapped in :class:`VisionEncoder`,
which owns three things: the frozen model, the image preprocessing that model expects, and the
rule that turns the model's hidden states into a ``[B, num_tokens, hidden_size]`` token sequence.
The per-kind differences live in :data:`ENCODERS` as data (:class:`EncoderSpec`), so there is one
code path for all four encoders instead of one ``encode_images_with_x`` per encoder.

Token selection (what the official MoCHA towers do, and where we deliberately differ):

* **CLIP** (``CLIPVisionModel``): ``hidden_states[-2]`` (penultimate layer), CLS dropped.
  Same as LLaVA-1.5 / MoCHA (``mm_vision_select_layer=-2``, ``select_feature='patch'``).
* **SigLIP** (``SiglipVisionModel``): ``hidden_states[-2]``, every patch token kept (SigLIP has no
  CLS token). This equals LLaVA-OneVision / imp, which delete the last layer and take the last
  hidden state. The official MoCHA tower additionally deletes the last layer *and* indexes ``-2``
  (so it really takes layer -3) and slices ``[:, 1:]``, which throws away one real patch token;
  we do not reproduce that bug. ``EncoderConfig.select_layer=-3`` gives the official layer.
* **DINOv2** (``Dinov2Model``): ``hidden_states[-1]`` — the last block's output *before* the final
  LayerNorm, CLS (and register tokens, if the checkpoint has any) dropped. The official tower
  takes ``forward_features(x)["x_prenorm"][:, 1:]`` of the torch-hub ViT-L/14, which is the same
  tensor; ``last_hidden_state`` would be the normalised one.
* **ConvNeXt** (``ConvNextModel``): the last stage's feature map ``[B, C, h, w]`` flattened
  row-major to ``[B, h*w, C]`` (``hidden_states[-1]``, no pooling, no final LayerNorm — the
  official tower returns the raw stage output). The official model then average-pools the
  *channel* dimension with ``AvgPool1d(3, 3)`` (3072 -> 1024) before its connector, so that all
  four connectors see 1024 inputs; we apply that pooling here (``channel_pool``, default 3 for
  ConvNeXt, 1 elsewhere) so connector weights trained by the official code fit.

ConvNeXt uses transformers' ``ConvNextModel`` rather than timm: PyPI's torchvision (a timm
dependency) cannot be imported beside the CPU torch wheel this project pins. The paper's weights,
``timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k``, are a timm checkpoint; :func:`build_encoder`
loads such a checkpoint into ``ConvNextModel`` by renaming its keys
(:func:`timm_convnext_state_dict`), and sets the block LayerNorm epsilon (timm's XXL uses 1e-5,
transformers hard-codes 1e-6) from ``config.block_norm_eps``. Checkpoints already in transformers
format (e.g. ``facebook/convnext-xlarge-384-22k-1k``, the closest one, XL not XXL) load directly.

Preprocessing follows each encoder's own checkpoint: the matching transformers image processor
(PIL backend, the reference implementation) is loaded from ``cfg.pretrained`` when that has a
``preprocessor_config.json`` and otherwise built from the registry's parameters, which are those
of the default checkpoint. The official MoCHA code instead feeds one CLIP-preprocessed 336 px
tensor to all four towers; here every encoder sees its own normalisation, at the official
resolutions and token counts by default: SigLIP-large-patch16-384 at 384 px (24 x 24 = 576
tokens of 1024, its ``SigLipVisionConfig`` defaults in the official code), ConvNeXt-XXL at 336 px
(stride 32: 10 x 10 = 100 tokens, 3072 channels pooled to 1024), CLIP-L/14-336 at 336 px (576 x
1024) and DINOv2-L/14 at 336 px (576 x 1024): 1828 visual tokens per image. Other checkpoints and
resolutions are options (``EncoderConfig.pretrained`` / ``image_size``), e.g. SigLIP so400m-patch14-384
(729 tokens of 1152) or ConvNeXt at 384 px (144 tokens); the official code's SigLIP, fed the 336 px
tensor, gives 21 x 21 = 441 tokens (``image_size: 336``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import (
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_processing_utils import BaseImageProcessor

from mocha.config import MOCHA_ENCODER_ORDER, EncoderConfig

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
#: LLaVA-1.5's padding colour: the (CLIP) image processor's mean, as 0-255 integers.
PAD_COLOUR = tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)


def expand_to_square(image: Image.Image, colour: tuple[int, int, int] = PAD_COLOUR) -> Image.Image:
    """LLaVA-1.5's ``image_aspect_ratio: pad``: the image centred on a square canvas of its longer
    side filled with ``colour``, so that no encoder's resize or crop distorts or cuts it."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour if image.mode == "RGB" else colour[0])
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# --------------------------------------------------------------------------- feature geometry


def vit_feature_geometry(config: PretrainedConfig, image_size: int, index: int) -> tuple[int, int]:
    """(patches per side, width) of any ViT hidden state: one stride-``patch_size`` patchify."""
    return image_size // config.patch_size, config.hidden_size


def convnext_feature_geometry(config: PretrainedConfig, image_size: int, index: int) -> tuple[int, int]:
    """(side, channels) of ConvNeXt ``hidden_states[index]`` (0 = stem output, s = stage s): a
    stride-``patch_size`` stem, then a stride-2 downsampling (kernel 2, no padding, so floor) at the
    start of every stage but the first."""
    side = image_size // config.patch_size
    for _ in range(max(index - 1, 0)):
        side //= 2
    return side, config.hidden_sizes[max(index - 1, 0)]


# --------------------------------------------------------------------------- image processors


def square_resize(image_size: int) -> dict[str, Any]:
    """Resize straight to ``image_size x image_size`` (SigLIP's processor)."""
    return {"size": {"height": image_size, "width": image_size}}


def shortest_edge_then_crop(image_size: int) -> dict[str, Any]:
    """Resize the shortest edge to ``image_size`` and centre-crop a square (CLIP's processor)."""
    return {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}


def dinov2_resize_then_crop(image_size: int) -> dict[str, Any]:
    """DINOv2's processor: shortest edge to ``image_size * 256/224`` (256 for 224), centre crop."""
    return {
        "size": {"shortest_edge": round(image_size * 256 / 224)},
        "crop_size": {"height": image_size, "width": image_size},
    }


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that differs between encoder kinds, as data.

    ``default_config`` is the real architecture of ``default_pretrained`` (written out so that it
    can be instantiated without a download, e.g. on the ``meta`` device for sizing).
    ``select_layer`` indexes the model's ``hidden_states`` tuple (embeddings output first).
    ``layout`` says how to read that hidden state: ``"sequence"`` ``[B, prefix + N, C]`` where the
    first ``prefix_tokens(config)`` tokens (CLS, registers) are dropped, or ``"grid"``
    ``[B, C, h, w]`` flattened row-major. ``feature_geometry(config, image_size, index)`` gives the
    (side, width) of ``hidden_states[index]``, so token counts follow from the config alone.
    ``fixed_positions``: the model's position embeddings are sized for ``config.image_size``
    (CLIP, SigLIP) and must be interpolated for other sizes.
    """

    kind: str
    model_cls: type[PreTrainedModel]
    config_cls: type[PretrainedConfig]
    default_pretrained: str
    default_config: Mapping[str, Any]
    default_image_size: int
    select_layer: int
    layout: Literal["sequence", "grid"]
    feature_geometry: Callable[[PretrainedConfig, int, int], tuple[int, int]]
    prefix_tokens: Callable[[PretrainedConfig], int]
    processor_cls: type[BaseImageProcessor]
    processor_defaults: Mapping[str, Any]
    processor_size: Callable[[int], dict[str, Any]]
    channel_pool: int = 1
    fixed_positions: bool = False


def _no_prefix(config: PretrainedConfig) -> int:
    return 0


def _cls_only(config: PretrainedConfig) -> int:
    return 1


def _cls_and_registers(config: PretrainedConfig) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


_COMMON_PROCESSOR = {"do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255,
                     "do_normalize": True, "do_convert_rgb": True}

ENCODERS: dict[str, EncoderSpec] = {
    "clip": EncoderSpec(
        kind="clip",
        model_cls=CLIPVisionModel,
        config_cls=CLIPVisionConfig,
        default_pretrained="openai/clip-vit-large-patch14-336",
        default_config={
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": 768,
        },
        default_image_size=336,
        select_layer=-2,
        layout="sequence",
        feature_geometry=vit_feature_geometry,
        prefix_tokens=_cls_only,
        processor_cls=CLIPImageProcessorPil,
        processor_defaults={**_COMMON_PROCESSOR, "do_center_crop": True, "image_mean": OPENAI_CLIP_MEAN,
                            "image_std": OPENAI_CLIP_STD},
        processor_size=shortest_edge_then_crop,
        fixed_positions=True,
    ),
    "siglip": EncoderSpec(
        kind="siglip",
        model_cls=SiglipVisionModel,
        config_cls=SiglipVisionConfig,
        # The official MoCHA SigLIP tower: the SigLipVisionConfig defaults of its siglip_encoder.py.
        default_pretrained="google/siglip-large-patch16-384",
        default_config={
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 384, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
        default_image_size=384,
        select_layer=-2,
        layout="sequence",
        feature_geometry=vit_feature_geometry,
        prefix_tokens=_no_prefix,
        processor_cls=SiglipImageProcessorPil,
        processor_defaults={**_COMMON_PROCESSOR, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
        processor_size=square_resize,
        fixed_positions=True,
    ),
    "dinov2": EncoderSpec(
        kind="dinov2",
        model_cls=Dinov2Model,
        config_cls=Dinov2Config,
        default_pretrained="facebook/dinov2-large",
        default_config={
            "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
            "image_size": 518, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "layerscale_value": 1.0, "use_swiglu_ffn": False,
        },
        default_image_size=336,  # official: the CLIP-preprocessed 336 px tensor, 24 x 24 = 576 tokens
        select_layer=-1,
        layout="sequence",
        feature_geometry=vit_feature_geometry,
        prefix_tokens=_cls_and_registers,
        processor_cls=BitImageProcessorPil,
        processor_defaults={**_COMMON_PROCESSOR, "do_center_crop": True, "image_mean": IMAGENET_MEAN,
                            "image_std": IMAGENET_STD},
        processor_size=dinov2_resize_then_crop,
    ),
    "convnext": EncoderSpec(
        kind="convnext",
        model_cls=ConvNextModel,
        config_cls=ConvNextConfig,
        # The paper's tower (timm format, loaded by key renaming; see the module docstring).
        default_pretrained="timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k",
        default_config={
            "hidden_sizes": [384, 768, 1536, 3072], "depths": [3, 4, 30, 3], "patch_size": 4, "num_stages": 4,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "block_norm_eps": 1e-5, "image_size": 384,
        },
        default_image_size=336,  # official: 336 px, stride 32 -> 10 x 10 = 100 tokens
        select_layer=-1,
        layout="grid",
        feature_geometry=convnext_feature_geometry,
        prefix_tokens=_no_prefix,
        # CLIP-LAION weights: OpenAI CLIP mean/std, shortest-edge resize + centre crop (crop_pct 1.0);
        # the official tower builds a CLIPImageProcessor with exactly these values.
        processor_cls=CLIPImageProcessorPil,
        processor_defaults={**_COMMON_PROCESSOR, "do_center_crop": True, "image_mean": OPENAI_CLIP_MEAN,
                            "image_std": OPENAI_CLIP_STD},
        processor_size=shortest_edge_then_crop,
        channel_pool=3,
    ),
}


def encoder_spec(kind: str) -> EncoderSpec:
    try:
        return ENCODERS[kind]
    except KeyError:
        raise ValueError(f"unknown encoder kind {kind!r}; known: {sorted(ENCODERS)}") from None


# --------------------------------------------------------------------------- the module


class VisionEncoder(nn.Module):
    """A frozen vision model that maps preprocessed images to a token sequence.

    Parameters never require grad and the module stays in eval mode even when a parent calls
    ``.train()``, so dropout/drop-path never fire. ``forward`` runs under ``torch.no_grad`` and
    returns features in the model's dtype.
    """

    def __init__(self, spec: EncoderSpec, model: PreTrainedModel, processor: BaseImageProcessor, *,
                 image_size: int, select_layer: int, channel_pool: int):
        super().__init__()
        self.spec = spec
        self.kind = spec.kind
        self.model = model
        self.processor = processor
        self.image_size = image_size
        self.select_layer = select_layer
        self.channel_pool = channel_pool

        config = model.config
        geometry = token_geometry(spec, config, image_size, select_layer, channel_pool)
        self.num_tokens = geometry.num_tokens
        self.hidden_size = geometry.hidden_size
        self._interpolate_positions = spec.fixed_positions and image_size != config.image_size

        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "VisionEncoder":
        """Frozen: always eval, whatever the caller asks."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, image: Image.Image) -> Tensor:
        """One PIL image -> ``[3, image_size, image_size]`` float32, normalised for this encoder."""
        return preprocess_image(self.processor, image)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, S, S]`` -> ``[B, num_tokens, hidden_size]`` in the model's dtype."""
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"{self.kind}: expected pixel_values [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {list(pixel_values.shape)}")
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate_positions else {}
        outputs = self.model(pixel_values=pixel_values.to(device=self.device, dtype=self.dtype),
                             output_hidden_states=True, **kwargs)
        hidden = outputs.hidden_states[self.select_layer]
        if self.spec.layout == "grid":
            tokens = hidden.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C], row-major
        else:
            tokens = hidden[:, self.spec.prefix_tokens(self.model.config):]
        if self.channel_pool > 1:
            tokens = F.avg_pool1d(tokens, kernel_size=self.channel_pool, stride=self.channel_pool)
        return tokens

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, image_size={self.image_size}, num_tokens={self.num_tokens}, "
                f"hidden_size={self.hidden_size}, select_layer={self.select_layer}")


def _num_hidden_states(spec: EncoderSpec, config: PretrainedConfig) -> int:
    """Length of ``outputs.hidden_states``: the embedding output plus one per layer/stage."""
    return 1 + (config.num_stages if spec.layout == "grid" else config.num_hidden_layers)


# --------------------------------------------------------------------------- geometry without weights


@dataclass(frozen=True)
class EncoderGeometry:
    """What the rest of the model needs to know of a frozen encoder: its output token count and
    width per image at its input resolution."""

    kind: str
    image_size: int
    num_tokens: int
    hidden_size: int


def token_geometry(spec: EncoderSpec, config: PretrainedConfig, image_size: int, select_layer: int,
                   channel_pool: int) -> EncoderGeometry:
    """Token count and width of ``hidden_states[select_layer]`` after channel pooling, from the
    architecture config alone (validated: layer in range, non-empty map, pool divides width)."""
    num_hidden_states = _num_hidden_states(spec, config)
    if not -num_hidden_states <= select_layer < num_hidden_states:
        raise ValueError(f"{spec.kind}: select_layer={select_layer} out of range for a model with "
                         f"{num_hidden_states} hidden states")
    side, width = spec.feature_geometry(config, image_size, select_layer % num_hidden_states)
    if side < 1:
        raise ValueError(f"{spec.kind}: image_size={image_size} gives an empty feature map")
    if channel_pool < 1 or width % channel_pool:
        raise ValueError(f"{spec.kind}: channel_pool={channel_pool} must be >= 1 and divide the feature "
                         f"width {width}")
    return EncoderGeometry(spec.kind, image_size, side * side, width // channel_pool)


def encoder_architecture(cfg: EncoderConfig) -> PretrainedConfig:
    """The encoder's architecture config, without reading or allocating any weight: the
    checkpoint's ``config.json`` (a timm ConvNeXt one translated), or the registry's default
    architecture updated with ``cfg.config`` for random-weight encoders. What
    :func:`build_encoder` would build, minus the weights."""
    spec = encoder_spec(cfg.kind)
    if cfg.pretrained is None:
        config_kwargs = {**spec.default_config, **cfg.config}
        if cfg.image_size is not None:
            config_kwargs["image_size"] = cfg.image_size
        return spec.config_cls(**config_kwargs)
    if spec.kind == "convnext":
        timm_config = _read_timm_config(cfg.pretrained)
        if timm_config is not None:
            return timm_convnext_config(cfg.pretrained, timm_config, cfg.config)
    return spec.config_cls.from_pretrained(cfg.pretrained, **cfg.config)


def encoder_geometry(cfg: EncoderConfig) -> EncoderGeometry:
    """Token count and width of one encoder from its config alone (no weights read, no module
    built): how trainers that train from feature shards size the connectors and the HGA."""
    spec = encoder_spec(cfg.kind)
    config = encoder_architecture(cfg)
    return token_geometry(spec, config, _image_size(spec, cfg, config),
                          spec.select_layer if cfg.select_layer is None else cfg.select_layer,
                          spec.channel_pool if cfg.channel_pool is None else cfg.channel_pool)


# --------------------------------------------------------------------------- building


def build_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> VisionEncoder:
    """Build one frozen encoder from its config.

    With ``cfg.pretrained`` (hub id or local directory) the weights are loaded with
    ``from_pretrained`` (``cfg.config`` entries override the checkpoint's config); otherwise the
    model gets random weights from the registry's real default architecture updated with
    ``cfg.config``. ``device="meta"`` builds the structure only (sizing, no memory).
    """
    spec = encoder_spec(cfg.kind)
    device = torch.device(device)
    if cfg.pretrained is not None:
        model = _load_pretrained(spec, cfg.pretrained, cfg.config, dtype)
        model.to(device)
    else:
        config = encoder_architecture(cfg)
        # Frozen random weights must be the same in every process that builds them (feature
        # pipeline, trainers, export): seed the init, leaving the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]), device:
            torch.manual_seed(cfg.init_seed)
            model = spec.model_cls(config)
        _apply_block_norm_eps(model)
        if dtype is not None:
            model.to(dtype)

    image_size = _image_size(spec, cfg, model.config)
    processor = _build_processor(spec, cfg.pretrained, image_size)
    return VisionEncoder(
        spec, model, processor,
        image_size=image_size,
        select_layer=spec.select_layer if cfg.select_layer is None else cfg.select_layer,
        channel_pool=spec.channel_pool if cfg.channel_pool is None else cfg.channel_pool,
    )


def _image_size(spec: EncoderSpec, cfg: EncoderConfig, config: PretrainedConfig) -> int:
    """Input resolution: the config's, else the model's (fixed position embeddings), else the kind's."""
    return cfg.image_size or (config.image_size if spec.fixed_positions else spec.default_image_size)


def build_image_processor(cfg: EncoderConfig) -> BaseImageProcessor:
    """The image preprocessing :func:`build_encoder` gives the encoder of ``cfg``, without building
    the model (for a processor that only prepares inputs). Exact for random-init configs and for
    the self-contained configs of saved models (``pretrained`` None, full architecture in ``config``)."""
    spec = encoder_spec(cfg.kind)
    config_kwargs = {**spec.default_config, **cfg.config}
    if cfg.image_size is not None:
        config_kwargs["image_size"] = cfg.image_size
    return _build_processor(spec, cfg.pretrained, _image_size(spec, cfg, spec.config_cls(**config_kwargs)))


def preprocess_image(processor: BaseImageProcessor, image: Image.Image) -> Tensor:
    """One PIL image -> ``[3, S, S]`` float32 through an encoder's image processor."""
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    return pixel_values[0].to(torch.float32)


def real_encoder_configs(pretrained: bool = False) -> list[EncoderConfig]:
    """The paper's four encoders in MoCHA's order: the default checkpoints when ``pretrained``,
    else random weights of the same architectures (for sizing on the ``meta`` device)."""
    return [EncoderConfig(kind=kind, pretrained=ENCODERS[kind].default_pretrained if pretrained else None)
            for kind in MOCHA_ENCODER_ORDER]


def build_encoders(cfgs: list[EncoderConfig], device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.ModuleDict:
    """All encoders of a model, keyed by kind, in config order (the HGA group order)."""
    kinds = [c.kind for c in cfgs]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"encoder kinds must be distinct, got {kinds}")
    return nn.ModuleDict({c.kind: build_encoder(c, device=device, dtype=dtype) for c in cfgs})


def _build_processor(spec: EncoderSpec, pretrained: str | None, image_size: int) -> BaseImageProcessor:
    """The checkpoint's own processor when it ships one, else the registry's parameters; either
    way resized for ``image_size``."""
    size_kwargs = spec.processor_size(image_size)
    if pretrained is not None:
        try:
            return spec.processor_cls.from_pretrained(pretrained, **size_kwargs)
        except OSError:
            logger.info("%s: no image processor config in %s; using the registry's %s parameters",
                        spec.kind, pretrained, spec.processor_cls.__name__)
    return spec.processor_cls(**spec.processor_defaults, **size_kwargs)


def _load_pretrained(spec: EncoderSpec, pretrained: str, overrides: Mapping[str, Any],
                     dtype: torch.dtype | None) -> PreTrainedModel:
    if spec.kind == "convnext":
        timm_config = _read_timm_config(pretrained)
        if timm_config is not None:
            return load_timm_convnext(pretrained, timm_config, overrides, dtype)
    model = spec.model_cls.from_pretrained(pretrained, dtype=dtype, **overrides)
    _apply_block_norm_eps(model)
    return model


def _apply_block_norm_eps(model: PreTrainedModel) -> None:
    """ConvNeXt only: transformers hard-codes eps=1e-6 in the stem, downsampling and block
    LayerNorms; timm's XXL used 1e-5. ``config.block_norm_eps`` (saved with the config) restores it."""
    eps = getattr(model.config, "block_norm_eps", None)
    if not isinstance(model, ConvNextModel) or eps is None:
        return
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module is not model.layernorm:
            module.eps = eps


# --------------------------------------------------------------------------- timm ConvNeXt checkpoints

#: timm architecture name -> ConvNextConfig fields (timm's ``norm_eps`` becomes ``block_norm_eps``).
TIMM_CONVNEXT_ARCHS: dict[str, dict[str, Any]] = {
    "convnext_large": {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536], "norm_eps": 1e-6},
    "convnext_xlarge": {"depths": [3, 3, 27, 3], "hidden_sizes": [256, 512, 1024, 2048], "norm_eps": 1e-6},
    "convnext_xxlarge": {"depths": [3, 4, 30, 3], "hidden_sizes": [384, 768, 1536, 3072], "norm_eps": 1e-5},
}

_TIMM_TO_HF_CONVNEXT = [
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"encoder.stages.\1.layers.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"encoder.stages.\1.layers.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^head\.norm\.", "layernorm."),
]


def timm_convnext_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm ConvNeXt state dict to ``ConvNextModel``'s keys; the classifier
    (``head.fc``) is dropped, any other unknown key is an error (never silently ignored)."""
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("head.fc."):
            continue
        for pattern, replacement in _TIMM_TO_HF_CONVNEXT:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                converted[new_key] = value
                break
        else:
            raise ValueError(f"unexpected key in timm ConvNeXt checkpoint: {key!r}")
    return converted


def _read_timm_config(pretrained: str) -> dict[str, Any] | None:
    """The checkpoint's ``config.json`` if it is a timm one (has ``architecture``), else None."""
    from transformers.utils import cached_file

    path = cached_file(pretrained, "config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    with open(path) as f:
        config = json.load(f)
    return config if "architecture" in config and "model_type" not in config else None


def timm_convnext_config(pretrained: str, timm_config: Mapping[str, Any],
                         overrides: Mapping[str, Any]) -> ConvNextConfig:
    """The ``ConvNextConfig`` of a timm ConvNeXt checkpoint, from its timm ``config.json``."""
    arch = timm_config["architecture"]
    if arch not in TIMM_CONVNEXT_ARCHS:
        raise ValueError(f"{pretrained}: timm architecture {arch!r} not supported; known: "
                         f"{sorted(TIMM_CONVNEXT_ARCHS)}")
    fields = dict(TIMM_CONVNEXT_ARCHS[arch])
    norm_eps = fields.pop("norm_eps")
    return ConvNextConfig(**{**ENCODERS["convnext"].default_config, **fields, "layer_norm_eps": norm_eps,
                             "block_norm_eps": norm_eps, **overrides})


def load_timm_convnext(pretrained: str, timm_config: Mapping[str, Any], overrides: Mapping[str, Any],
                       dtype: torch.dtype | None) -> ConvNextModel:
    """Load a timm ConvNeXt checkpoint (``model.safetensors`` + timm ``config.json``)."""
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    config = timm_convnext_config(pretrained, timm_config, overrides)
    with torch.device("meta"):
        model = ConvNextModel(config)
    weights = load_file(cached_file(pretrained, "model.safetensors"))
    model.load_state_dict(timm_convnext_state_dict(weights), strict=True, assign=True)
    _apply_block_norm_eps(model)
    return model.to(dtype) if dtype is not None else model
