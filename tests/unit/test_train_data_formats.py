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

from mocha.images import decode_rgb
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
        expected = decode_rgb(sample[kind])  # the one decoding path (training, features, eval)
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


def _mpo_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), colour).save(buf, format="MPO", save_all=True,
                                           append_images=[Image.new("RGB", (12, 8), (0, 0, 255))])
    return buf.getvalue()


@pytest.mark.parametrize("fmt", sorted(IMAGE_EXTENSIONS))
def test_every_format_the_shard_job_accepts_is_an_image_member_and_opens_as_rgb(fmt):
    colour = (51, 102, 153)  # in the web palette a GIF is quantised to
    blob = _mpo_bytes(colour) if fmt == "MPO" else _image_bytes(fmt, colour)
    ext = inspect_image(blob).extension
    assert ext == IMAGE_EXTENSIONS[fmt]  # `mocha data shard` stores it under this suffix
    assert image_member({"__key__": "k", "json": b"{}", ext: blob}, "k") == blob  # the trainer finds it there
    image = open_rgb(blob)
    assert image.mode == "RGB" and image.size == (12, 8)
    assert np.abs(np.asarray(image, dtype=int) - colour).max() <= 8  # MPO: its first picture, not the blue one


def test_transparent_gif_and_animated_gif_open_as_their_first_frame_over_white():
    """Decoded the viewer's way (``mocha.images.decode_rgb``): transparent pixels over white,
    not PIL ``convert("RGB")``'s palette colour; an animated GIF gives its first frame."""
    first = Image.new("P", (4, 4), 1)
    first.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30])
    first.putpixel((0, 0), 0)  # palette index 0 is the transparent one
    second = Image.new("P", (4, 4), 2)
    second.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30])
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=[second], transparency=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    image = np.asarray(open_rgb(buf.getvalue()))
    assert image.shape == (4, 4, 3)
    assert tuple(image[0, 0]) == (255, 255, 255)  # transparent: white, as a viewer shows it
    assert tuple(image[3, 3]) == (200, 30, 30)  # opaque pixels of the first frame


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
