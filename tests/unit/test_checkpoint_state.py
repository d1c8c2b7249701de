"""A checkpoint's state.json is validated like a job YAML (strict schema, file and field named),
and a job's tokenizer is checked on the driver before any worker starts."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import yaml

from mocha.config import ConfigError
from mocha.train.checkpoint import FORMAT_VERSION, read_checkpoint_state
from mocha.train.checkpoint_state import parse_checkpoint_state
from mocha.train.job import load_job
from mocha.train.launcher import check_inputs
from tests.unit.test_job_and_data_plan import ROOT


def _state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"format_version": FORMAT_VERSION, "world_size": 2, "global_steps": 30, "global_samples": 240, "skipped_steps": 0,
            "optimizer": {"step": 30, "lr": 2e-5}, "scheduler": {"last_epoch": 30},
            "rng": [{"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}] * 2,
            "extra_state": {"epoch": 0, "consumed": 240}}


def test_a_saved_state_round_trips(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps(_state(), indent=1))
    state = read_checkpoint_state(str(tmp_path))
    assert state["global_steps"] == 30 and state["optimizer"]["lr"] == 2e-5 and state["extra_state"]["consumed"] == 240
    version, internal, gauss = state["rng"][1]["python"]
    random.setstate((version, tuple(internal), gauss))  # the values still restore a generator


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.update(global_steps="30"), "global_steps: Input should be a valid integer"),
    (lambda s: s.update(global_samples=-8), "global_samples: Input should be greater than or equal to 0"),
    (lambda s: s["optimizer"].update(lr=float("nan")), "optimizer.lr"),
    (lambda s: s["optimizer"].update(lr=float("inf")), "optimizer.lr"),
    (lambda s: s["optimizer"].update(step=True), "optimizer.step"),
    (lambda s: s.update(world_size=0), "world_size"),
    (lambda s: s.update(rng=s["rng"][:1]), "1 rank states for world_size 2"),
    (lambda s: s.pop("scheduler"), "scheduler: Field required"),
    (lambda s: s.update(surprise=1), "surprise: Extra inputs are not permitted"),
    (lambda s: s.update(format_version=7), "format_version: checkpoint format 7"),
])
def test_bad_state_fails_naming_file_and_field(tmp_path, mutate, field):
    state = _state()
    mutate(state)
    path = tmp_path / "checkpoint_000003" / "state.json"
    path.parent.mkdir()
    path.write_text(json.dumps(state))  # Python's json writes NaN / Infinity literals
    with pytest.raises(ConfigError) as err:
        read_checkpoint_state(str(path.parent))
    assert str(path) in str(err.value) and field in str(err.value)


def test_damaged_or_missing_state(tmp_path):
    (tmp_path / "state.json").write_text('{"format_version": 1, "world_')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_checkpoint_state(str(tmp_path))
    with pytest.raises(ConfigError, match="top level must be an object"):
        parse_checkpoint_state("[1, 2]", "x/state.json", expected_version=FORMAT_VERSION)
    with pytest.raises(FileNotFoundError, match="no state.json"):
        read_checkpoint_state(str(tmp_path / "nope"))


def test_missing_tokenizer_fails_before_any_worker_starts(tmp_path):
    data = b"tar bytes"
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(data)
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"shards": [
        {"name": "shard-000000.tar", "count": 1, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}))
    job_data = yaml.safe_load((ROOT / "jobs" / "stage1.yaml").read_text())
    job_data["data"] = {"shards": str(tmp_path / "shards")}
    job_data["tokenizer"] = str(tmp_path / "no-such-tokenizer")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_data))
    job = load_job(tmp_path / "job.yaml")
    with pytest.raises(ConfigError, match=r"^tokenizer: cannot load a tokenizer from .*no-such-tokenizer"):
        check_inputs(job)
