"""The training shard list, read from the pipelines' manifests (text/image shards, and the
aligned feature shards when training from features), checked before any worker starts."""

from __future__ import annotations

import json

from mocha.config import ConfigError, ModelConfig
from mocha.train.data import ShardRef
from mocha.io.layout import MANIFEST_NAME



def _read_manifest(url: str, what: str) -> dict:
    from mocha.io import storage

    manifest_url = storage.join_url(url, MANIFEST_NAME)
    try:
        return json.loads(storage.read_bytes(manifest_url))
    except FileNotFoundError:
        raise ConfigError(f"{what}: no {MANIFEST_NAME} at {url} (build it with `mocha data "
                          f"{'features' if what == 'data.features' else 'shard'}`)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: {manifest_url} is not valid JSON: {e}") from None
    except (OSError, ValueError) as e:  # unreachable bucket, no credentials, bad URL
        raise ConfigError(f"{what}: cannot read {manifest_url}: {e}") from None


def verify_shard_files(shards_url: str, checksums: bool = False) -> int:
    """Check that every shard the manifest lists is there with its recorded size (and, with
    ``checksums``, its SHA-256), so a manifest that no longer describes the files is caught
    before training; returns the number of shards checked. Raises ``ConfigError`` naming the
    first shards that differ."""
    from mocha.io import storage
    from pipelines.tar_shards import sha256_of

    manifest = _read_manifest(shards_url, "data.shards")
    problems = []
    for shard in manifest.get("shards", []):
        url = storage.join_url(shards_url, shard["name"])
        size = storage.file_size(url)
        if size is None:
            problems.append(f"{shard['name']} is missing")
        elif size != shard["size"]:
            problems.append(f"{shard['name']} has {size} bytes, the manifest says {shard['size']}")
        elif checksums and sha256_of(url) != shard["sha256"]:
            problems.append(f"{shard['name']} has a different SHA-256 than the manifest records")
        if len(problems) >= 5:
            break
    if problems:
        raise ConfigError(f"data.shards: {MANIFEST_NAME} at {shards_url} does not describe the shards there: "
                          + "; ".join(problems) + ". Rebuild with `mocha data shard`.")
    return len(manifest.get("shards", []))


def load_shard_refs(shards_url: str, features_url: str | None, model: ModelConfig) -> list[ShardRef]:
    """Shards to train on, in manifest order. From features: the feature shards (which carry the
    conversation json too), after checking that they were computed from exactly these shards
    (the source fingerprint) and for exactly the model's encoders (the encoder config hash)."""
    from mocha.io import storage

    manifest = _read_manifest(shards_url, "data.shards")
    shards = [(s["name"], int(s["count"])) for s in manifest["shards"]]
    if not shards:
        raise ConfigError(f"data.shards: the manifest at {shards_url} lists no shards")
    if features_url is None:
        return [ShardRef(name, storage.join_url(shards_url, name), n) for name, n in shards]
    from pipelines.features import FeatureManifest

    try:
        features = FeatureManifest.load(features_url)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.features: {e}") from None
    try:
        features.check_source(shards_url, manifest)
        features.check_compatible(model)
    except ValueError as e:
        raise ConfigError(f"data.features: {e}") from None
    counts = {s.name: s.count for s in features.shards}
    missing = [name for name, _ in shards if name not in counts]
    if missing:
        raise ConfigError(f"data.features: {len(missing)} shard(s) have no features yet (e.g. {missing[0]}); "
                          "run `mocha data features` to finish")
    bad = [name for name, n in shards if counts[name] != n]
    if bad:
        raise ConfigError(f"data.features: sample counts differ from the shard manifest for {bad[:3]}")
    return [ShardRef(name, storage.join_url(features_url, name), n) for name, n in shards]
