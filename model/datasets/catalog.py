"""Vitrine's own catalogue manifest as a retrieval dataset.

The manifest is a CSV file (UTF-8, header row) or a Parquet file with at least the columns
``product_id`` and ``image_path`` and, optionally, ``category``, ``title`` and ``price``;
one row per image, several rows per product. Image paths are relative to the image root (the
manifest's folder by default); absolute paths are kept as they are.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.datasets.records import (
    DatasetFormatError,
    ImageRecord,
    RetrievalDataset,
    dense_labels,
    read_text,
)

REQUIRED_COLUMNS = ("product_id", "image_path")
OPTIONAL_COLUMNS = ("category", "title", "price")


@dataclass(frozen=True)
class _Row:
    """The fields of one manifest row that the dataset needs."""

    product_id: str
    image_path: str
    category: str


def load_catalog(
    manifest: str | Path,
    root: str | Path | None = None,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> RetrievalDataset:
    """Read a catalogue manifest and split it by product into train and test.

    A product goes to the test split when ``sha1(f"{seed}:{product_id}")``, read as a number
    in ``[0, 1)``, is below ``test_fraction``. The split is therefore deterministic, never puts
    one product on both sides, and keeps every product on its side when the catalogue grows.
    Evaluation follows the SOP protocol on the test products (a product with one image cannot
    find a match; it stays as a distractor). Labels are ``0..C-1`` per split in sorted
    ``product_id`` order; ``super_label`` is the sorted ``category`` index (one map for the
    whole manifest), or None where there is no category.

    Args:
        manifest: The ``.csv`` or ``.parquet`` manifest.
        root: Folder the image paths are relative to; the manifest's folder if None.
        test_fraction: Expected share of products in the test split, in ``[0, 1]``.
        seed: Changes which products are drawn for the test split.

    Returns:
        The dataset with splits ``"train"`` and ``"test"`` and protocol ``"sop"``.

    Raises:
        DatasetFormatError: The manifest is missing, empty, not UTF-8, lacks a required
            column, or has a malformed row (the message names the file and the line).
        ImportError: The manifest is Parquet and pandas or pyarrow is not installed.
        ValueError: ``test_fraction`` is outside ``[0, 1]``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    manifest = Path(manifest).expanduser().resolve()
    image_root = manifest.parent if root is None else Path(root).expanduser().resolve()
    read = _read_parquet if manifest.suffix.lower() == ".parquet" else _read_csv
    rows = read(manifest)

    category_map = dense_labels(row.category for row in rows if row.category)
    by_split: dict[str, list[_Row]] = {"train": [], "test": []}
    for row in rows:
        split = "test" if _in_test(row.product_id, seed, test_fraction) else "train"
        by_split[split].append(row)
    splits = {}
    for split, split_rows in by_split.items():
        label_map = dense_labels(row.product_id for row in split_rows)
        splits[split] = [
            ImageRecord(
                path=image_root / row.image_path,
                label=label_map[row.product_id],
                class_key=row.product_id,
                super_label=category_map[row.category] if row.category else None,
            )
            for row in split_rows
        ]
    return RetrievalDataset(name="catalog", root=image_root, splits=splits, protocol="sop")


def _in_test(product_id: str, seed: int, test_fraction: float) -> bool:
    """Whether a product falls in the test split: a seeded hash of its id below the fraction."""
    digest = hashlib.sha1(f"{seed}:{product_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def _missing_message(manifest: Path) -> str:
    """The error message for a manifest that is not there."""
    return (
        f"catalogue manifest not found: {manifest} (expected a CSV or Parquet file with at "
        f"least the columns {', '.join(REQUIRED_COLUMNS)})"
    )


def _check_header(manifest: Path, header: list[str], where: str, line: int | None) -> None:
    """Raise unless the header holds every required column exactly once."""
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DatasetFormatError(
            f"{manifest.name} {where}: duplicate column(s) {', '.join(duplicates)}",
            path=manifest,
            line=line,
        )
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise DatasetFormatError(
            f"{manifest.name} {where}: missing required column(s) {', '.join(missing)} "
            f"(expected at least {', '.join(REQUIRED_COLUMNS)}; got {', '.join(header) or 'none'})",
            path=manifest,
            line=line,
        )


def _make_row(manifest: Path, values: dict[str, str], where: str, line: int | None) -> _Row:
    """Check one row's required fields are not empty and keep what the dataset needs."""
    for name in REQUIRED_COLUMNS:
        if not values.get(name):
            raise DatasetFormatError(
                f"{manifest.name} {where}: expected a non-empty {name}", path=manifest, line=line
            )
    return _Row(
        product_id=values["product_id"],
        image_path=values["image_path"],
        category=values.get("category", ""),
    )


def _read_csv(manifest: Path) -> list[_Row]:
    """Parse a CSV manifest with the csv module, numbering lines as an editor does."""
    text = read_text(manifest, missing=_missing_message(manifest))
    if not text.strip():
        raise DatasetFormatError(
            f"{manifest.name}: the file is empty (expected a CSV header with at least "
            f"{', '.join(REQUIRED_COLUMNS)}, then one row per image)",
            path=manifest,
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[_Row] = []
    try:
        header = [name.strip() for name in next(reader)]
        _check_header(manifest, header, "line 1", 1)
        line = reader.line_num + 1
        for fields in reader:
            if fields and any(field.strip() for field in fields):
                if len(fields) != len(header):
                    raise DatasetFormatError.at(
                        manifest,
                        line,
                        f"expected {len(header)} fields as in the header, got {len(fields)}",
                    )
                values = {name: value.strip() for name, value in zip(header, fields, strict=True)}
                rows.append(_make_row(manifest, values, f"line {line}", line))
            line = reader.line_num + 1
    except csv.Error as err:
        raise DatasetFormatError.at(manifest, reader.line_num, f"malformed CSV ({err})") from None
    if not rows:
        raise DatasetFormatError(f"{manifest.name}: no image rows after the header", path=manifest)
    return rows


def _read_parquet(manifest: Path) -> list[_Row]:
    """Read a Parquet manifest through pandas (with pyarrow), which are optional dependencies."""
    if not manifest.is_file():
        raise DatasetFormatError(_missing_message(manifest), path=manifest)
    needs = (
        "reading a Parquet manifest needs pandas and pyarrow (pip install pandas pyarrow); "
        "a CSV manifest needs neither"
    )
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError(needs) from err
    try:
        frame = pd.read_parquet(manifest)
    except ImportError as err:
        raise ImportError(needs) from err
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise DatasetFormatError(
            f"{manifest.name}: not a readable Parquet file ({err})", path=manifest
        ) from err
    header = [str(name).strip() for name in frame.columns]
    _check_header(manifest, header, "(Parquet schema)", None)
    frame.columns = header
    rows = [
        _make_row(manifest, {k: _cell(v) for k, v in record.items()}, f"row {i}", None)
        for i, record in enumerate(frame.to_dict("records"), start=1)
    ]
    if not rows:
        raise DatasetFormatError(f"{manifest.name}: no image rows", path=manifest)
    return rows


def _cell(value: Any) -> str:
    """A Parquet cell as stripped text, with nulls as the empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()
