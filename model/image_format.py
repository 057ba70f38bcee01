"""What image bytes claim to be, shared by catalogue validation and query uploads."""

from __future__ import annotations

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
