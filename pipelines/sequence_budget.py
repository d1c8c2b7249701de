"""The sequence budget of a training job, as the shard build counts it.

``mocha data shard --model-config JOB.yaml`` tokenises every accepted record the way that job's
trainer will (its tokenizer, template, ``model.max_length``, its encoders' visual tokens, the
``<image>``-first rule) and writes how many samples do not fit into the manifest's
``sequence_budget`` (a warning over 1%). The count runs inside the shard tasks
(:func:`pipelines.shard_task.build_shard`), on the records they check anyway.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from pydantic import Field

from mocha.config import ConfigError, StrictModel


class SequenceBudget(StrictModel):
    """What a training job will fit each sample into, so that the shard build can count the
    samples whose text ``max_length`` would cut (``--model-config``: a job or model YAML)."""

    tokenizer: str = Field(description="tokenizer folder or hub id (the job's tokenizer)")
    template: str = Field(description="conversation template of the job (plain, phi, vicuna_v1)")
    max_length: int = Field(gt=0, description="the job's model.max_length")
    num_image_tokens: int = Field(gt=0, description="visual tokens per image (sum over the encoders)")
    image_token_first: bool = Field(default=True, description="the job's model.image_token_first")

    @classmethod
    def of_model(cls, model, tokenizer: str | None = None) -> "SequenceBudget":
        """The budget of a :class:`~mocha.config.ModelConfig`: visual tokens from the encoder
        configs (no weights read); tokenizer from ``tokenizer``, else the LLM's."""
        from mocha.model.encoders import encoder_geometry

        path = tokenizer or model.llm.tokenizer or model.llm.pretrained
        if path is None:
            raise ConfigError("the sequence budget needs a tokenizer: pass --tokenizer or set model.llm.tokenizer")
        return cls(tokenizer=path, template=model.template, max_length=model.max_length,
                   num_image_tokens=sum(encoder_geometry(e).num_tokens for e in model.encoders),
                   image_token_first=model.image_token_first)

    def check(self) -> None:
        """Tokenise a probe conversation, so that a tokenizer or template that cannot work fails
        on the driver with :class:`~mocha.config.ConfigError`, not inside a Ray task."""
        probe = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]}
        try:
            budget_status(probe, False, self.model_dump())
        except (OSError, ValueError) as e:
            raise ConfigError(f"sequence budget: cannot tokenise with {self.tokenizer!r} and template "
                              f"{self.template!r}: {e}") from None


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    from mocha.text.tokenizer import load_tokenizer

    return load_tokenizer(path)


def budget_status(record: dict[str, Any], has_image: bool, budget: dict[str, Any]) -> str:
    """How a training job with ``budget`` (a :class:`SequenceBudget` dump) would tokenise this
    accepted record: ``ok``, ``truncated``, ... (:mod:`mocha.text.conversation` statuses)."""
    from mocha.text.conversation import tokenize_conversation

    return tokenize_conversation(record["conversations"], _tokenizer(budget["tokenizer"]), budget["template"],
                                 max_length=budget["max_length"], sample_id=str(record.get("id")),
                                 num_image_tokens=budget["num_image_tokens"] if has_image else 0,
                                 image_token_first=budget["image_token_first"]).status


def manifest_entry(budget: SequenceBudget, statuses: Counter[str]) -> dict[str, Any]:
    """The manifest's ``sequence_budget``: the budget, the status counts and ``over_budget``."""
    from mocha.text.conversation import OVER_BUDGET_STATUSES

    return {**budget.model_dump(), "statuses": dict(sorted(statuses.items())),
            "over_budget": sum(n for status, n in statuses.items() if status in OVER_BUDGET_STATUSES)}


def budget_report(manifest: dict[str, Any]) -> tuple[str, bool]:
    """The manifest's sequence-budget count as one line, and whether it is over the warning share."""
    from mocha.text.conversation import truncation_report

    budget = manifest["sequence_budget"]
    return truncation_report(budget["over_budget"], manifest["num_samples"], budget["max_length"],
                             f"sequence budget ({budget['num_image_tokens']} visual tokens, template {budget['template']})")

