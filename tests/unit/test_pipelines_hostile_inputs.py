"""Hostile and odd inputs of `mocha data shard`: image paths that escape the root or cannot be
read, images a viewer shows fine that PIL's defaults mangle, and input files in the wrong
encoding or layout. Each case ends in a quarantine reason, an accepted image or a clear error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mocha.images import decode_rgb
from pipelines.records import InputFormatError, InputReader
from pipelines.validation import Reason, Rejection, check_record, inspect_image, read_image
from tests.pipelines_samples import good_record


def _reason_of_read(images, relative) -> Reason:
    with pytest.raises(Rejection) as err:
        read_image(images, relative)
    return err.value.reason


@pytest.fixture
def tree(tmp_path):
    """images/ (the root) with a good file, plus outside/ that only links reach."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    (images / "sub" / "good.png").write_bytes(b"inside")
    (outside / "secret.png").write_bytes(b"outside")
    return images, outside


def test_symlinks_out_of_the_root_are_quarantined_file_or_folder(tree):
    images, outside = tree
    (images / "file_link.png").symlink_to(outside / "secret.png")
    (images / "dir_link").symlink_to(outside, target_is_directory=True)
    (images / "sub" / "up").symlink_to("../..")  # relative link climbing out of the root
    (images / "ok_link.png").symlink_to(images / "sub" / "good.png")
    for rel in ("file_link.png", "dir_link/secret.png", "sub/up/outside/secret.png"):
        assert _reason_of_read(str(images), rel) == Reason.OUTSIDE_ROOT, rel
    assert read_image(str(images), "ok_link.png") == b"inside"  # a link that stays inside is fine
    assert read_image(str(images), "sub/good.png") == b"inside"


def test_odd_paths_become_reasons_not_exceptions(tree):
    images, _ = tree
    (images / "folder.png").mkdir()
    os.mkfifo(images / "pipe.png")  # would block a plain open()
    (images / "loop.png").symlink_to(images / "loop.png")
    assert _reason_of_read(str(images), "folder.png") == Reason.NOT_A_FILE
    assert _reason_of_read(str(images), "pipe.png") == Reason.NOT_A_FILE
    assert _reason_of_read(str(images), "sub/good.png/x.png") == Reason.NOT_A_FILE  # a file used as a folder
    assert _reason_of_read(str(images), "nope.png") == Reason.MISSING_IMAGE
    assert _reason_of_read(str(images), "a\x00b.png") == Reason.INVALID_PATH
    assert _reason_of_read(str(images), "y" * 300 + ".png") == Reason.INVALID_PATH
    assert _reason_of_read(str(images), "loop.png") == Reason.INVALID_PATH


@pytest.mark.parametrize("image, reason", [
    ("a\x00b.png", Reason.INVALID_PATH),
    ("d/" + "n" * 256 + ".png", Reason.INVALID_PATH),
    ("/".join(["d" * 200] * 21) + ".png", Reason.INVALID_PATH),  # > 4095 bytes in all
])
def test_record_check_rejects_paths_no_filesystem_takes(image, reason):
    with pytest.raises(Rejection) as err:
        check_record(good_record("p", image))
    assert err.value.reason == reason


def test_unreadable_file_is_quarantined(tree):
    """A file without read permission (checked as an unprivileged user when run as root)."""
    images, _ = tree
    target = images / "sub" / "good.png"
    target.chmod(0)
    code = ("import os, sys; from pipelines.validation import read_image, Rejection\n"
            "import mocha.io.storage  # imported before giving up root (the stdlib may be root-only)\n"
            "if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)\n"
            "try: read_image(sys.argv[1], 'sub/good.png'); print('read')\n"
            "except Rejection as r: print(r.reason.value)\n")
    images.chmod(0o755)
    (images / "sub").chmod(0o755)
    images.parent.chmod(0o755)
    out = subprocess.run([sys.executable, "-c", code, str(images)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, cwd=os.getcwd())
    assert out.stdout.strip() == Reason.UNREADABLE_FILE.value, out.stderr[-2000:]


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_mpo_camera_jpeg_is_accepted_as_jpg():
    first, second = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (40, 30), (10, 10, 200))
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert inspect_image(data).extension == "jpg"
    r, g, b = np.asarray(decode_rgb(data)).reshape(-1, 3).mean(axis=0)
    assert r > 150 and b < 60  # the first picture


