"""Decoding an uploaded query image safely, with one typed error per way it can be refused.

Checks run cheapest first and no pixel is decoded before the header has passed every limit:
size in bytes, declared content type, what Pillow identifies, format, width x height, shortest
side; only then are the pixels decoded (catching truncated and corrupt files), EXIF orientation
applied and the image converted to RGB. :class:`UploadError` carries the HTTP status and a
machine code, so the service maps it to a response in one exception handler.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from model.image_format import canonical_format, decode_scaled, signature, upright_rgb

# HTTP status answered for each refusal code.
STATUS_BY_CODE: dict[str, int] = {
    "empty_upload": 400,
    "upload_too_large": 413,
    "unsupported_media_type": 415,
    "not_an_image": 400,
    "format_not_allowed": 415,
    "too_many_pixels": 413,
    "image_too_small": 400,
    "corrupt_image": 400,
}

# MIME types clients send for each Pillow format (the first is the canonical one).
_MIME_TYPES: dict[str, tuple[str, ...]] = {
    "JPEG": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "PNG": ("image/png", "image/x-png", "image/apng"),
    "WEBP": ("image/webp",),
    "GIF": ("image/gif",),
    "BMP": ("image/bmp", "image/x-ms-bmp"),
    "TIFF": ("image/tiff",),
    "AVIF": ("image/avif",),
}
# Content types that say nothing about the bytes: the bytes decide.
_UNTYPED = ("", "application/octet-stream")


@dataclass(frozen=True)
class UploadLimits:
    """What an uploaded query image may be.

    Attributes:
        max_bytes: Largest upload accepted, in bytes.
        max_pixels: Largest width x height accepted, checked from the header before decoding.
        formats: Pillow format names accepted (``"JPEG"`` also covers phones' ``"MPO"``).
        min_side: Shortest side accepted, in pixels.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    min_side: int = 16


class UploadError(ValueError):
    """An upload refused as a query image.

    Attributes:
        code: Machine-readable reason, one of :data:`STATUS_BY_CODE`'s keys, e.g.
            ``"upload_too_large"``.
        status: The HTTP status to answer with (400, 413 or 415).
        message: What went wrong, for people.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = STATUS_BY_CODE[code]
        self.message = message


def decode_upload(
    data: bytes, content_type: str | None, limits: UploadLimits, decode_side: int | None = None
) -> Image.Image:
    """Decode an uploaded image into an upright RGB image, or refuse it.

    CPU-bound (Pillow releases the GIL while decoding): call it in a worker thread from async
    code.

    Args:
        data: The uploaded bytes.
        content_type: The declared MIME type (parameters such as ``; charset=`` are ignored).
            None, empty or ``application/octet-stream`` let the bytes decide.
        limits: What an upload may be.
        decode_side: The short side the model resizes to: a much larger JPEG decodes scaled
            down to no less (:func:`~model.image_format.decode_scaled`), as catalogue photos
            are indexed. The limits apply to the stored size all the same.

    Returns:
        The decoded image in mode ``RGB``, rotated by its EXIF orientation.

    Raises:
        UploadError: With ``code`` ``empty_upload``, ``upload_too_large``,
            ``unsupported_media_type``, ``not_an_image``, ``format_not_allowed``,
            ``too_many_pixels``, ``image_too_small`` or ``corrupt_image``.
    """
    if not data:
        raise UploadError("empty_upload", "the upload is empty")
    if len(data) > limits.max_bytes:
        raise UploadError(
            "upload_too_large", f"the upload is {len(data)} bytes; at most {limits.max_bytes}"
        )
    check_content_type(content_type, limits)
    image = _open_header(data)
    try:  # the image is returned as it is decoded (no copy), so it is closed only if refused
        fmt = canonical_format(image.format)
        width, height = image.size
        if fmt not in limits.formats:
            raise UploadError(
                "format_not_allowed",
                f"{fmt or 'this'} images are not accepted; send {_names(limits.formats)}",
            )
        if width * height > limits.max_pixels:
            raise UploadError(
                "too_many_pixels",
                f"the image is {width}x{height}, over {limits.max_pixels} pixels",
            )
        if min(width, height) < limits.min_side:
            raise UploadError(
                "image_too_small",
                f"the image is {width}x{height}; each side must be at least {limits.min_side} px",
            )
        try:
            decode_scaled(image, decode_side)
            image.load()
        except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError...
            raise UploadError("corrupt_image", f"the {fmt} image does not decode: {err}") from err
    except BaseException:
        image.close()
        raise
    return upright_rgb(image)


def check_content_type(content_type: str | None, limits: UploadLimits) -> None:
    """Refuse a declared type that is not an image type of an allowed format.

    Raises:
        UploadError: ``unsupported_media_type``.
    """
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if declared in _UNTYPED:
        return
    allowed = {mime for fmt in limits.formats for mime in _mime_types(fmt)}
    if not declared.startswith("image/") or declared not in allowed:
        raise UploadError(
            "unsupported_media_type",
            f"content type {declared!r} is not accepted; send {', '.join(sorted(allowed))}",
        )


def photo_size_limit(max_bytes: int) -> str:
    """What a refused upload's message tells the user about the limit."""
    size = f"{max_bytes / 2**20:.1f} MiB" if max_bytes >= 2**20 else f"{max_bytes / 2**10:.1f} KiB"
    return f"a photo may be at most {size} ({max_bytes} bytes)"


def sniffed_mime_type(head: bytes) -> str | None:
    """The MIME type the first bytes of an image announce (None: not an image we know)."""
    fmt = signature(head)
    types = _mime_types(fmt) if fmt else ()
    return types[0] if types else None


def _mime_types(fmt: str) -> tuple[str, ...]:
    """MIME types of a Pillow format, falling back to the one Pillow registers."""
    if fmt in _MIME_TYPES:
        return _MIME_TYPES[fmt]
    Image.init()
    return (Image.MIME[fmt].lower(),) if fmt in Image.MIME else ()


def _open_header(data: bytes) -> Image.Image:
    """Open ``data`` lazily (header only), mapping Pillow's refusals to upload errors."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise UploadError("too_many_pixels", f"the image is too large to decode: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if signature(data):
            raise UploadError("corrupt_image", f"the image header does not parse: {err}") from err
        raise UploadError("not_an_image", "the upload is not an image Pillow can read") from err


def _names(formats: tuple[str, ...]) -> str:
    return ", ".join(formats) if formats else "nothing (no format is allowed)"
