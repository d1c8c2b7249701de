"""Conversation templates and label masking, with LLaVA's semantics.

A training sample's text comes as LLaVA JSON turns::

    [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
     {"from": "gpt", "value": "Red."}, ...]

Templates (LLaVA's ``conv_llava_plain``, ``conv_vicuna_v1`` and the Phi-2 variant used by
Phi-based LLaVA forks such as MoCHA):

- ``plain`` (stage 1, image-caption alignment): ``<image>`` + caption + ``"\\n"``. As in LLaVA's
  ``preprocess_plain``, a human turn contributes only its ``<image>`` placeholders (the
  instruction text is dropped); the caption and its ``"\\n"`` are learned. BOS follows the
  tokenizer's default (Llama tokenizers add one, Phi-2's does not).
- ``vicuna_v1``: ``<s>SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``.
- ``phi``: the same with ``<|endoftext|>`` as turn end and no BOS.

Only assistant replies and their turn end are learned; everything else is ``IGNORE_INDEX``.
Each ``<image>`` becomes one ``IMAGE_TOKEN_INDEX`` id (LLaVA's ``tokenizer_image_token``: the
text between placeholders is tokenised piece by piece); the model splices the visual tokens in
its place.

How labels are assigned: LLaVA tokenises the whole prompt, then re-tokenises each round to
*count* how many tokens to mask, and when the counts do not add up it masks the sample ("WARNING:
tokenization mismatch"). Counting relies on tokenizer-specific fudge factors (its ``- 2``). Here
the prompt is tokenised once with character offsets, and a token is learned when it lies
inside an assistant span (reply + turn end). A token that straddles a span boundary — a
merge across the prompt/reply border — is exactly the case LLaVA's arithmetic cannot line
up; such a sample is masked entirely with status ``"tokenization_mismatch"``, never trained
on. One allowance, the same as LLaVA's: the space between ``"ASSISTANT:"`` and the reply,
which BPE tokenizers merge into the reply's first word (``" Red"``), is learned with it.

Length: each placeholder stands for ``num_image_tokens`` visual tokens. If those do not fit in
``max_length`` the sample is rejected (``"too_long_image_cut"``): image tokens are never cut.
If the images fit but the text does not, the text tail is cut (``"truncated"``, still
trainable — LLaVA truncates to ``model_max_length`` the same way) unless no learned token is
left (``"no_supervised_tokens"``). Callers drop samples whose ``trainable`` is false and count
them by ``status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

HUMAN = "human"
GPT = "gpt"

STATUS_OK = "ok"
STATUS_TRUNCATED = "truncated"
STATUS_MISMATCH = "tokenization_mismatch"
STATUS_TOO_LONG_IMAGE_CUT = "too_long_image_cut"
STATUS_NO_SUPERVISED_TOKENS = "no_supervised_tokens"
TRAINABLE_STATUSES = frozenset({STATUS_OK, STATUS_TRUNCATED})
#: Statuses caused by the sequence budget (``max_length``): the text was cut, or nothing was left to train.
OVER_BUDGET_STATUSES = frozenset({STATUS_TRUNCATED, STATUS_TOO_LONG_IMAGE_CUT, STATUS_NO_SUPERVISED_TOKENS})
#: Share of samples over the sequence budget above which a shard build or a training run warns.
TRUNCATION_WARN_FRACTION = 0.01


def truncation_report(over_budget: int, total: int, max_length: int, where: str) -> tuple[str, bool]:
    """One line saying how many of ``total`` samples did not fit ``max_length`` (their text was
    cut or, with no answer left, they were masked out), and whether that is over
    :data:`TRUNCATION_WARN_FRACTION` (a warning: raise ``max_length`` or check the data)."""
    fraction = over_budget / total if total else 0.0
    line = f"{where}: {over_budget} of {total} samples ({fraction:.2%}) exceed max_length {max_length}"
    warn = fraction > TRUNCATION_WARN_FRACTION
    if warn:
        line = (f"warning: {line}, more than {TRUNCATION_WARN_FRACTION:.0%}: their text is cut and answers past the "
                f"budget are not learned; raise model.max_length (the official recipe uses 2560) or check the data")
    return line, warn

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class ConversationError(ValueError):
    """A conversation is malformed (roles, empty turns, placeholders); names the sample."""


@dataclass(frozen=True)
class Template:
    """How turns are rendered into one training string.

    Attributes:
        name: registry key.
        system: system prompt, followed by ``sep``; empty for ``plain``.
        roles: (user, assistant) role names; empty strings select the plain (role-less) form.
        sep: separator after the system prompt and after each user message.
        turn_end: appended to every assistant reply and learned with it.
        add_bos: prepend the tokenizer's BOS; ``None`` follows the tokenizer's own default.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    turn_end: str
    add_bos: bool | None

    @property
    def is_plain(self) -> bool:
        return self.roles == ("", "")


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(name="plain", system="", roles=("", ""), sep="", turn_end="\n", add_bos=None),
        Template(name="vicuna_v1", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", turn_end="</s>", add_bos=True),
        Template(name="phi", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", turn_end="<|endoftext|>", add_bos=False),
    )
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}") from None


