"""What image bytes claim to be, and how decoded pixels become the model's RGB: shared by
catalogue validation, indexing, training and query uploads, so that a photo is seen the same
way as a catalogue image and as a query."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Leading bytes of the formats Pillow reads: a file that starts like an image but does not
# parse is a corrupt image, not a non-image.
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
# Phone cameras write multi-picture JPEGs, which Pillow names MPO; they are JPEGs to a user.
_FORMAT_ALIASES = {"MPO": "JPEG"}


def signature(data: bytes) -> str:
    """The image format the first bytes announce, or ``""``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), "")


def canonical_format(pillow_format: str | None) -> str:
    """Pillow's format name as users know it (``MPO`` is ``JPEG``); ``""`` when unknown."""
    name = pillow_format or ""
    return _FORMAT_ALIASES.get(name, name)


# Grayscale modes wider than 8 bits (16-bit PNGs open as ``I;16``, older Pillow said ``I``).
# Pillow's ``convert("RGB")`` clips their values at 255, which turns a photo nearly white.
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB (the same object when it already is); 16-bit grayscale is scaled
    to 8 bits first rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GRAY_MODES:
        eight_bit = np.clip(np.asarray(image, dtype=np.float32) / 257.0 + 0.5, 0, 255)
        image = Image.fromarray(eight_bit.astype(np.uint8), "L")
    return image.convert("RGB")


def decode_scaled(image: Image.Image, short_side: int | None) -> None:
    """Let a JPEG that has not been decoded yet decode at 1/2, 1/4 or 1/8 of its size
    (libjpeg's DCT scaling) while both sides stay at least ``short_side``, the side the
    model's preprocessing resizes to; other formats and small images decode as they are.

    A 12 MP phone photo decodes and is prepared for Lite0 in about a tenth of the time, and
    its embedding stays within cosine 0.998 of the full decode's (``bench/bench_decode.py``).
    Catalogue photos (index, evaluation, canary) and query uploads go through it alike, so
    both sides see the same pixels; training crops keep full size.
    """
    if short_side:
        image.draft(image.mode, (short_side, short_side))


def upright_rgb(image: Image.Image) -> Image.Image:
    """A decoded image turned by its EXIF orientation (unreadable EXIF is ignored) and in RGB.

    The orientation is applied in place and an RGB image is returned as it is: each copy
    would cost about 0.05 ms on a 224 px photo, on every query.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as err:  # malformed EXIF: the pixels are fine, keep them as stored
        log.debug("ignoring unreadable EXIF orientation: %s: %s", type(err).__name__, err)
    return rgb(image)
