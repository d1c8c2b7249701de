"""Decode an image to the 8-bit RGB picture an image viewer shows.

``Image.open(...).convert("RGB")`` is not that for several common files:

* 16-bit greyscale (PNG ``I;16``, ``I``): PIL clips each value to 255, so nearly every pixel
  turns white. Here values are scaled from the image's range (0..65535) to 0..255.
* EXIF orientation (phone and camera JPEGs): the pixels are stored sideways and the viewer
  rotates them. Here the orientation tag is applied (``ImageOps.exif_transpose``).
* Transparency (RGBA, LA, palette with a transparent index): ``convert("RGB")`` keeps whatever
  colour the transparent pixels happen to hold (often black). Here they are composited over
  white, like a browser shows a transparent image on a white page.
* Palette, CMYK and 1-bit images go through PIL's conversions (CMYK JPEGs from Adobe
  software are inverted by PIL's decoder already).

Training (``mocha.train.data``), feature precompute (``pipelines.features``) and evaluation
use :func:`to_viewer_rgb`, so a shard's bytes mean the same picture everywhere.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_WHITE = (255, 255, 255)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer greyscale image as 8-bit ``L``, scaled (not clipped)."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _float_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def to_viewer_rgb(image: Image.Image) -> Image.Image:
    """``image`` as the 8-bit RGB picture a viewer shows (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):
        return _sixteen_bit_to_l(image).convert("RGB")
    if mode == "F":
        return _float_to_l(image).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to the viewer's RGB (fully loaded; the file is not kept open)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_viewer_rgb(image)


def open_rgb(path) -> Image.Image:
    """Open an image file as the viewer's RGB."""
    with Image.open(path) as image:
        image.load()
        return to_viewer_rgb(image)
