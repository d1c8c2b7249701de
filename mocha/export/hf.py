"""Write a MoCHA model as a transformers-native folder that loads without mocha.

    DIR/config.json                      MochaConfig: model_type "mocha", the whole MoCHA config,
                                         auto_map -> the bundled classes, dtype
    DIR/model.safetensors                every weight (MochaModel's names), or, past
      | model-0000i-of-0000n.safetensors   --max-shard-size, shards + model.safetensors.index.json
    DIR/generation_config.json           greedy, the tokenizer's BOS/EOS/PAD
    DIR/tokenizer.json, tokenizer_config.json, ...   + "<image>" as an added special token
    DIR/processor_config.json            MochaProcessor: encoders, template, image token, tokens/image
    DIR/chat_template.jinja              the training template (``mocha.export.chat_template``)
    DIR/configuration_mocha.py, modeling_mocha.py, processing_mocha.py, mocha_*.py
                                         the remote code (``mocha.export.remote_code``)
    DIR/README.md                        the model card (``mocha.export.card``)

``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` and ``AutoProcessor`` load it with
``trust_remote_code=True`` (see ``mocha.export.hf_modeling`` for why ImageTextToText), and
``MochaModel.from_pretrained`` / ``mocha generate`` / ``mocha eval`` load it too. Everything is
written by :func:`write_hf_folder` into a directory the caller provides (``mocha.export.pretrained``
stages it next to the destination and renames it into place). File names: ``mocha.io.layout``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mocha.config import ConfigError
from mocha.io.layout import (EXPORT_CARD_NAME, EXPORT_CHAT_TEMPLATE_NAME, EXPORT_PROCESSOR_CONFIG_NAME,
                             EXPORT_WEIGHTS_INDEX_NAME, EXPORT_WEIGHTS_PATTERN)

#: ``--dtype`` choices -> torch dtypes ("auto": keep each tensor's own dtype).
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                                         "fp32": torch.float32}
DEFAULT_MAX_SHARD_SIZE = "5GB"
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForCausalLM")
MODEL_CLASS = "MochaForConditionalGeneration"
PROCESSOR_CLASS = "MochaProcessor"


@dataclass
class HFExportOptions:
    """``dtype``: a :data:`DTYPES` key; ``max_shard_size``: bytes or a size such as ``"2GB"``;
    ``manifests`` / ``scores``: (where read, JSON) for the model card."""

    dtype: str = "auto"
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    source: str = ""
    manifests: list[tuple[str, dict]] = field(default_factory=list)
    scores: list[tuple[str, dict]] = field(default_factory=list)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        self.max_shard_bytes  # raises ConfigError for a bad size

    @property
    def max_shard_bytes(self) -> int:
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            size = self.max_shard_size if isinstance(self.max_shard_size, int) else parse_size_to_int(
                self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"--max-shard-size {self.max_shard_size!r}: {e}") from None
        if size <= 0:
            raise ConfigError(f"--max-shard-size must be positive, got {self.max_shard_size!r}")
        return size


def write_hf_folder(directory: str | Path, model, tokenizer, options: HFExportOptions = HFExportOptions(),
                    state_dict: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Write ``model`` (a :class:`~mocha.model.mocha.MochaModel`) and ``tokenizer`` into the
    existing ``directory`` (see the module docstring); returns the names written.

    ``state_dict`` replaces the model's own weights (a consolidated state gathered from
    expert-parallel ranks, in MochaModel's names). A model built without its encoders (trained
    from feature shards) gets them built from its config, the frozen weights every process
    builds. The caller's model and tokenizer are not changed (the image token is added to a copy).
    """
    from mocha.export.remote_code import write_bundle

    directory = Path(directory)
    state = dict(model.state_dict() if state_dict is None else state_dict)
    encoders = model.encoders
    if encoders is None:
        from mocha.model.encoders import build_encoders

        encoders = build_encoders(model.config.encoders)
        state.update({f"encoders.{name}": value for name, value in encoders.state_dict().items()})
    config = model.self_contained_config(encoders)
    image_tokenizer = _tokenizer_with_image_token(tokenizer, directory)
    state = _cast_state(state, DTYPES[options.dtype])
    dtype = _dtype_name(state)
    _write_weights(directory, state, options.max_shard_bytes)
    hf_config = _hf_config(model, config, image_tokenizer, dtype)
    hf_config.save_pretrained(directory)
    _generation_config(image_tokenizer).save_pretrained(directory)
    _write_processor_files(directory, config, model.num_visual_tokens)
    write_bundle(directory)
    card = _card(model, encoders, options, state, dtype)
    (directory / EXPORT_CARD_NAME).write_text(card, encoding="utf-8")
    return sorted(p.name for p in directory.iterdir())


