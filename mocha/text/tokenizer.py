"""Tokenizers: train a small byte-level BPE (or SentencePiece) tokenizer locally, or load an existing one.

The demo and the tests never download a tokenizer: they train one on their own text with HF
``tokenizers`` and save it in transformers' format, so that the rest of the system loads it
exactly like a released tokenizer (``AutoTokenizer.from_pretrained(dir)``).

The special tokens mirror the two LLM families MoCHA supports, so that the conversation
templates (:mod:`mocha.text.conversation`) behave the same on a trained tokenizer as on the
real one:

- ``phi`` (Phi-2): one special token ``<|endoftext|>`` serving as BOS, EOS, UNK and PAD; no
  BOS is prepended when encoding (Phi-2's GPT-2 style tokenizer does not add one).
- ``llama`` (Vicuna): ``<s>`` (BOS, prepended when encoding, as Llama's tokenizer does),
  ``</s>`` (EOS), ``<unk>`` (UNK, also used as PAD — what LLaVA sets for Vicuna).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

TokenizerFamily = Literal["phi", "llama"]


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of one LLM family (``add_bos``: prepend BOS when encoding)."""

    bos: str
    eos: str
    unk: str
    pad: str
    add_bos: bool

    def unique(self) -> list[str]:
        """Distinct special tokens in a fixed order (they get the lowest ids, in this order)."""
        return list(dict.fromkeys([self.bos, self.eos, self.unk, self.pad]))


FAMILY_SPECIAL_TOKENS: dict[str, SpecialTokens] = {
    "phi": SpecialTokens(bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad="<|endoftext|>", add_bos=False),
    "llama": SpecialTokens(bos="<s>", eos="</s>", unk="<unk>", pad="<unk>", add_bos=True),
}


def _special_tokens(family: str) -> SpecialTokens:
    try:
        return FAMILY_SPECIAL_TOKENS[family]
    except KeyError:
        raise ValueError(f"family must be one of {sorted(FAMILY_SPECIAL_TOKENS)}, got {family!r}") from None


def _post_processor(special: SpecialTokens, bos_id: int) -> processors.PostProcessor:
    # ByteLevel keeps character offsets exact (the conversation masking relies on offsets);
    # the llama family additionally prepends BOS, like Llama's own tokenizer.
    byte_level = processors.ByteLevel(trim_offsets=False)
    if not special.add_bos:
        return byte_level
    prepend_bos = processors.TemplateProcessing(
        single=f"{special.bos} $A", pair=f"{special.bos} $A {special.bos} $B", special_tokens=[(special.bos, bos_id)]
    )
    return processors.Sequence([byte_level, prepend_bos])


def train_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1024,
    family: TokenizerFamily = "phi",
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Byte-level means every string is encodable (the 256 byte symbols are always in the
    vocabulary), so the tokenizer never produces UNK. The result is saved with
    ``save_pretrained`` and can be loaded with ``AutoTokenizer.from_pretrained(out_dir)``.

    Args:
        texts: training corpus, one document per item (consumed once).
        out_dir: directory to write ``tokenizer.json`` / ``tokenizer_config.json`` to.
        vocab_size: target vocabulary size including special tokens and the byte alphabet.
        family: ``"phi"`` or ``"llama"``; selects the special tokens (see module docstring).
        min_frequency: a pair must occur this often to be merged.
        model_max_length: recorded in the tokenizer config.
    """
    special = _special_tokens(family)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = special.unique()
    if vocab_size < len(alphabet) + len(specials):
        minimum = len(alphabet) + len(specials)
        raise ValueError(f"vocab_size must be at least {minimum} (bytes + special tokens), got {vocab_size}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = _post_processor(special, tokenizer.token_to_id(special.bos))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special.bos,
        eos_token=special.eos,
        unk_token=special.unk,
        pad_token=special.pad,
        model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    logger.info("trained %s BPE tokenizer with %d tokens -> %s", family, len(wrapped), out_dir)
    return wrapped


#: What Llama / Vicuna checkpoints ship next to ``tokenizer.model`` (SentencePiece, no tokenizer.json).
_LLAMA_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
                           "legacy": False, "clean_up_tokenization_spaces": False}


def train_sentencepiece_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, model_max_length: int = 2048
) -> Path:
    """Train a SentencePiece BPE model (byte fallback, ``<unk>``=0, ``<s>``=1, ``</s>``=2, as
    Llama's) and save it the way Vicuna-7B and most Llama checkpoints ship their tokenizer:
    ``tokenizer.model`` plus ``tokenizer_config.json`` / ``special_tokens_map.json``, no
    ``tokenizer.json``. Loading such a folder needs ``sentencepiece`` and ``protobuf``
    (transformers converts the model to a fast tokenizer). Returns ``out_dir``."""
    import json

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)  # not shipped by the checkpoints
    config = {**_LLAMA_TOKENIZER_CONFIG, "model_max_length": model_max_length}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out_dir


def _require_sentencepiece(path_or_id: str | Path) -> None:
    """A folder with only ``tokenizer.model`` (SentencePiece) loads only with ``sentencepiece``
    installed; say so instead of transformers' generic failure."""
    folder = Path(path_or_id)
    if not (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
        return
    try:
        for module in ("google.protobuf", "sentencepiece"):
            importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{folder} ships a SentencePiece tokenizer (tokenizer.model only, as Vicuna and Llama "
                          f"checkpoints do): install `sentencepiece` and `protobuf` ({e})") from None


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer with ``AutoTokenizer`` (local directory or hub id; offline-friendly).

    Batching needs a pad token. Like LLaVA, a tokenizer without one gets its UNK token as PAD
    (Vicuna: ``<unk>``; Phi-2: ``<|endoftext|>``), or EOS when it has no UNK either. Padded
    positions are always masked by the attention mask and ``IGNORE_INDEX`` labels, so reusing
    an existing token is safe and keeps the embedding matrix unchanged.

    Folders holding only a SentencePiece ``tokenizer.model`` (Vicuna-7B, Llama) load through
    transformers' conversion to a fast tokenizer, which needs ``sentencepiece`` and ``protobuf``.
    """
    _require_sentencepiece(path_or_id)
    kwargs = {}
    if _local_tokenizer_class(path_or_id):
        # The tokenizer names its class: skip the model's config.json, which for a remote-code
        # model (a transformers-native MoCHA export) makes AutoTokenizer ask "[y/N]" on stdout.
        kwargs["config"] = PretrainedConfig()
    tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"tokenizer {path_or_id!s} has no pad, unk or eos token to pad batches with")
        tokenizer.pad_token = fallback
        logger.info("tokenizer %s had no pad token; using %r", path_or_id, fallback)
    return tokenizer


def _local_tokenizer_class(path_or_id: str | Path) -> str | None:
    """``tokenizer_class`` of a local tokenizer folder's ``tokenizer_config.json``, if any."""
    import json

    config = Path(path_or_id) / "tokenizer_config.json"
    try:
        value = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
