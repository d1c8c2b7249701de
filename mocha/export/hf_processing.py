"""``MochaProcessor``: prompts and images -> the inputs of ``MochaForConditionalGeneration``.

It travels with every export as ``processing_mocha.py`` (bundled by ``mocha.export.remote_code``)
and is found by ``AutoProcessor`` through ``processor_config.json``'s ``auto_map``. It encodes a
prompt with mocha's own code (:func:`mocha.text.conversation.encode_prompt`: the template's BOS
rule, the text between placeholders tokenised piece by piece) and preprocesses each image with
each encoder's own image processor (:func:`mocha.model.encoders.build_image_processor`), so the
tokens and pixels are the ones ``mocha generate`` feeds the model. Each ``<image>`` becomes
``num_image_tokens`` copies of ``image_token_id``; batches are left-padded (generation).
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, ProcessorMixin

from mocha.config import EncoderConfig
from mocha.export.hf_configuration import PIXEL_VALUES_PREFIX
from mocha.model.encoders import build_image_processor, expand_to_square, preprocess_image
from mocha.text.conversation import IMAGE_TOKEN_INDEX, encode_prompt


class MochaProcessor(ProcessorMixin):
    """Args:
        tokenizer: the export's tokenizer (with ``image_token`` as an added special token).
        encoders: the model's encoder configs (``EncoderConfig`` dumps), in model order.
        template: mocha conversation template (``phi``, ``vicuna_v1``, ``plain``).
        image_token: the placeholder in prompts (``<image>``).
        num_image_tokens: visual tokens per image.
        pad_to_square: pad each image to a square with the mean colour before the encoders'
            processors (the model's ``pad_to_square``, LLaVA-1.5's ``image_aspect_ratio: pad``).
    """

    def __init__(self, tokenizer=None, chat_template=None, encoders=None, template="phi", image_token="<image>",
                 num_image_tokens=None, pad_to_square=False):
        if not encoders or not num_image_tokens:
            raise ValueError("MochaProcessor needs the model's encoders and num_image_tokens (processor_config.json)")
        self.encoders = [EncoderConfig.model_validate(e).model_dump() for e in encoders]
        self.template = template
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        self.pad_to_square = bool(pad_to_square)
        self.image_processors = {cfg["kind"]: build_image_processor(EncoderConfig.model_validate(cfg))
                                 for cfg in self.encoders}
        super().__init__(tokenizer, chat_template=chat_template)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token")

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + [PIXEL_VALUES_PREFIX + e["kind"] for e in self.encoders]

    def encode(self, text: str) -> list[int]:
        """Token ids of one rendered prompt, every ``<image>`` expanded to the visual token slots."""
        ids: list[int] = []
        for token in encode_prompt(text, self.tokenizer, self.template):
            ids.extend([self.image_token_id] * self.num_image_tokens if token == IMAGE_TOKEN_INDEX else [token])
        return ids

    def __call__(self, images=None, text=None, padding: bool | str = True, padding_side: str = "left",
                 return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """``text``: one rendered prompt or a list (``apply_chat_template``'s output); ``images``:
        one PIL image per ``<image>``, in order over the batch (a list, a list of lists, or one).
        Returns ``input_ids``, ``attention_mask`` and ``pixel_values_<kind>`` per encoder; a batch is
        always padded to its longest prompt (``padding`` is accepted for harnesses that pass it)."""
        if text is None:
            raise ValueError("MochaProcessor needs text (a prompt holding one <image> per image)")
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if padding not in (True, "longest"):
            raise ValueError(f"padding={padding!r}: MochaProcessor pads every batch to its longest prompt")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = _flatten(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat_images):
            raise ValueError(f"{placeholders} {self.image_token} placeholder(s) in the text but {len(flat_images)} "
                             f"image(s) given")
        rows = [self.encode(t) for t in texts]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat_images:
            flat_images = [image.convert("RGB") for image in flat_images]
            if self.pad_to_square:  # the shared step before every encoder (MochaModel.preprocess)
                flat_images = [expand_to_square(image) for image in flat_images]
            for kind, processor in self.image_processors.items():
                data[PIXEL_VALUES_PREFIX + kind] = torch.stack(
                    [preprocess_image(processor, image) for image in flat_images])
        return BatchFeature(data=data)


def _flatten(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]
