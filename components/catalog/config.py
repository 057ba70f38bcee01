"""Typed configuration of catalogue validation (the ``validate`` section of ``params.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from model.datasets.catalog import CATALOG_COLUMNS


@dataclass(frozen=True)
class ImageLimits:
    """What an image must satisfy to enter the catalogue.

    Attributes:
        formats: Pillow format names accepted (the file's content decides, not its suffix).
        min_side: Shortest side in pixels; smaller images are too small to embed well.
        max_pixels: Width x height above which the image is refused without decoding it
            (decompression bombs: a small file that expands to gigabytes).
        max_file_bytes: Files larger than this are refused without reading them.
    """

    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    min_side: int = 64
    max_pixels: int = 40_000_000
    max_file_bytes: int = 20 * 1024 * 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(name.upper() for name in self.formats))
        for name in ("min_side", "max_pixels", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"validate.{name} must be a positive integer")


@dataclass(frozen=True)
class ValidationConfig:
    """Every threshold of the manifest suite and the image checks.

    Attributes:
        images: Limits on the image files.
        required_columns: Columns the manifest must have; a manifest without one is refused.
        max_product_id_length: Longest accepted product id.
        max_title_length: Longest accepted title.
        max_price: Highest accepted price (the lowest is 0).
        categories: The accepted categories, or empty to accept any non-empty category.
        workers: Threads that read and decode images; 0 means one per CPU core.
        data_docs: Also render the Great Expectations data docs (HTML).
    """

    images: ImageLimits = field(default_factory=ImageLimits)
    required_columns: tuple[str, ...] = CATALOG_COLUMNS
    max_product_id_length: int = 128
    max_title_length: int = 500
    max_price: float = 1_000_000.0
    categories: tuple[str, ...] = ()
    workers: int = 0
    data_docs: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ValidationConfig:
        """Build from a mapping such as the ``validate`` section of ``params.yaml``.

        Image limits may be given flat (``min_side: 64``) or under ``images:``; unknown keys
        are an error so that typos do not pass silently.
        """
        from model.config import split_nested

        raw, images = split_nested(raw, cls, "images", ImageLimits, "validation")
        for key in ("required_columns", "categories"):
            if key in raw:
                raw[key] = tuple(raw[key] or ())
        if "formats" in images:
            images["formats"] = tuple(images["formats"])
        return cls(images=ImageLimits(**images), **raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
