"""The catalogue's rules, applied to products added or changed through the admin API.

The nightly validation step decides what may enter the catalogue (``validate`` in
``params.yaml``: id and title lengths, the price range, the allowed categories, a photo's
smallest side, formats, pixels and bytes). The index step records those limits with the
collection it builds, and the admin API holds its adds and updates to the same ones: a
product the API accepts is one the next night's validation keeps. Collections built before
the rules were recorded get :class:`~components.catalog.config.ValidationConfig`'s defaults.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.catalog.config import ValidationConfig
from serving.uploads import UploadLimits

log = logging.getLogger(__name__)
# The metadata key the index step records the rules under (in its build record).
RULES_KEY = "catalogue_rules"
# Line breaks, tabs and the other control characters: an id holding one cannot be named in
# a URL path (the routes' paths do not match a newline) nor shown in the page.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULTS = ValidationConfig()


def stripped(value: str) -> str:
    """A text field as the validation step reads a manifest cell: without surrounding
    whitespace (so ``"mugs "`` is the category ``mugs``)."""
    return value.strip()


class RuleBroken(ValueError):
    """A product field the catalogue would refuse. ``code``: machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CatalogueRules:
    """What a product must satisfy (the validation step's limits that apply to one product)."""

    # Defaults: validation's (see ValidationConfig and ImageLimits for what each means).
    max_product_id_length: int = _DEFAULTS.max_product_id_length
    max_title_length: int = _DEFAULTS.max_title_length
    max_price: float = _DEFAULTS.max_price
    categories: tuple[str, ...] = _DEFAULTS.categories  # empty: any non-blank category
    min_side: int = _DEFAULTS.images.min_side
    formats: tuple[str, ...] = _DEFAULTS.images.formats
    max_pixels: int = _DEFAULTS.images.max_pixels
    max_file_bytes: int = _DEFAULTS.images.max_file_bytes

    @classmethod
    def of_validation(cls, config: ValidationConfig) -> CatalogueRules:
        return cls(
            max_product_id_length=config.max_product_id_length,
            max_title_length=config.max_title_length,
            max_price=config.max_price,
            categories=tuple(config.categories),
            min_side=config.images.min_side,
            formats=tuple(config.images.formats),
            max_pixels=config.images.max_pixels,
            max_file_bytes=config.images.max_file_bytes,
        )

    @classmethod
    def of_validated_manifest(cls, validated_manifest: str | Path) -> CatalogueRules:
        """The rules the manifest was validated with (its ``summary.json``); the defaults if
        the summary is missing or unreadable (a manifest validated elsewhere)."""
        summary = Path(validated_manifest).with_name("summary.json")
        try:
            config = json.loads(summary.read_text(encoding="utf-8"))["config"]
            return cls.of_validation(ValidationConfig.from_dict(config))
        except (OSError, KeyError, TypeError, ValueError) as err:
            log.info("catalogue rules: the defaults (%s: %s)", summary, err)
            return cls()

    @classmethod
    def of_metadata(cls, metadata: dict[str, Any]) -> CatalogueRules:
        """The rules a collection's build record holds, or the defaults."""
        raw = metadata.get(RULES_KEY)
        if not isinstance(raw, dict):
            return cls()
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        for key in ("categories", "formats"):
            if key in known:
                known[key] = tuple(known[key] or ())
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "categories": list(self.categories), "formats": list(self.formats)}

    def upload_limits(self, service: UploadLimits) -> UploadLimits:
        """The service's limits on an upload, narrowed to what a catalogue photo may be."""
        return UploadLimits(
            max_bytes=min(service.max_bytes, self.max_file_bytes),
            max_pixels=min(service.max_pixels, self.max_pixels),
            formats=tuple(f for f in service.formats if f in self.formats),
            min_side=max(service.min_side, self.min_side),
        )

    def check_product_id(self, product_id: str) -> None:
        """Check an id as validation reads it (stripped: see :func:`stripped`)."""
        if not product_id.strip():
            raise RuleBroken("invalid_product_id", "product_id is blank")
        if _CONTROL.search(product_id):
            raise RuleBroken(
                "invalid_product_id",
                "product_id holds a control character (a line break, a tab...): remove it",
            )
        if len(product_id) > self.max_product_id_length:
            raise RuleBroken(
                "invalid_product_id",
                f"product_id is longer than {self.max_product_id_length} characters",
            )

    def check_fields(
        self, category: str | None = None, title: str | None = None, price: float | None = None
    ) -> None:
        """Check the fields given (None: not being set)."""
        if category is not None:
            if not category.strip():
                raise RuleBroken("invalid_category", "category is blank")
            if self.categories and category not in self.categories:
                raise RuleBroken(
                    "unknown_category",
                    f"category {category!r} is not one of the catalogue's: "
                    + ", ".join(self.categories),
                )
        if title is not None:
            if not title.strip():
                raise RuleBroken("invalid_title", "title is blank")
            if len(title) > self.max_title_length:
                raise RuleBroken(
                    "invalid_title", f"title is longer than {self.max_title_length} characters"
                )
        if price is not None and not 0 <= price <= self.max_price:
            raise RuleBroken(
                "price_out_of_range", f"price must be between 0 and {self.max_price:g}"
            )
