"""Decoding uploaded query images: every refusal with real bytes, and the good cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from components.catalog.bad_rows import write_png_bomb
from serving.uploads import UploadError, UploadLimits, decode_upload, sniffed_mime_type

LIMITS = UploadLimits()


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photo(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    channels = len(mode)
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _refusal(data: bytes, content_type: str | None, limits: UploadLimits = LIMITS) -> UploadError:
    with pytest.raises(UploadError) as caught:
        decode_upload(data, content_type, limits)
    return caught.value


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real PNG decompression bombs: one Pillow itself refuses, one only our limit refuses."""
    root = tmp_path_factory.mktemp("bombs")
    return {
        "pillow": write_png_bomb(root / "pillow.png", 20000, 20000).read_bytes(),
        "ours": write_png_bomb(root / "ours.png", 8000, 8000).read_bytes(),
    }


def test_upload_error_is_a_value_error_with_status_and_code() -> None:
    err = _refusal(b"", "image/jpeg")
    assert isinstance(err, ValueError)
    assert (err.code, err.status) == ("empty_upload", 400)
    assert err.message == str(err)


@pytest.mark.parametrize(
    ("data", "content_type", "limits", "code", "status"),
    [
        (b"", None, LIMITS, "empty_upload", 400),
        (_encode(_photo(), "PNG"), None, UploadLimits(max_bytes=1000), "upload_too_large", 413),
        (_encode(_photo(), "JPEG"), "text/plain", LIMITS, "unsupported_media_type", 415),
        (_encode(_photo(), "JPEG"), "application/json", LIMITS, "unsupported_media_type", 415),
        (_encode(_photo(), "GIF"), "image/gif", LIMITS, "unsupported_media_type", 415),
        (b"<html>404 Not Found</html>\n", None, LIMITS, "not_an_image", 400),
        (b"<html>404 Not Found</html>\n", "image/jpeg", LIMITS, "not_an_image", 400),
        (_encode(_photo(), "GIF"), None, LIMITS, "format_not_allowed", 415),
        (_encode(_photo(), "BMP"), "application/octet-stream", LIMITS, "format_not_allowed", 415),
        (_encode(_photo(12, 200), "PNG"), "image/png", LIMITS, "image_too_small", 400),
        (_encode(_photo(8, 8), "JPEG"), "image/jpeg", LIMITS, "image_too_small", 400),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", LIMITS, "corrupt_image", 400),
    ],
    ids=[
        "zero-bytes",
        "over-size",
        "text-plain",
        "json",
        "gif-content-type",
        "text-bytes",
        "text-bytes-claiming-jpeg",
        "gif-bytes",
        "bmp-bytes",
        "narrow",
        "tiny",
        "png-header-broken",
    ],
)
def test_refusals(
    data: bytes, content_type: str | None, limits: UploadLimits, code: str, status: int
) -> None:
    err = _refusal(data, content_type, limits)
    assert (err.code, err.status) == (code, status), err


