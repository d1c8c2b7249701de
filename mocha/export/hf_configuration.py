"""``MochaConfig``: the transformers config of a MoCHA export (``model_type: "mocha"``).

This module travels with every export as ``configuration_mocha.py`` (``mocha.export.remote_code``
bundles it with the mocha modules it imports). ``mocha`` holds the whole
self-contained :class:`mocha.config.ModelConfig` (encoders, connector, HGA, LLM architecture)
as plain JSON; the model class validates it when it is built.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from mocha.config import LLMConfig
from mocha.model.llm import llm_config

#: Processor output / model input name of encoder ``kind``'s pixels: ``pixel_values_<kind>``.
PIXEL_VALUES_PREFIX = "pixel_values_"


class MochaConfig(PreTrainedConfig):
    """Attributes:
        mocha: ``ModelConfig.model_dump()`` of the exported model, every sub-model's architecture
            written out (no hub ids), so the folder rebuilds offline.
        vocab_size: ids that may appear in ``input_ids``: the tokenizer's, image token included
            (the LLM's embedding rows are in its own config inside ``mocha``).
        image_token_id: the tokenizer id the processor writes once per visual token; the model
            puts the visual tokens at those positions (it never looks the id up in its embeddings,
            which may have fewer rows).
        num_image_tokens: visual tokens per image (the sum over the encoders).
    """

    model_type = "mocha"

    mocha: dict | None = None
    vocab_size: int | None = None
    image_token_id: int | None = None
    num_image_tokens: int | None = None
    tie_word_embeddings: bool = False

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The LLM's transformers config (generation sizes its KV cache from it)."""
        if encoder or not self.mocha:
            return super().get_text_config(decoder=decoder, encoder=encoder)
        return llm_config(LLMConfig.model_validate(self.mocha["llm"]))
