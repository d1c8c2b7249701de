"""Training rows of any image format mix, and text-only samples, as Ray Data delivers them.

``read_webdataset`` gives every row of a block the member columns of every sample in that block,
filling the absent ones with NaN (or None). The tests build rows exactly that way for every
combination of sample kinds, and check that each sample decodes to its own image (or none) and
that a mixed micro-batch collates to one pixel row per image sample.
"""

from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from mocha.train.data import collate, decode_row, sample_members
from pipelines.features import decode_features
from pipelines.validation import IMAGE_EXTENSIONS, image_member, inspect_image, open_rgb

#: Every kind of sample a shard may hold: one per accepted image format, and text-only.
FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP"}
KINDS = (*FORMATS, "text")
COMBINATIONS = [c for n in range(1, len(KINDS) + 1) for c in itertools.combinations(KINDS, n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mocha.text.tokenizer import train_bpe_tokenizer

    texts = ["What colour? green", "Say hi. hi", "a b c d e f g h i j k l m n o p q r s t u v w x y z"] * 20
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def _image_bytes(fmt: str, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", (12, 8), colour)
    if fmt == "GIF":
        image = image.convert("P")
    image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _sample(index: int, kind: str) -> dict:
    colour = (40 * index % 256, 200, 17 * index % 256)
    if kind == "text":
        record = {"id": f"s{index}", "conversations": [{"from": "human", "value": "Say hi."},
                                                       {"from": "gpt", "value": "hi"}]}
        return {"__key__": f"{index:04d}", "json": json.dumps(record).encode()}
    record = {"id": f"s{index}", "image": f"img/{index}.{kind}",
              "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                {"from": "gpt", "value": "green"}]}
    return {"__key__": f"{index:04d}", "json": json.dumps(record).encode(), kind: _image_bytes(FORMATS[kind], colour)}


def _as_ray_block(samples: list[dict], fill=math.nan) -> list[dict]:
    """Rows as ``read_webdataset`` gives them: the union of the block's columns, NaN-filled."""
    columns = sorted({k for s in samples for k in s})
    return [{c: s.get(c, fill) for c in columns} for s in samples]


def _decode(row, tokenizer):
    return decode_row(row, tokenizer, "plain", max_length=256, num_image_tokens=3,
                      encoder_kinds=("clip",), from_features=False)


@pytest.mark.parametrize("combination", COMBINATIONS, ids="+".join)
@pytest.mark.parametrize("fill", [math.nan, None], ids=["nan", "none"])
def test_every_mix_of_formats_and_text_only_decodes_each_sample_to_its_own_image(combination, fill, tokenizer):
    samples = [_sample(i, kind) for i, kind in enumerate(combination * 2)]
    examples = [_decode(row, tokenizer) for row in _as_ray_block(samples, fill)]
    for sample, ex, kind in zip(samples, examples, combination * 2):
        if kind == "text":
            assert ex.image is None
            continue
        expected = Image.open(io.BytesIO(sample[kind])).convert("RGB")
        assert ex.image.mode == "RGB" and ex.image.size == (12, 8)
        assert np.array_equal(np.asarray(ex.image), np.asarray(expected))

    def preprocess(image):
        return {"clip": np.asarray(image, dtype=np.float32).mean() * np.ones((3, 2, 2), dtype=np.float32)}

    import torch

    batch = collate(examples, pad_token_id=0, preprocess=lambda im: {k: torch.from_numpy(v)
                                                                     for k, v in preprocess(im).items()})
    num_images = sum(kind != "text" for kind in combination * 2)
    assert batch.num_samples == len(samples) and batch.num_masked == 0
    assert (batch.pixel_values is None) == (num_images == 0)
    if num_images:
        assert batch.pixel_values["clip"].shape[0] == num_images


def test_sample_members_drops_columns_the_sample_does_not_have():
    row = {"__key__": "k", "json": b"{}", "jpg": math.nan, "png": b"\x89PNG", "webp": None}
    assert sample_members(row) == {"__key__": "k", "json": b"{}", "png": b"\x89PNG"}


def test_a_sample_with_two_images_or_an_image_without_a_record_image_is_refused(tokenizer):
    with pytest.raises(ValueError, match="2 image members"):
        image_member({"jpg": b"a", "png": b"b"}, "k")
    text = _sample(0, "text")
    text["png"] = _image_bytes("PNG", (1, 2, 3))
    with pytest.raises(ValueError, match="names no image"):
        _decode(text, tokenizer)
    image = _sample(1, "png")
    del image["png"]
    with pytest.raises(ValueError, match="holds no image member"):
        _decode(_as_ray_block([image, _sample(2, "jpg")])[0], tokenizer)


def test_jpeg_suffix_from_other_writers_is_an_image_member():
    blob = _image_bytes("JPEG", (9, 9, 9))
    assert image_member({"jpeg": blob, "jpg": math.nan}) == blob


@pytest.mark.parametrize("fmt", sorted(FORMATS.values()))
def test_every_format_the_shard_job_accepts_opens_as_rgb(fmt):
    blob = _image_bytes(fmt, (10, 20, 30))
    assert IMAGE_EXTENSIONS[fmt] == inspect_image(blob).extension  # `mocha data shard` keeps it
    assert open_rgb(blob).mode == "RGB"


def test_transparent_gif_and_animated_gif_open_as_their_first_frame():
    frames = [Image.new("P", (4, 4), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], transparency=0)
    image = open_rgb(buf.getvalue())
    assert image.mode == "RGB" and image.size == (4, 4)


def test_undecodable_image_bytes_name_the_sample():
    with pytest.raises(ValueError, match="sample 'bad'"):
        open_rgb(b"\x89PNG\r\n\x1a\n" + b"0" * 20, "bad")


def test_feature_rows_of_text_only_samples_in_a_mixed_block_have_no_features():
    buf = io.BytesIO()
    np.save(buf, np.ones((3, 4), dtype=np.float16))
    rows = _as_ray_block([{"__key__": "a", "json": b"{}", "clip.npy": buf.getvalue()},
                          {"__key__": "b", "json": b"{}"}])
    assert decode_features(rows[0])["clip"].shape == (3, 4)
    assert decode_features(rows[1]) == {}