@dataclass
class TokenizedSample:
    """One tokenised conversation.

    ``labels`` has ``input_ids``' length; ``IGNORE_INDEX`` where nothing is learned. ``status``
    is ``"ok"`` or the reason the sample was truncated/rejected (see module docstring);
    ``detail`` says more for humans.
    """

    input_ids: list[int]
    labels: list[int]
    status: str = STATUS_OK
    detail: str = ""

    @property
    def trainable(self) -> bool:
        return self.status in TRAINABLE_STATUSES

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class _Rendered:
    """A rendered conversation: its text and the character spans that are learned."""

    text: str
    learned_spans: list[tuple[int, int]] = field(default_factory=list)

    def append(self, piece: str, learned: bool = False) -> None:
        if learned:
            self.learned_spans.append((len(self.text), len(self.text) + len(piece)))
        self.text += piece


def count_image_tokens(text: str) -> int:
    """Number of ``<image>`` placeholders in ``text``."""
    return text.count(IMAGE_TOKEN)


def _where(sample_id: str | None) -> str:
    return f"sample {sample_id!r}" if sample_id is not None else "conversation"


def validate_conversation(conversations: Any, sample_id: str | None = None, require_reply: bool = True) -> None:
    """Check LLaVA JSON turns: a non-empty list alternating human/gpt starting with human,
    every value a non-empty string, no ``<image>`` in gpt turns; with ``require_reply`` the
    last turn must be gpt. Raises :class:`ConversationError` naming the sample and turn."""
    where = _where(sample_id)
    if not isinstance(conversations, Sequence) or isinstance(conversations, str) or not conversations:
        raise ConversationError(f"{where}: 'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"{where}: turn {i} must be an object with 'from' and 'value'")
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ConversationError(
                f"{where}: turn {i} is from {turn['from']!r}, expected {expected!r} (turns alternate, human first)"
            )
        value = turn["value"]
        if not isinstance(value, str) or not value.strip():
            raise ConversationError(f"{where}: turn {i} ('{expected}') has an empty or non-string 'value'")
        if expected == GPT and IMAGE_TOKEN in value:
            raise ConversationError(f"{where}: turn {i} is a gpt reply containing {IMAGE_TOKEN!r}")
    if require_reply and conversations[-1]["from"] != GPT:
        raise ConversationError(f"{where}: the last turn must be a gpt reply to train on")


def _render(conversations: Sequence[dict], template: Template, generation: bool) -> _Rendered:
    """Render validated turns. With ``generation`` the text ends where the last reply would
    start (``"...ASSISTANT:"`` / after the image for plain) and has no learned spans."""
    rendered = _Rendered(text="" if template.is_plain else template.system + template.sep)
    user, assistant = template.roles
    for turn in conversations:
        if turn["from"] == HUMAN:
            if template.is_plain:
                rendered.append(IMAGE_TOKEN * count_image_tokens(turn["value"]))
            else:
                rendered.append(f"{user}: {turn['value']}{template.sep}{assistant}:")
        else:
            rendered.append("" if template.is_plain else " ")
            rendered.append(turn["value"] + template.turn_end, learned=not generation)
    return rendered


def image_first(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA-1.5's preprocessing of the image placeholder: a turn holding ``<image>`` (the first
    human turn in LLaVA data) gets it at its front, ``"<image>\n<the rest, stripped>"``, wherever
    the data put it (``"What is this? <image>"`` -> ``"<image>\nWhat is this?"``). Other turns and
    text-only conversations are unchanged."""
    out = []
    for turn in conversations:
        value = turn.get("value")
        if isinstance(value, str) and IMAGE_TOKEN in value:
            count = value.count(IMAGE_TOKEN)
            rest = value.replace(IMAGE_TOKEN, "").strip()
            turn = {**turn, "value": (IMAGE_TOKEN * count + "\n" + rest) if rest else IMAGE_TOKEN * count}
        out.append(turn)
    return out


def _prompt_turns(conversations: Sequence[dict], sample_id: str | None) -> Sequence[dict]:
    validate_conversation(conversations, sample_id, require_reply=False)
    return conversations[:-1] if conversations[-1]["from"] == GPT else conversations


def build_prompt(conversations: Sequence[dict], template: str, sample_id: str | None = None) -> str:
    """The generation prompt: every turn up to the assistant's last reply, ending with
    ``"ASSISTANT:"`` (plain: the image placeholders). A trailing gpt turn — the reference
    answer in an evaluation set — is left out."""
    return _render(_prompt_turns(conversations, sample_id), get_template(template), generation=True).text


def render_conversation(conversations: Sequence[dict], template: str, sample_id: str | None = None) -> str:
    """The full training text of a conversation (what :func:`tokenize_conversation` tokenises)."""
    validate_conversation(conversations, sample_id)
    return _render(conversations, get_template(template), generation=False).text


def _tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a").input_ids[:1] == [bos] and tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]


def _check_turn_end(tokenizer, template: Template) -> None:
    # A chat turn end must be one special token, else the model never learns to stop cleanly.
    if not template.is_plain and template.turn_end not in tokenizer.all_special_tokens:
        raise ValueError(
            f"template {template.name!r} ends turns with {template.turn_end!r}, which is not a special token of this "
            f"tokenizer (special tokens: {tokenizer.all_special_tokens}); pair the template with its LLM family's tokenizer"
        )


def _encode(text: str, tokenizer, add_bos: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and their character spans in ``text``; each ``<image>`` becomes one
    ``IMAGE_TOKEN_INDEX`` and the text between placeholders is tokenised piece by piece."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("template wants a BOS token but the tokenizer has none")
        ids.append(tokenizer.bos_token_id)
        spans.append((0, 0))
    pos = 0
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            spans.append((pos, pos + len(IMAGE_TOKEN)))
            pos += len(IMAGE_TOKEN)
        if chunk:
            encoded = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids.extend(encoded["input_ids"])
            spans.extend((pos + start, pos + end) for start, end in encoded["offset_mapping"])
        pos += len(chunk)
    return ids, spans


def _assign_labels(
    ids: list[int], spans: list[tuple[int, int]], rendered: _Rendered
) -> tuple[list[int], str]:
    """Labels for ``ids`` from the learned character spans; returns (labels, mismatch detail
    or "")."""
    text = rendered.text
    labels = [IGNORE_INDEX] * len(ids)
    learned_end = {k: -1 for k in range(len(rendered.learned_spans))}
    for t, (start, end) in enumerate(spans):
        for k, (lo, hi) in enumerate(rendered.learned_spans):
            overlaps = start < hi and end > lo if end > start else lo < start < hi
            if not overlaps:
                continue
            starts_inside = start >= lo or text[start:lo].isspace()
            if not starts_inside or end > hi:
                return labels, f"token {t} {text[start:end]!r} crosses the border of reply {k} {text[lo:hi]!r}"
            labels[t] = ids[t]
            learned_end[k] = max(learned_end[k], end)
            break
    for k, (lo, hi) in enumerate(rendered.learned_spans):
        if learned_end[k] != hi:
            return labels, f"reply {k} {text[lo:hi]!r} is not covered by its tokens"
    return labels, ""


def tokenize_conversation(
    conversations: Sequence[dict],
    tokenizer,
    template: str,
    max_length: int | None = None,
    num_image_tokens: int = 0,
    sample_id: str | None = None,
    image_token_first: bool = False,
) -> TokenizedSample:
    """Tokenise one LLaVA conversation and mask its labels (see module docstring).

    Args:
        conversations: LLaVA turns, validated by :func:`validate_conversation`.
        tokenizer: a fast (offset-reporting) transformers tokenizer of the template's family.
        template: ``"plain"``, ``"vicuna_v1"`` or ``"phi"``.
        max_length: sequence budget after each placeholder is expanded; ``None``: no limit.
        num_image_tokens: visual tokens that replace each ``<image>`` (0: not counted).
        sample_id: used in error messages.
        image_token_first: move ``<image>`` to the front of its turn first (:func:`image_first`,
            LLaVA-1.5's preprocessing; ``ModelConfig.image_token_first``).

    Raises:
        ConversationError: malformed turns. ValueError: template/tokenizer mismatch.
    """
    validate_conversation(conversations, sample_id)
    if image_token_first:
        conversations = image_first(conversations)
    spec = get_template(template)
    _check_turn_end(tokenizer, spec)
    rendered = _render(conversations, spec, generation=False)
    add_bos = _tokenizer_adds_bos(tokenizer) if spec.add_bos is None else spec.add_bos
    ids, spans = _encode(rendered.text, tokenizer, add_bos)
    labels, mismatch = _assign_labels(ids, spans, rendered)
    if mismatch:
        return TokenizedSample(ids, [IGNORE_INDEX] * len(ids), STATUS_MISMATCH, f"{_where(sample_id)}: {mismatch}")
    return _fit_length(TokenizedSample(ids, labels), max_length, num_image_tokens, sample_id)


def _fit_length(
    sample: TokenizedSample, max_length: int | None, num_image_tokens: int, sample_id: str | None
) -> TokenizedSample:
    image_positions = [i for i, tok in enumerate(sample.input_ids) if tok == IMAGE_TOKEN_INDEX]
    extra = len(image_positions) * (num_image_tokens - 1)  # each placeholder id expands in place
    if max_length is None or len(sample.input_ids) + extra <= max_length:
        return sample
    where = _where(sample_id)
    if image_positions and image_positions[-1] + 1 + extra > max_length:
        return TokenizedSample(
            sample.input_ids,
            [IGNORE_INDEX] * len(sample.input_ids),
            STATUS_TOO_LONG_IMAGE_CUT,
            f"{where}: its image tokens end at {image_positions[-1] + 1 + extra} > max_length {max_length}",
        )
    keep = max_length - extra
    truncated = TokenizedSample(
        sample.input_ids[:keep],
        sample.labels[:keep],
        STATUS_TRUNCATED,
        f"{where}: cut from {len(sample.input_ids) + extra} to {max_length} tokens",
    )
    if truncated.num_supervised == 0:
        truncated.labels = [IGNORE_INDEX] * keep
        truncated.status = STATUS_NO_SUPERVISED_TOKENS
    return truncated


def tokenize_prompt(conversations: Sequence[dict], tokenizer, template: str, sample_id: str | None = None,
                    image_token_first: bool = False) -> list[int]:
    """Input ids of :func:`build_prompt` for generation, encoded exactly as in training (BOS,
    one ``IMAGE_TOKEN_INDEX`` per placeholder, ``<image>`` moved first when the model was trained so)."""
    if image_token_first:
        conversations = image_first(conversations)
    return encode_prompt(build_prompt(conversations, template, sample_id), tokenizer, template)


def encode_prompt(text: str, tokenizer, template: str) -> list[int]:
    """Input ids of an already rendered prompt (``build_prompt``'s text, or the same text from a
    chat template), encoded exactly as in training: the template's BOS rule, one
    ``IMAGE_TOKEN_INDEX`` per ``<image>``."""
    spec = get_template(template)
    add_bos = _tokenizer_adds_bos(tokenizer) if spec.add_bos is None else spec.add_bos
    return _encode(text, tokenizer, add_bos)[0]
