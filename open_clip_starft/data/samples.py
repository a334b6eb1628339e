"""The sample format shared by training, eval and the tools.

A sample is a webdataset record: ``__key__``, one image under one of ``IMAGE_KEYS`` (encoded
bytes), an integer class id under ``cls`` and optionally a ``group`` id and other fields.
Here: the image keys, label parsing, image decoding to 8-bit RGB that is correct for 16- and
32-bit images (``to_rgb``, ``open_rgb``), and the one tar shard writer (``write_shard``,
``write_shards``, ``brace_pattern``).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# Pillow modes that hold more than 8 bits per pixel (one channel); ``.convert("RGB")`` clips them.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def parse_label(raw) -> int | None:
    """An integer class id from a ``cls`` field (bytes, str or int); None when unusable."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        value = float(raw) if not isinstance(raw, int) else raw
    except (TypeError, ValueError):
        return None
    if value != value or int(value) != value:  # NaN or fractional
        return None
    return int(value)


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """A one-channel 16/32-bit image as 8-bit ``L``, scaled (not clipped).

    ``I;16*`` (16-bit, 0..65535) is divided by 257, so 65535 → 255. ``I`` (32-bit integer) and
    ``F`` (32-bit float) carry no declared range: ``F`` with values in [0, 1] is taken as
    0..1, values up to 255 are kept, up to 65535 are read as 16-bit (÷257, how Pillow opens
    some 16-bit files), larger ones are scaled by their maximum.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale = 1 / 257
    else:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0:  # signed data: shift to start at 0
            values, hi = values - lo, hi - lo
        if image.mode == "F" and hi <= 1.0:
            scale = 255.0
        elif hi <= 255:
            scale = 1.0
        elif hi <= 65535:
            scale = 1 / 257
        else:
            scale = 255.0 / hi
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit and 32-bit modes (``I;16``, ``I;16B``, ``I;16L``, ``I``,
    ``F``) are scaled to 8 bit (``_high_bit_to_l``), not clipped to white as ``.convert("RGB")``
    does; every other mode (L, P, LA, RGBA, CMYK, 1, ...) goes through Pillow's ``.convert("RGB")``."""
    if image.mode in _HIGH_BIT_MODES:
        image = _high_bit_to_l(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb(source) -> Image.Image:
    """Decode an image file (a path, encoded ``bytes`` or a binary file object) to 8-bit RGB
    through ``to_rgb``; the pixels are read here, so a truncated or corrupt file raises here."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    elif isinstance(source, os.PathLike):
        source = os.fspath(source)
    with Image.open(source) as image:
        image.load()
        return to_rgb(image)