IMAGE_TOKEN_NAME = "<image>"


def _tokenizer_with_image_token(tokenizer, directory: Path):
    """Save ``tokenizer`` with ``<image>`` added as a special token (the processor writes its id
    at the visual token positions; the model never embeds it, so the embeddings stay as they are)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(directory)
    copy = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    if IMAGE_TOKEN_NAME not in copy.all_special_tokens:
        copy.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN_NAME]})
    if copy.pad_token is None:
        copy.pad_token = tokenizer.pad_token
    copy.save_pretrained(directory)
    return copy


def _cast_state(source: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in source.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous().clone()
    return state


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    """The floating dtype of the weights (the most common one, by element count)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def _write_weights(directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, filename_pattern=EXPORT_WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": sum(t.numel() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / EXPORT_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _hf_config(model, config, tokenizer, dtype: str):
    from mocha.export.hf_configuration import MochaConfig

    return MochaConfig(
        mocha=config.model_dump(),
        vocab_size=max(model.llm.get_input_embeddings().num_embeddings, len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_NAME),
        num_image_tokens=model.num_visual_tokens,
        architectures=[MODEL_CLASS],
        auto_map={"AutoConfig": "configuration_mocha.MochaConfig",
                  **{auto: f"modeling_mocha.{MODEL_CLASS}" for auto in AUTO_CLASSES}},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, do_sample=False)


def _write_processor_files(directory: Path, config, num_image_tokens: int) -> None:
    from mocha.export.chat_template import chat_template

    processor = {"processor_class": PROCESSOR_CLASS,
                 "auto_map": {"AutoProcessor": f"processing_mocha.{PROCESSOR_CLASS}"},
                 "encoders": [e.model_dump() for e in config.encoders],
                 "template": config.template,
                 "image_token": IMAGE_TOKEN_NAME,
                 "num_image_tokens": num_image_tokens,
                 "pad_to_square": config.pad_to_square}
    (directory / EXPORT_PROCESSOR_CONFIG_NAME).write_text(json.dumps(processor, indent=2) + "\n")
    (directory / EXPORT_CHAT_TEMPLATE_NAME).write_text(chat_template(config.template, config.image_token_first))
    # tokenizer_config.json points AutoProcessor at the processor too (some loaders read only it).
    tokenizer_config = directory / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    data.setdefault("auto_map", {})["AutoProcessor"] = f"processing_mocha.{PROCESSOR_CLASS}"
    tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _card(model, encoders, options: HFExportOptions, state: dict[str, torch.Tensor], dtype: str) -> str:
    from mocha.export.card import CardFacts, render_model_card

    measured = {kind: {"image_size": enc.image_size, "num_tokens": enc.num_tokens, "hidden_size": enc.hidden_size,
                       "select_layer": enc.select_layer} for kind, enc in encoders.items()}
    llm = model.llm.config
    facts = CardFacts(source=options.source or "a MoCHA model", dtype=dtype,
                      num_parameters=sum(t.numel() for t in state.values() if t.is_floating_point()),
                      num_image_tokens=model.num_visual_tokens, encoders=measured,
                      llm={"num_hidden_layers": llm.num_hidden_layers, "hidden_size": llm.hidden_size,
                           "vocab_size": model.llm.get_input_embeddings().num_embeddings},
                      manifests=options.manifests, scores=options.scores)
    return render_model_card(model.config, facts)
