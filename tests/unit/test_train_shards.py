"""The training shard list: feature shards are used only with the shards they were made from."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from mocha.config import ConfigError
from mocha.model.tiny import tiny_model_config
from mocha.train.shards import load_shard_refs
from pipelines.features import FEATURES_FORMAT
from pipelines.tar_shards import ShardInfo

SHARDS = [ShardInfo("shard-000000.tar", 16, 100, "a" * 64), ShardInfo("shard-000001.tar", 9, 80, "b" * 64)]


def _write_shards(root, fingerprint: str) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "fingerprint": fingerprint, "num_samples": sum(s.count for s in SHARDS),
        "shards": [asdict(s) for s in SHARDS]}))
    return str(root)


def _write_features(root, source_url: str, fingerprint: str, model) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "format": FEATURES_FORMAT, "source": {"url": source_url, "fingerprint": fingerprint},
        "config_hash": model.encoder_config_hash(), "dtype": "float16", "encoders": [],
        "shards": [asdict(s) for s in SHARDS]}))
    return str(root)


def test_features_of_the_same_shards_train_even_from_a_copy(tmp_path):
    model = tiny_model_config()
    shards = _write_shards(tmp_path / "shards", "f" * 64)
    features = _write_features(tmp_path / "features", "s3://elsewhere/shards", "f" * 64, model)
    refs = load_shard_refs(shards, features, model)
    assert [(r.name, r.num_samples) for r in refs] == [(s.name, s.count) for s in SHARDS]
    assert all(r.url.startswith(features) for r in refs)


def test_features_of_a_rebuilt_shard_set_are_refused_before_training(tmp_path):
    """Same shard names and counts, other samples (a rebuild from changed inputs): only the
    source fingerprint tells them apart, and it must."""
    model = tiny_model_config()
    shards = _write_shards(tmp_path / "shards", "1" * 64)
    features = _write_features(tmp_path / "features", shards, "0" * 64, model)
    with pytest.raises(ConfigError, match="data.features: .*fingerprint 0{64}.*fingerprint 1{64}.*mocha data features"):
        load_shard_refs(shards, features, model)


def test_features_without_a_source_fingerprint_are_refused(tmp_path):
    model = tiny_model_config()
    shards = _write_shards(tmp_path / "shards", "1" * 64)
    features = _write_features(tmp_path / "features", shards, None, model)
    with pytest.raises(ConfigError, match="rebuilt or are another set"):
        load_shard_refs(shards, features, model)
