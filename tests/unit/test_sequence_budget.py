"""The sequence budget: samples whose text does not fit ``max_length`` are counted per shard
build and per training run, with a warning over 1%."""

from __future__ import annotations

import pytest

from mocha.text.conversation import TRUNCATION_WARN_FRACTION, tokenize_conversation, truncation_report
from mocha.train.data import Example, collate

LONG_ANSWER = " ".join(["red circle"] * 200)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from mocha.text.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(["What colour is it? red circle blue square", "Name a colour. red"] * 30, out, vocab_size=300)
    return str(out)


def _record(i: int, answer: str, image: bool) -> dict:
    question = ("<image>\n" if image else "") + "What colour is it?"
    record = {"id": f"r{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        record["image"] = f"{i}.png"
    return record


def test_report_warns_only_over_one_percent():
    line, warn = truncation_report(1, 100, 2560, "run x")
    assert not warn and line == "run x: 1 of 100 samples (1.00%) exceed max_length 2560"
    line, warn = truncation_report(2, 100, 2560, "run x")
    assert warn and line.startswith("warning: run x: 2 of 100 samples (2.00%)") and "raise model.max_length" in line
    assert TRUNCATION_WARN_FRACTION == 0.01 and truncation_report(0, 0, 10, "empty") == ("empty: 0 of 0 samples "
                                                                                        "(0.00%) exceed max_length 10", False)


def test_collated_batches_count_samples_over_the_budget(tokenizer_dir):
    from mocha.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)

    def example(record, max_length, image_tokens=8):
        tok = tokenize_conversation(record["conversations"], tokenizer, "plain", max_length=max_length,
                                    num_image_tokens=image_tokens if "image" in record else 0)
        return Example(record["id"], tok.input_ids, tok.labels, tok.status)

    examples = [example(_record(0, "red", True), 64), example(_record(1, LONG_ANSWER, False), 64),
                example(_record(2, LONG_ANSWER, True), 64), example(_record(3, "red", True), 4)]
    assert [e.status for e in examples] == ["ok", "truncated", "truncated", "too_long_image_cut"]
    batch = collate(examples, pad_token_id=0)
    assert batch.num_over_budget == 3 and batch.num_masked == 1  # truncated ones still train


def test_run_summary_covers_the_whole_history(tmp_path):
    from mocha.demo.pipeline import DemoConfig, demo_job
    from mocha.train.metrics import MetricsLog

    job = demo_job(DemoConfig(out=str(tmp_path), llm_pretrain_steps=0), 2, tmp_path)
    log = MetricsLog(job, rank=0)
    log.records = [{"samples": 100, "over_budget_samples": 0}, {"samples": 100, "over_budget_samples": 1}]
    line, warn = log.truncation_summary()
    assert not warn and "1 of 200 samples (0.50%)" in line
    log.records.append({"samples": 100, "over_budget_samples": 8})
    line, warn = log.truncation_summary()
    assert warn and "9 of 300 samples (3.00%)" in line and f"max_length {job.model.max_length}" in line


def test_shard_build_tasks_tokenise_each_record_under_the_budget(tmp_path, tokenizer_dir):
    """A shard task (the Ray task body, called directly) counts its accepted records by the status
    the training job would give them; rejected records are not counted, and a reused shard is
    counted again under the budget of the rerun."""
    from PIL import Image

    from mocha.model.encoders import encoder_geometry
    from mocha.model.tiny import tiny_model_config
    from pipelines.shard import SequenceBudget
    from pipelines.shard_task import build_shard

    model = tiny_model_config(max_length=64)
    budget = SequenceBudget.of_model(model, tokenizer_dir)
    assert budget.num_image_tokens == sum(encoder_geometry(e).num_tokens for e in model.encoders)  # no build
    assert (budget.tokenizer, budget.max_length, budget.template) == (tokenizer_dir, 64, model.template)
    budget = budget.model_copy(update={"num_image_tokens": 8, "template": "plain"})
    records = [_record(0, "red", True), _record(1, LONG_ANSWER, False), _record(2, LONG_ANSWER, True),
               _record(3, "red", True)]
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for r in records[:3]:
        if "image" in r:
            Image.new("RGB", (8, 8)).save(images / r["image"])  # record 3's image is missing
    rows = list(enumerate(records))
    result = build_shard(0, rows, str(images), str(output), 10**6, None, budget.model_dump())
    assert [v.reason for v in result.verdicts] == ["", "", "", "missing_image"]
    assert result.budget_statuses == {"ok": 1, "truncated": 2}
    roomy = budget.model_copy(update={"max_length": 4096}).model_dump()
    again = build_shard(0, rows, str(images), str(output), 10**6, None, roomy)
    assert again.reused and again.budget_statuses == {"ok": 3}
    assert build_shard(0, rows, str(images), str(output), 10**6).budget_statuses == {}


def test_sequence_budget_needs_a_tokenizer():
    from mocha.model.tiny import tiny_model_config
    from pipelines.shard import SequenceBudget

    with pytest.raises(ValueError, match="needs a tokenizer"):
        SequenceBudget.of_model(tiny_model_config())
