"""The model card (``README.md``) of a transformers-native export.

It states what a reader needs to use or judge the model without opening the code: how to load
it, the vision encoders (kind, resolution, tokens, width, layer taken), the connector and HGA
settings, the LLM, the conversation template, the training data's manifest fingerprints (which
name the exact shard sets, ``mocha data shard`` / ``mocha data features``) and the evaluation
scores (``mocha eval``'s ``scores.json``) when they are given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mocha.config import ModelConfig


@dataclass
class CardFacts:
    """What the card says beyond the architecture.

    ``manifests``: (where it was read, manifest dict) per training data set; ``scores``: (where it
    was read, ``scores.json`` dict); ``encoders``: per kind, the numbers measured on the built model
    (``image_size``, ``num_tokens``, ``hidden_size``, ``select_layer``).
    """

    source: str
    dtype: str
    num_parameters: int
    num_image_tokens: int
    encoders: dict[str, dict[str, Any]]
    llm: dict[str, Any]
    manifests: list[tuple[str, dict]] = field(default_factory=list)
    scores: list[tuple[str, dict]] = field(default_factory=list)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _manifest_rows(manifests: list[tuple[str, dict]]) -> list[list[Any]]:
    rows = []
    for where, manifest in manifests:
        if "source" in manifest:  # a feature set: its own config hash + the shard set it encodes
            kind = f"features ({manifest.get('dtype', '?')})"
            fingerprint = manifest["source"].get("fingerprint", "?")
            detail = f"encoders hash `{manifest.get('config_hash', '?')}`, shards {manifest['source'].get('url', '?')}"
        else:
            kind = "shards"
            fingerprint = manifest.get("fingerprint", "?")
            detail = f"input {manifest.get('input', {}).get('url', '?')}"
        rows.append([f"`{where}`", kind, manifest.get("num_samples", "?"), f"`{fingerprint}`", detail])
    return rows


def _score_lines(where: str, scores: dict) -> list[str]:
    lines = [f"From `{where}`:", ""]
    pope = scores.get("pope") or {}
    if pope:
        metrics = sorted({k for split in pope.values() for k, v in split.items() if isinstance(v, (int, float))})
        rows = [[split] + [_number(values.get(m)) for m in metrics] for split, values in sorted(pope.items())]
        lines += [_table(["POPE split"] + metrics, rows), ""]
    mme = scores.get("mme") or {}
    if mme.get("totals"):
        lines += [_table(["MME"] + sorted(mme["totals"]), [["total"] + [_number(mme["totals"][k])
                                                                  for k in sorted(mme["totals"])]]), ""]
    other = {k: v for k, v in scores.items() if k not in ("pope", "mme")}
    if other:
        lines += ["```json", json.dumps(other, indent=1, sort_keys=True), "```", ""]
    return lines


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def render_model_card(config: ModelConfig, facts: CardFacts) -> str:
    """README.md text for an export of ``config``."""
    connector, hga = config.connector, config.hga
    encoders = [[e.kind, e.pretrained or "-", facts.encoders[e.kind]["image_size"],
                 facts.encoders[e.kind]["num_tokens"], facts.encoders[e.kind]["hidden_size"],
                 facts.encoders[e.kind]["select_layer"], e.channel_pool or 1] for e in config.encoders]
    hga_settings = {"graph": f"k={hga.k}, intra-group share {hga.intra_share}, chunk {hga.chunk_size or 'all'}",
                    "attention": f"{hga.num_heads} heads", "off": "-"}[hga.mode]
    experts = config.llm_experts
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [mocha, vision-language, mixture-of-experts]",
        "---",
        "",
        "# MoCHA vision-language model",
        "",
        f"Exported by `mocha export` from `{facts.source}`: {facts.num_parameters:,} parameters, weights in "
        f"{facts.dtype}. The modelling and processing code travels in this folder (`trust_remote_code=True`); "
        "mocha itself is not needed to run it.",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        "model = AutoModelForImageTextToText.from_pretrained(PATH, trust_remote_code=True)",
        "processor = AutoProcessor.from_pretrained(PATH, trust_remote_code=True)",
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]',
        "prompt = processor.apply_chat_template(messages)",
        'inputs = processor(images=Image.open("photo.jpg"), text=prompt)',
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "With mocha installed the same folder loads for further training or evaluation: "
        "`MochaModel.from_pretrained(PATH)`, `mocha generate --checkpoint PATH`, `mocha eval --model PATH`.",
        "",
        "## Architecture",
        "",
        f"Frozen vision encoders ({facts.num_image_tokens} visual tokens per image, concatenated in this order; "
        "every weight is in this folder, \"initialised from\" names the hub checkpoint when the exporting "
        "model still knew it):",
        "",
        _table(["encoder", "initialised from", "image size", "tokens", "width", "layer", "channel pool"], encoders),
        "",
        f"- Connector: {connector.kind}" + (f", {connector.num_experts} experts, top-{connector.top_k}, balance loss "
                                            f"{connector.balance_coef}, router z-loss {connector.z_coef}"
                                            if connector.kind == "moe" else ""),
        f"- Hierarchical group attention (HGA): {hga.mode} ({hga_settings})",
        f"- LLM: {config.llm.family} family" + (f" from `{config.llm.pretrained}`" if config.llm.pretrained else "")
        + ", "
        f"{facts.llm['num_hidden_layers']} layers, hidden size "
        f"{facts.llm['hidden_size']}, vocabulary {facts.llm['vocab_size']}"
        + (f"; MoE layers {experts.layers} ({experts.num_experts} experts, top-{experts.top_k})" if experts else ""),
        f"- Conversation template: `{config.template}` (the processor's chat template), max length "
        f"{config.max_length}",
        "",
        "## Training data",
        "",
    ]
    if facts.manifests:
        lines += ["Equal fingerprints mean byte-equal inputs (`mocha data shard` / `mocha data features` manifests).",
                  "", _table(["manifest", "kind", "samples", "fingerprint", "details"],
                             _manifest_rows(facts.manifests)), ""]
    else:
        lines += ["Not recorded (export with `--manifest` to list the data sets' fingerprints).", ""]
    lines += ["## Evaluation", ""]
    if facts.scores:
        for where, scores in facts.scores:
            lines += _score_lines(where, scores)
    else:
        lines += ["Not recorded (export with `--scores` to include `mocha eval` results).", ""]
    return "\n".join(lines)
