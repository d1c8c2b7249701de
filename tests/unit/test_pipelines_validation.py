"""Record and image checks of the shard job: every quarantine reason, and sample keys."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from pipelines.validation import Reason, Rejection, check_record, inspect_image, sample_key
from tests.pipelines_samples import encode_image, good_record


def _reason(record, seen=None) -> Reason:
    with pytest.raises(Rejection) as err:
        check_record(record, set() if seen is None else seen)
    return err.value.reason


def test_good_records_pass_and_register_their_id():
    seen: set[str] = set()
    checked = check_record(good_record("a", "x/1.png", turns=2), seen)
    assert (checked.sample_id, checked.image) == ("a", "x/1.png")
    assert check_record(good_record(7, None), seen).image is None
    assert seen == {"a", "7"}


@pytest.mark.parametrize("record, reason", [
    (["a"], Reason.MALFORMED_RECORD),
    ({"conversations": []}, Reason.MALFORMED_RECORD),
    ({**good_record("a", "x.png"), "image": "/etc/passwd"}, Reason.MALFORMED_RECORD),
    ({**good_record("a", "x.png"), "image": "../up.png"}, Reason.MALFORMED_RECORD),
    ({**good_record("a", "x.png"), "image": 3}, Reason.MALFORMED_RECORD),
    ({"id": "a", "conversations": []}, Reason.EMPTY_CONVERSATION),
    ({"id": "a"}, Reason.EMPTY_CONVERSATION),
    ({"id": "a", "conversations": "hi"}, Reason.MALFORMED_CONVERSATION),
    ({"id": "a", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]},
     Reason.MALFORMED_CONVERSATION),
    ({"id": "a", "conversations": [{"from": "system", "value": "x"}]}, Reason.MALFORMED_CONVERSATION),
    ({"id": "a", "conversations": [{"from": "human", "value": "q"}]}, Reason.MALFORMED_CONVERSATION),
    ({"id": "a", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     Reason.NON_ALTERNATING_ROLES),
    ({"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
     Reason.NON_ALTERNATING_ROLES),
    ({"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     Reason.IMAGE_TOKEN_MISMATCH),
    ({"id": "a", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
     Reason.IMAGE_TOKEN_MISMATCH),
    ({"id": "a", "image": "x.png",
      "conversations": [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]},
     Reason.IMAGE_TOKEN_MISMATCH),
])
def test_bad_records_are_classified(record, reason):
    assert _reason(record) == reason


def test_duplicate_id_rejects_the_later_record_only():
    seen: set[str] = set()
    check_record(good_record("dup", None), seen)
    assert _reason(good_record("dup", "x.png"), seen) == Reason.DUPLICATE_ID
    # A rejected record does not claim its id.
    seen2: set[str] = set()
    assert _reason({"id": "z", "conversations": []}, seen2) == Reason.EMPTY_CONVERSATION
    assert check_record(good_record("z", None), seen2).sample_id == "z"


def test_sample_keys_are_safe_unique_and_deterministic():
    ids = ["a.b/c d", "a.b/c d", "", "ünïcödé", "x" * 200]
    keys = [sample_key(i, s) for i, s in enumerate(ids)]
    assert len(set(keys)) == len(keys)
    assert keys == [sample_key(i, s) for i, s in enumerate(ids)]
    for key in keys:
        assert "." not in key and "/" not in key and len(key) <= 60
        assert all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    assert keys[0] == "0000000000-a_b_c_d" and keys[2] == "0000000002"
    assert sorted(keys) == keys  # zero padding keeps input order


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp")])
def test_inspect_accepts_complete_images(fmt, ext):
    info = inspect_image(encode_image(random.Random(0), fmt, (20, 30)))
    assert (info.extension, info.width, info.height) == (ext, 20, 30)


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    return buf.getvalue()


@pytest.mark.parametrize("make, reason", [
    (lambda png, jpg: png[: len(png) // 2], Reason.UNREADABLE_IMAGE),
    (lambda png, jpg: jpg[: len(jpg) * 2 // 3], Reason.UNREADABLE_IMAGE),
    (lambda png, jpg: png[:40], Reason.UNREADABLE_IMAGE),
    (lambda png, jpg: b"GIF? no, plain text", Reason.NOT_AN_IMAGE),
    (lambda png, jpg: b"", Reason.NOT_AN_IMAGE),
    (lambda png, jpg: _bmp(), Reason.UNSUPPORTED_IMAGE_FORMAT),
])
def test_inspect_rejects_bad_bytes(make, reason):
    rng = random.Random(1)
    png, jpg = encode_image(rng, "PNG", (64, 64)), encode_image(rng, "JPEG", (64, 64))
    with pytest.raises(Rejection) as err:
        inspect_image(make(png, jpg))
    assert err.value.reason == reason


def test_pixel_limit_is_checked_before_decoding():
    data = encode_image(random.Random(2), "PNG", (50, 40))
    assert inspect_image(data, max_pixels=2000).width == 50
    with pytest.raises(Rejection) as err:
        inspect_image(data, max_pixels=1999)
    assert err.value.reason == Reason.IMAGE_TOO_LARGE and "2000 pixels" in err.value.detail