def test_truncated_jpeg_is_corrupt() -> None:
    data = _encode(_photo(256, 256), "JPEG", quality=95)
    header = Image.open(io.BytesIO(data[: len(data) * 4 // 10]))
    assert header.size == (256, 256)  # the header still reads: only decoding finds the fault
    err = _refusal(data[: len(data) * 4 // 10], "image/jpeg")
    assert (err.code, err.status) == ("corrupt_image", 400)


def test_pillows_own_bomb_refusal_is_too_many_pixels(bombs: dict[str, bytes]) -> None:
    assert len(bombs["pillow"]) < LIMITS.max_bytes  # tiny file, 400 million pixels
    pillow_limit = Image.MAX_IMAGE_PIXELS
    err = _refusal(bombs["pillow"], "image/png")
    assert (err.code, err.status) == ("too_many_pixels", 413)
    assert isinstance(err.__cause__, Image.DecompressionBombError)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS, "changed the global limit"


def test_bomb_under_pillows_limit_is_refused_from_the_header(bombs: dict[str, bytes]) -> None:
    err = _refusal(bombs["ours"], None)
    assert (err.code, err.status) == ("too_many_pixels", 413)
    assert err.__cause__ is None and "8000x8000" in str(err)
    # A higher limit of ours lets the same file through: it really is a valid PNG.
    image = decode_upload(bombs["ours"], None, UploadLimits(max_pixels=64_000_000))
    assert image.size == (8000, 8000)


@pytest.mark.parametrize(
    ("fmt", "content_type", "mode"),
    [
        ("JPEG", "image/jpeg", "RGB"),
        ("JPEG", "IMAGE/JPEG; charset=binary", "RGB"),
        ("JPEG", None, "RGB"),
        ("PNG", "image/png", "RGBA"),
        ("PNG", "application/octet-stream", "L"),
        ("WEBP", "image/webp", "RGB"),
    ],
)
def test_good_images_decode_to_rgb(fmt: str, content_type: str | None, mode: str) -> None:
    source = _photo(64, 48, "RGB").convert(mode)
    image = decode_upload(_encode(source, fmt), content_type, LIMITS)
    assert image.mode == "RGB"
    assert image.size == (64, 48)
    if fmt == "PNG":  # lossless: the pixels are the source's, converted as the indexer does
        assert np.array_equal(np.asarray(image), np.asarray(source.convert("RGB")))


def test_declared_type_does_not_have_to_match_the_bytes() -> None:
    image = decode_upload(_encode(_photo(), "PNG"), "image/jpeg", LIMITS)
    assert image.size == (64, 48)


def test_gif_is_accepted_when_allowed() -> None:
    limits = UploadLimits(formats=("JPEG", "GIF"))
    image = decode_upload(_encode(_photo(), "GIF"), "image/gif", limits)
    assert (image.mode, image.size) == ("RGB", (64, 48))


def test_phone_multi_picture_jpeg_counts_as_jpeg() -> None:
    data = _encode(_photo(), "MPO", save_all=True, append_images=[_photo(32, 24)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_upload(data, "image/jpeg", LIMITS).size == (64, 48)


def test_exif_orientation_is_applied() -> None:
    # Stored 40 wide x 20 high, red left and blue right; orientation 6 means "rotate 90°
    # clockwise to display", so the upright image is 20 x 40 with red on top.
    stored = Image.new("RGB", (40, 20), "blue")
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_upload(_encode(stored, "JPEG", quality=95, exif=exif), "image/jpeg", LIMITS)
    assert image.size == (20, 40)
    red, blue = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert red[0] > 200 and red[2] < 60
    assert blue[2] > 200 and blue[0] < 60


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped() -> None:
    # A 16-bit PNG opens as mode I;16; Pillow's convert("RGB") would clip every value over
    # 255, turning a mid-gray photo white.
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    data = _encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = np.asarray(decode_upload(data, "image/png", LIMITS))
    assert pixels.shape == (48, 64, 3)
    assert (pixels[:, 0] == 0).all() and (pixels[:, -1] == 255).all()
    assert abs(pixels.mean() - 127.5) < 2


def test_a_large_jpeg_decodes_scaled_down_to_the_side_the_model_needs() -> None:
    # 1600x1200 with a 256 px side to keep: libjpeg decodes at 1/4 (400x300), not at 1/8
    # (200x150, under 256); the EXIF orientation still applies, the limits to the stored size.
    stored = Image.new("RGB", (1600, 1200), "blue")
    stored.paste((255, 0, 0), (0, 0, 800, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, "JPEG", quality=90, exif=exif)
    image = decode_upload(data, "image/jpeg", LIMITS, decode_side=256)
    assert image.size == (300, 400) and image.mode == "RGB"
    assert image.getpixel((150, 50))[0] > 200  # red on top once upright
    assert decode_upload(data, "image/jpeg", LIMITS).size == (1200, 1600)  # full size
    with pytest.raises(UploadError, match="1600x1200, over 1000000 pixels"):
        decode_upload(data, "image/jpeg", UploadLimits(max_pixels=1_000_000), decode_side=256)
    png = _encode(stored, "PNG")  # only JPEG decodes scaled
    assert decode_upload(png, "image/png", LIMITS, decode_side=256).size == (1600, 1200)
    small = _encode(_photo(400, 300), "JPEG")  # 1/2 would go under 256
    assert decode_upload(small, "image/jpeg", LIMITS, decode_side=256).size == (400, 300)


def test_limits_apply_exactly_at_the_boundary() -> None:
    data = _encode(_photo(16, 16), "PNG")
    assert decode_upload(data, None, UploadLimits(max_bytes=len(data), max_pixels=256)).size == (
        16,
        16,
    )
    assert _refusal(data, None, UploadLimits(max_pixels=255)).code == "too_many_pixels"
    assert _refusal(data, None, UploadLimits(min_side=17)).code == "image_too_small"
    assert _refusal(data, None, UploadLimits(max_bytes=len(data) - 1)).code == "upload_too_large"


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_the_bytes_name_their_mime_type(fmt: str, expected: str) -> None:
    """What /v1/images serves an admin-added ``.img`` file as."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format=fmt)
    assert sniffed_mime_type(buffer.getvalue()[:16]) == expected
    assert sniffed_mime_type(b"not an image at all") is None
