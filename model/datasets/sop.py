"""Stanford Online Products (SOP), read from ``Ebay_train.txt`` and ``Ebay_test.txt`` as published.

Each file starts with the header ``image_id class_id super_class_id path`` and lists one image
per line, whitespace-separated, with 1-based integer ids and a path relative to the dataset
root, e.g. ``1 1 1 bicycle_final/111085122871_0.JPG``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.datasets.records import (
    DatasetFormatError,
    ImageRecord,
    RetrievalDataset,
    dense_labels,
    header_and_rows,
    read_text,
    text_lines,
)

SOP_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")


@dataclass(frozen=True)
class _SopLine:
    """One parsed data line of an SOP list file."""

    image_id: int
    class_id: int
    super_class_id: int
    path: str


def load_sop(root: str | Path) -> RetrievalDataset:
    """Read Stanford Online Products from its official list files.

    Labels are remapped to ``0..C-1`` per split in ascending class-id order (train and test
    classes are disjoint in SOP); ``super_label`` maps the super-class ids, in ascending order,
    to ``0..S-1`` with one map shared by both splits. Whether the image files exist is not
    checked here: :class:`~model.datasets.images.ImageFileDataset` skips unreadable ones.

    Args:
        root: Folder holding ``Ebay_train.txt``, ``Ebay_test.txt`` and the image folders.

    Returns:
        The dataset with splits ``"train"`` and ``"test"`` and protocol ``"sop"``.

    Raises:
        DatasetFormatError: A list file is missing, or a line does not follow the format
            (the message names the file and the line).
    """
    root = Path(root).expanduser().resolve()
    parsed = {split: _read_list(root / name) for split, name in SOP_FILES.items()}
    super_map = dense_labels(line.super_class_id for lines in parsed.values() for line in lines)
    splits: dict[str, list[ImageRecord]] = {}
    for split, lines in parsed.items():
        label_map = dense_labels(line.class_id for line in lines)
        splits[split] = [
            ImageRecord(
                path=root / line.path,
                label=label_map[line.class_id],
                class_key=str(line.class_id),
                super_label=super_map[line.super_class_id],
            )
            for line in lines
        ]
    return RetrievalDataset(name="sop", root=root, splits=splits, protocol="sop")


def _read_list(path: Path) -> list[_SopLine]:
    """Parse one SOP list file, checking the header and every data line."""
    text = read_text(
        path,
        missing=(
            f"SOP file not found: {path} (expected the Stanford Online Products layout: "
            f"{SOP_FILES['train']} and {SOP_FILES['test']} in --root)"
        ),
    )
    lines = text_lines(text)
    parsed = []
    for number, fields in header_and_rows(path, lines, SOP_HEADER, header_line=1):
        ids = []
        for name, value in zip(SOP_HEADER[:3], fields[:3], strict=True):
            try:
                ids.append(int(value))
            except ValueError:
                raise DatasetFormatError.at(
                    path, number, f"expected an integer {name}, got {value!r}"
                ) from None
        parsed.append(_SopLine(ids[0], ids[1], ids[2], fields[3]))
    if not parsed:
        raise DatasetFormatError(
            f"{path.name}: no image lines after the header (expected one line per image: "
            f"'{' '.join(SOP_HEADER)}')",
            path=path,
        )
    return parsed