def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    data = _png(Image.fromarray(ramp))
    assert inspect_image(data).extension == "png"
    rgb = np.asarray(decode_rgb(data)).astype(int)
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257.0), atol=1)
    assert abs(rgb.mean() - 127) < 2  # convert("RGB") gives ~254 here


def test_palette_alpha_cmyk_show_as_a_viewer_shows_them():
    # Palette with a transparent index over white; RGBA half transparent; LA; CMYK JPEG.
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    pal_rgb = np.asarray(decode_rgb(_png(pal, transparency=0)))
    assert (pal_rgb[:, :4] == [255, 0, 0]).all() and (pal_rgb[:, 4:] == 255).all()  # transparent -> white
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (np.asarray(decode_rgb(_png(rgba))) == 255).all()  # convert("RGB") would give black
    half = Image.new("RGBA", (4, 4), (0, 0, 255, 128))
    assert np.allclose(np.asarray(decode_rgb(_png(half)))[0, 0], [127, 127, 255], atol=2)
    la = Image.new("LA", (4, 4), (0, 0))
    assert (np.asarray(decode_rgb(_png(la))) == 255).all()
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)  # red in CMYK
    assert inspect_image(buf.getvalue()).extension == "jpg"
    r, g, b = np.asarray(decode_rgb(buf.getvalue())).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    shown = np.asarray(decode_rgb(buf.getvalue())).astype(int)
    assert shown.shape == (40, 20, 3)  # portrait, as a viewer shows it
    assert shown[5, 10, 0] > 200 and shown[35, 10, 2] > 200  # red on top after the rotation


def test_truncated_jpeg_still_fails_the_decode_check():
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, format="JPEG")
    data = buf.getvalue()
    assert inspect_image(data).extension == "jpg"
    with pytest.raises(Rejection) as err:
        inspect_image(data[: len(data) * 2 // 3])
    assert err.value.reason == Reason.UNREADABLE_IMAGE


# -- input files ------------------------------------------------------------------------------------

def test_utf8_bom_is_accepted_in_both_layouts(tmp_path):
    records = [good_record("a", None), good_record("b", None)]
    (tmp_path / "l.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    (tmp_path / "l.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(r).encode() for r in records))
    for name in ("l.json", "l.jsonl"):
        got = list(InputReader(str(tmp_path / name)))
        assert [r.value for r in got] == records and all(r.error is None for r in got), name


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_are_a_clear_error(tmp_path, encoding):
    path = tmp_path / "wide.json"
    path.write_bytes(json.dumps([good_record("a", None)]).encode(encoding))
    with pytest.raises(InputFormatError, match="UTF-(16|32).*must be UTF-8"):
        list(InputReader(str(path)))


@pytest.mark.parametrize("text", [
    json.dumps({"data": [good_record("a", None), good_record("b", None)]}),  # one line
    json.dumps({"data": [good_record("a", None)]}, indent=2),  # pretty-printed
    "{\n" + '"id": "a",\n"conversations": []\n' + "}\n",
])
def test_top_level_object_is_a_clear_error_naming_the_layout(tmp_path, text):
    path = tmp_path / "obj.json"
    path.write_text(text)
    with pytest.raises(InputFormatError, match="expected a JSON list of records"):
        list(InputReader(str(path)))


def test_json_lines_of_records_still_parse(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(json.dumps(good_record(f"r{i}", None)) for i in range(3)) + "\n")
    assert [r.value["id"] for r in InputReader(str(path))] == ["r0", "r1", "r2"]
