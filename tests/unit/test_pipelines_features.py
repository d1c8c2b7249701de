"""Feature encoding of one shard in-process (the actor's work, no Ray) and the manifest checks."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mocha.config import EncoderConfig
from mocha.model.tiny import tiny_encoder_configs, tiny_model_config
from pipelines.features import EncoderFeatureInfo, FeatureEncoder, FeatureManifest, FeatureMismatchError, decode_features
from pipelines.tar_shards import iter_tar_samples, write_tar_shard
from tests.pipelines_samples import encode_image


@pytest.fixture(scope="module")
def source_shard(tmp_path_factory):
    """A shard of 8 samples: images (PNG/JPEG, various sizes) with two text-only samples among them."""
    rng = random.Random(0)
    url = str(tmp_path_factory.mktemp("src") / "shard-000000.tar")
    samples = []
    with write_tar_shard(url) as shard:
        for i in range(8):
            key = f"{i:010d}-s{i}"
            shard.add(f"{key}.json", json.dumps({"id": f"s{i}"}).encode())
            image = None
            if i not in (2, 5):
                fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
                image = encode_image(rng, fmt, (rng.randint(20, 60), rng.randint(20, 60)))
                shard.add(f"{key}.{ext}", image)
            samples.append((key, image))
    return url, samples


def _encode(source, tmp_path, dtype: str, batch_size: int, pad_to_square: bool = True):
    encoder_cfgs = [c.model_dump() for c in tiny_encoder_configs()]
    actor = FeatureEncoder(encoder_cfgs, dtype=dtype, batch_size=batch_size, output=str(tmp_path), use_gpu=False,
                           pad_to_square=pad_to_square)
    info = actor.encode_shard(source, str(tmp_path / "shard-000000.tar"))
    return info, dict(iter_tar_samples(str(tmp_path / "shard-000000.tar")))


@pytest.mark.parametrize("dtype, pad_to_square", [("float32", True), ("float16", True), ("float32", False)])
def test_features_equal_the_in_process_encoders_on_the_same_batches(source_shard, tmp_path, dtype, pad_to_square):
    from mocha.model.mocha import MochaModel
    from mocha.model.tiny import tiny_model_config

    url, samples = source_shard
    info, out = _encode(url, tmp_path, dtype, batch_size=3, pad_to_square=pad_to_square)
    assert info.count == 8 and list(out) == [key for key, _ in samples]  # aligned, same order
    # Reference: the model's own image path (MochaModel.preprocess: the shared pad to a square,
    # then each encoder's processor) with encoders built from the same configs (seeded init).
    model = MochaModel(tiny_model_config(pad_to_square=pad_to_square))
    encoders = model.encoders
    with_images = [(key, image) for key, image in samples if image is not None]
    for start in range(0, len(with_images), 3):
        batch = with_images[start:start + 3]
        pil = [Image.open(io.BytesIO(image)).convert("RGB") for _, image in batch]
        for kind, encoder in encoders.items():
            ref = encoder(torch.stack([model.preprocess(im)[kind] for im in pil])).numpy().astype(dtype)
            for row, (key, _) in enumerate(batch):
                got = decode_features(out[key])[kind]
                assert got.dtype == np.dtype(dtype) and got.shape == (encoder.num_tokens, encoder.hidden_size)
                assert got.tobytes() == ref[row].tobytes(), (kind, key)
    for key, image in samples:
        assert out[key]["json"] == json.dumps({"id": key.split("-")[1]}).encode()
        if image is None:
            assert set(out[key]) == {"json"} and decode_features(out[key]) == {}
        else:
            assert set(out[key]) == {"json"} | {f"{c.kind}.npy" for c in tiny_encoder_configs()}


def test_feature_shards_are_byte_identical_across_runs(source_shard, tmp_path):
    url, _ = source_shard
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, _ = _encode(url, tmp_path / "a", "float32", batch_size=4)
    b, _ = _encode(url, tmp_path / "b", "float32", batch_size=4)
    assert a == b and (tmp_path / "a" / a.name).read_bytes() == (tmp_path / "b" / b.name).read_bytes()


def test_manifest_refuses_features_of_another_encoder_config():
    model = tiny_model_config()
    manifest = FeatureManifest(url="s3://b/features", config_hash=model.encoder_config_hash(), dtype="float32",
                               encoders=[EncoderFeatureInfo("clip", "random-init(seed=0)", 32, 16, 64)], shards=[],
                               source={})
    manifest.check_compatible(model)
    other_seed = tiny_model_config(encoders=[c.model_copy(update={"init_seed": 1}) for c in tiny_encoder_configs()])
    subset = tiny_model_config(encoders=[EncoderConfig(kind="clip", image_size=32, config=tiny_encoder_configs()[2].config)])
    for bad in (other_seed, subset):
        with pytest.raises(FeatureMismatchError, match="recompute them"):
            manifest.check_compatible(bad)
