"""`mocha data shard|features`: documented options, config loading, clean errors before Ray starts."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from mocha.cli import build_parser, main
from mocha.config import ConfigError
from mocha.model.tiny import tiny_model_config
from pipelines import cli


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", ["shard", "features"])
def test_help_documents_every_option(name):
    parser = _subparser(name)
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[0] in text and action.help, action.dest


def test_data_is_a_mocha_subcommand():
    args = build_parser().parse_args(["data", "shard", "--input", "a.json", "--images", "im", "--output", "o"])
    assert (args.command, args.data_command, args.samples_per_shard) == ("data", "shard", 1000)


def test_model_config_from_a_model_or_a_job_yaml(tmp_path):
    model = tiny_model_config()
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(json.loads(model.model_dump_json())))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"stage": 1, "model": json.loads(model.model_dump_json())}))
    for name in ("model.yaml", "job.yaml"):
        assert cli.load_model_config(str(tmp_path / name)).encoder_config_hash() == model.encoder_config_hash()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"encoders": [{"kind": "resnet"}]}}))
    with pytest.raises(ConfigError, match="encoders.0.kind"):
        cli.load_model_config(str(tmp_path / "bad.yaml"))


def test_missing_inputs_fail_with_a_message_before_ray_starts(tmp_path, capsys):
    assert main(["data", "shard", "--input", str(tmp_path / "no.json"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 2
    assert "input file not found" in capsys.readouterr().err
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(json.loads(tiny_model_config().model_dump_json())))
    assert main(["data", "features", "--shards", str(tmp_path), "--model-config", str(tmp_path / "m.yaml")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["data", "shard", "--input", "x", "--images", "y", "--output", "z", "--samples-per-shard", "0"]) == 2
    assert "samples_per_shard" in capsys.readouterr().err


def test_help_says_what_happens_to_odd_input_files_and_outputs():
    text = " ".join(_subparser("shard").format_help().split())
    for phrase in ("byte-order mark is fine", "UTF-16/32 text", "top-level JSON object", "exits 3 with the counts",
                   "--overwrite", "outside_root", "Exit status: 0 built; 2", "first *good* copy"):
        assert phrase in text, phrase


@pytest.mark.parametrize("content, message", [
    ('[{"id": "a"}]'.encode("utf-16"), "UTF-16 text; the input must be UTF-8"),
    (json.dumps({"data": [{"id": "a", "conversations": []}]}).encode(), "JSON object holding a list under 'data'"),
])
def test_unusable_input_files_fail_with_exit_2_before_ray_starts(tmp_path, capsys, content, message):
    (tmp_path / "in.json").write_bytes(content)
    assert main(["data", "shard", "--input", str(tmp_path / "in.json"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_empty_input_exits_3_before_ray_starts(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(b"\n\n")
    assert main(["data", "shard", "--input", str(tmp_path / "in.jsonl"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 3
    assert "the input has no records (0 accepted, 0 quarantined)" in capsys.readouterr().err


def test_sequence_budget_without_a_usable_tokenizer_exits_2_before_ray_starts(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": json.loads(tiny_model_config().model_dump_json())}))
    record = {"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n")
    shard = ["data", "shard", "--input", str(tmp_path / "in.jsonl"), "--images", str(tmp_path),
             "--output", str(tmp_path / "o"), "--model-config", str(tmp_path / "job.yaml")]
    assert main(shard) == 2
    assert "the sequence budget needs a tokenizer" in capsys.readouterr().err
    assert main([*shard, "--tokenizer", str(tmp_path / "no-such-tokenizer")]) == 2
    assert "sequence budget: cannot tokenise with" in capsys.readouterr().err and not (tmp_path / "o").exists()
