"""The image-facts snapshot that makes the next night's validation incremental.

``image_facts.csv`` holds what was measured about every image file this run read, keyed by
the SHA-256 of its bytes. The next run reads it back and decodes only images whose hash it
does not know: the nightly cost follows the day's changes, not the catalogue's size.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable
from pathlib import Path

from components.catalog.image_checks import ImageFacts
from model.datasets.records import DatasetFormatError

SNAPSHOT_FILE = "image_facts.csv"
_FIELDS = [f.name for f in dataclasses.fields(ImageFacts)]


def write_snapshot(path: Path, facts: Iterable[ImageFacts]) -> None:
    """Write each distinct image's facts once, sorted by hash."""
    unique = {item.sha256: item for item in facts}
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_FIELDS)
        writer.writeheader()
        for digest in sorted(unique):
            writer.writerow(dataclasses.asdict(unique[digest]))


def read_snapshot(folder: Path) -> dict[str, ImageFacts]:
    """Facts by hash from an earlier ``vitrine validate --out`` folder.

    Raises:
        DatasetFormatError: The folder has no readable snapshot.
    """
    path = Path(folder) / SNAPSHOT_FILE
    if not path.is_file():
        raise DatasetFormatError(
            f"no {SNAPSHOT_FILE} in {folder} (--previous expects the --out folder of an earlier "
            "vitrine validate run)",
            path=path,
        )
    facts: dict[str, ImageFacts] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != _FIELDS:
            raise DatasetFormatError(
                f"{path.name} line 1: expected the columns {', '.join(_FIELDS)}", path=path, line=1
            )
        for row in reader:
            try:
                item = ImageFacts(
                    sha256=row["sha256"],
                    size_bytes=int(row["size_bytes"]),
                    format=row["format"],
                    width=int(row["width"]),
                    height=int(row["height"]),
                    decoded=row["decoded"] == "True",
                    error=row["error"],
                    message=row["message"],
                )
            except (TypeError, ValueError) as err:
                message = f"malformed row ({err})"
                raise DatasetFormatError.at(path, reader.line_num, message) from None
            facts[item.sha256] = item
    return facts
