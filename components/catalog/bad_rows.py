"""Deliberately bad catalogue rows, one of each kind validation must catch.

The demo catalogue appends these so that a new user sees the quarantine at work, and the
tests use the same builders to inject bad rows into real catalogues. Each builder writes
whatever file it needs under the catalogue folder and returns a manifest row; the reason
validation must give is in :data:`DEMO_BAD_ROWS`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

Row = dict[str, str]
BadRowBuilder = Callable[[Path, Row], Row]


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A real decompression bomb: a valid greyscale PNG of ``width`` x ``height`` black pixels
    whose file is tiny (zlib squeezes the zero rows), streamed so it never holds the pixels."""
    compressor = zlib.compressobj(9)
    scanline = bytes(width + 1)  # filter byte 0, then one zero byte per pixel
    chunks = [compressor.compress(scanline) for _ in range(height)]
    data = b"".join(chunks) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def _with(row: Row, **changes: str) -> Row:
    return {**row, **changes}


def truncated_jpeg(root: Path, good: Row) -> Row:
    """The first 40% of a good photo: the header reads, the pixels do not."""
    data = (root / good["image_path"]).read_bytes()
    target = root / "images/bad_truncated.jpg"
    target.write_bytes(data[: int(len(data) * 0.4)])
    return _with(good, image_path="images/bad_truncated.jpg")


def not_an_image(root: Path, good: Row) -> Row:
    """Text saved under a ``.jpg`` name."""
    (root / "images/bad_not_an_image.jpg").write_text("<html>404 Not Found</html>\n")
    return _with(good, image_path="images/bad_not_an_image.jpg")


def missing_file(root: Path, good: Row) -> Row:
    """A row whose image was never uploaded."""
    return _with(good, image_path="images/bad_never_uploaded.jpg")


def tiny_image(root: Path, good: Row) -> Row:
    """A 24 x 24 thumbnail instead of a photo."""
    with Image.open(root / good["image_path"]) as image:
        image.resize((24, 24)).save(root / "images/bad_thumbnail.jpg")
    return _with(good, image_path="images/bad_thumbnail.jpg")


def duplicate_content(root: Path, good: Row) -> Row:
    """The same bytes as a good photo under another name."""
    target = root / "images/bad_copy.jpg"
    target.write_bytes((root / good["image_path"]).read_bytes())
    return _with(good, image_path="images/bad_copy.jpg")


def path_escape(root: Path, good: Row) -> Row:
    """A path that climbs out of the catalogue root."""
    return _with(good, image_path="../../etc/passwd")


def decompression_bomb(root: Path, good: Row) -> Row:
    """An 8000 x 8000 PNG (64 megapixels) in about 64 kB."""
    write_png_bomb(root / "images/bad_bomb.png", 8000, 8000)
    return _with(good, image_path="images/bad_bomb.png")


def gif_image(root: Path, good: Row) -> Row:
    """A GIF, a format the catalogue does not accept."""
    with Image.open(root / good["image_path"]) as image:
        image.convert("P").save(root / "images/bad_format.gif")
    return _with(good, image_path="images/bad_format.gif")


def negative_price(root: Path, good: Row) -> Row:
    """A good photo (new name) with a price below zero."""
    return _row_with_new_photo(root, good, "bad_price_negative", price="-4.99")


def price_not_a_number(root: Path, good: Row) -> Row:
    """A good photo (new name) whose price is text."""
    return _row_with_new_photo(root, good, "bad_price_text", price="free")


def missing_product_id(root: Path, good: Row) -> Row:
    """A good photo (new name) with no product id."""
    return _row_with_new_photo(root, good, "bad_no_product", product_id="")


def repeated_image_path(root: Path, good: Row) -> Row:
    """A second row pointing at a photo another row already lists."""
    return _with(good, title=good["title"] + " (listed twice)")


def _row_with_new_photo(root: Path, good: Row, name: str, **changes: str) -> Row:
    """A fresh, distinct photo (mirrored) so that only the manifest fields are wrong."""
    with Image.open(root / good["image_path"]) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / f"images/{name}.jpg")
    return _with(good, image_path=f"images/{name}.jpg", **changes)


# Builder -> the reasons validation must give its row (in the default configuration).
DEMO_BAD_ROWS: dict[BadRowBuilder, tuple[str, ...]] = {
    truncated_jpeg: ("corrupt_image",),
    not_an_image: ("not_an_image",),
    missing_file: ("file_missing",),
    tiny_image: ("too_small",),
    duplicate_content: ("duplicate_image",),
    path_escape: ("path_escape",),
    decompression_bomb: ("too_many_pixels",),
    gif_image: ("format_not_allowed",),
    negative_price: ("price_out_of_range",),
    price_not_a_number: ("price_not_a_number",),
    missing_product_id: ("missing_product_id",),
    repeated_image_path: ("duplicate_image_path", "duplicate_image"),
}


def demo_bad_rows(root: Path, good_rows: list[Row]) -> list[Row]:
    """One bad row of each kind in :data:`DEMO_BAD_ROWS`, built from spread-out good rows."""
    step = max(1, len(good_rows) // len(DEMO_BAD_ROWS))
    return [
        builder(root, good_rows[(i * step) % len(good_rows)])
        for i, builder in enumerate(DEMO_BAD_ROWS)
    ]
