"""Vitrine's own catalogue manifest: the one reader, and the manifest as a retrieval dataset.

The manifest is a CSV file (UTF-8, header row) or a Parquet file with one row per image and
several rows per product. Training needs at least ``product_id`` and ``image_path``;
``category``, ``title`` and ``price`` are the other catalogue columns, and any extra column
travels along. Image paths are relative to the image root (the manifest's folder by default);
absolute paths are kept as they are. A validated manifest (``vitrine validate``) also carries
``image_uri``, the image's absolute location, which takes precedence over ``image_path``.

:func:`read_manifest` is the single parser: it keeps a row it cannot split into the header's
fields as a row with a ``problem`` instead of failing, so validation can quarantine it, while
:func:`load_catalog` refuses such a manifest.
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
CATALOG_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
IMAGE_URI_COLUMN = "image_uri"


@dataclass(frozen=True)
class ManifestRow:
    """One data row of a manifest.

    Attributes:
        number: 1-based position among the data rows (the header is not counted).
        line: The CSV line the row starts on, as an editor numbers it; None for Parquet.
        values: Column name to stripped text; empty cells and nulls are ``""``.
        problem: Why the row could not be read as the header's fields, or None.
        raw: The row's fields joined by commas when it has a problem (its ``values`` are then
            empty, since its fields cannot be matched to columns; nothing is lost).
    """

    number: int
    line: int | None
    values: dict[str, str]
    problem: str | None = None
    raw: str = ""

    @property
    def where(self) -> str:
        """``"line 7"`` for CSV rows, ``"row 6"`` for Parquet rows."""
        return f"line {self.line}" if self.line is not None else f"row {self.number}"


@dataclass(frozen=True)
class ManifestTable:
    """A manifest as read: its path, header and rows in file order."""

    path: Path
    columns: list[str]
    rows: list[ManifestRow]


def read_manifest(
    manifest: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS
) -> ManifestTable:
    """Read a CSV or Parquet manifest into its header and rows.

    Args:
        manifest: The ``.csv`` or ``.parquet`` file (any other suffix is read as CSV).
        required: Columns the header must hold.

    Returns:
        The table; rows whose field count differs from the header's carry a ``problem``.

    Raises:
        DatasetFormatError: The file is missing, empty, not UTF-8, not readable as CSV or
            Parquet, has duplicate or missing required columns, or has no data rows.
        ImportError: The manifest is Parquet and pandas or pyarrow is not installed.
    """
    path = Path(manifest).expanduser().resolve()
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, required)
    return _read_csv(path, required)


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
    table = read_manifest(manifest)
    image_root = table.path.parent if root is None else Path(root).expanduser().resolve()
    rows = [_strict_row(table.path, row) for row in table.rows]

    category_map = dense_labels(row["category"] for row in rows if row.get("category"))
    by_split: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for row in rows:
        split = "test" if _in_test(row["product_id"], seed, test_fraction) else "train"
        by_split[split].append(row)
    splits = {}
    for split, split_rows in by_split.items():
        label_map = dense_labels(row["product_id"] for row in split_rows)
        splits[split] = [
            ImageRecord(
                path=Path(row[IMAGE_URI_COLUMN])
                if row.get(IMAGE_URI_COLUMN)
                else image_root / row["image_path"],
                label=label_map[row["product_id"]],
                class_key=row["product_id"],
                super_label=category_map[row["category"]] if row.get("category") else None,
            )
            for row in split_rows
        ]
    return RetrievalDataset(name="catalog", root=image_root, splits=splits, protocol="sop")


def _strict_row(manifest: Path, row: ManifestRow) -> dict[str, str]:
    """The row's values, or an error naming its line if it is malformed or lacks an id/path."""
    if row.problem:
        raise DatasetFormatError(
            f"{manifest.name} {row.where}: {row.problem}", path=manifest, line=row.line
        )
    for name in REQUIRED_COLUMNS:
        if not row.values.get(name):
            raise DatasetFormatError(
                f"{manifest.name} {row.where}: expected a non-empty {name}",
                path=manifest,
                line=row.line,
            )
    return row.values


def _in_test(product_id: str, seed: int, test_fraction: float) -> bool:
    """Whether a product falls in the test split: a seeded hash of its id below the fraction."""
    digest = hashlib.sha1(f"{seed}:{product_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def _missing_message(manifest: Path, required: tuple[str, ...]) -> str:
    """The error message for a manifest that is not there."""
    return (
        f"catalogue manifest not found: {manifest} (expected a CSV or Parquet file with at "
        f"least the columns {', '.join(required)})"
    )


def _check_header(
    manifest: Path, header: list[str], required: tuple[str, ...], where: str, line: int | None
) -> None:
    """Raise unless the header holds every required column exactly once."""
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DatasetFormatError(
            f"{manifest.name} {where}: duplicate column(s) {', '.join(duplicates)}",
            path=manifest,
            line=line,
        )
    missing = [name for name in required if name not in header]
    if missing:
        raise DatasetFormatError(
            f"{manifest.name} {where}: missing required column(s) {', '.join(missing)} "
            f"(expected at least {', '.join(required)}; got {', '.join(header) or 'none'})",
            path=manifest,
            line=line,
        )


def _read_csv(manifest: Path, required: tuple[str, ...]) -> ManifestTable:
    """Parse a CSV manifest with the csv module, numbering lines as an editor does."""
    text = read_text(manifest, missing=_missing_message(manifest, required))
    if not text.strip():
        raise DatasetFormatError(
            f"{manifest.name}: the file is empty (expected a CSV header with at least "
            f"{', '.join(required)}, then one row per image)",
            path=manifest,
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[ManifestRow] = []
    try:
        header = [name.strip() for name in next(reader)]
        _check_header(manifest, header, required, "line 1", 1)
        line = reader.line_num + 1
        for fields in reader:
            if fields and any(field.strip() for field in fields):
                values = {name: value.strip() for name, value in zip(header, fields, strict=False)}
                if len(fields) == len(header):
                    rows.append(ManifestRow(len(rows) + 1, line, values))
                else:
                    rows.append(  # fields cannot be matched to columns: keep them raw
                        ManifestRow(
                            len(rows) + 1,
                            line,
                            dict.fromkeys(header, ""),
                            f"expected {len(header)} fields as in the header, got {len(fields)}",
                            raw=",".join(fields),
                        )
                    )
            line = reader.line_num + 1
    except csv.Error as err:
        raise DatasetFormatError.at(manifest, reader.line_num, f"malformed CSV ({err})") from None
    if not rows:
        raise DatasetFormatError(f"{manifest.name}: no image rows after the header", path=manifest)
    return ManifestTable(manifest, header, rows)


def _read_parquet(manifest: Path, required: tuple[str, ...]) -> ManifestTable:
    """Read a Parquet manifest through pandas (with pyarrow), which are optional dependencies."""
    if not manifest.is_file():
        raise DatasetFormatError(_missing_message(manifest, required), path=manifest)
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
    _check_header(manifest, header, required, "(Parquet schema)", None)
    frame.columns = header
    rows = [
        ManifestRow(number, None, {k: _cell(v) for k, v in record.items()})
        for number, record in enumerate(frame.to_dict("records"), start=1)
    ]
    if not rows:
        raise DatasetFormatError(f"{manifest.name}: no image rows", path=manifest)
    return ManifestTable(manifest, header, rows)


def _cell(value: Any) -> str:
    """A Parquet cell as stripped text, with nulls as the empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()
