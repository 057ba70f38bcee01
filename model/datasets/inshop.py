"""DeepFashion In-Shop Clothes Retrieval, read from ``list_eval_partition.txt`` as published.

Line 1 is the number of images, line 2 the header ``image_name item_id evaluation_status``,
then one whitespace-separated line per image, e.g.
``img/WOMEN/Dresses/id_00000002/02_1_front.jpg  id_00000002  train``, with the status one of
``train``, ``query`` or ``gallery``. Image names are relative to the dataset root (the official
release keeps the images under ``img/`` and the names start with ``img/``).
"""

from __future__ import annotations

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

INSHOP_FILE = "list_eval_partition.txt"
INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")
INSHOP_SPLITS = ("train", "query", "gallery")


def load_inshop(root: str | Path) -> RetrievalDataset:
    """Read DeepFashion In-Shop from its official partition file.

    Train labels are remapped to ``0..C-1`` in ascending item-id order. Query and gallery share
    one label map, so an item's query and gallery images carry the same label; gallery items
    without queries get labels too. Whether the image files exist is not checked here:
    :class:`~model.datasets.images.ImageFileDataset` skips unreadable ones.

    Args:
        root: Folder holding ``list_eval_partition.txt`` and the images it names.

    Returns:
        The dataset with splits ``"train"``, ``"query"`` and ``"gallery"`` and protocol
        ``"inshop"``.

    Raises:
        DatasetFormatError: The file is missing, the count on line 1 disagrees with the
            number of image lines, or a line does not follow the format (the message names
            the file and the line).
    """
    root = Path(root).expanduser().resolve()
    rows = _read_partition(root / INSHOP_FILE)
    by_split: dict[str, list[tuple[str, str]]] = {split: [] for split in INSHOP_SPLITS}
    for image_name, item_id, status in rows:
        by_split[status].append((image_name, item_id))
    train_map = dense_labels(item for _, item in by_split["train"])
    eval_map = dense_labels(item for s in ("query", "gallery") for _, item in by_split[s])
    splits = {
        split: [
            ImageRecord(path=root / name, label=label_map[item], class_key=item)
            for name, item in by_split[split]
        ]
        for split, label_map in (("train", train_map), ("query", eval_map), ("gallery", eval_map))
    }
    return RetrievalDataset(name="inshop", root=root, splits=splits, protocol="inshop")


def _read_partition(path: Path) -> list[tuple[str, str, str]]:
    """Parse the partition file into ``(image_name, item_id, status)`` rows."""
    text = read_text(
        path,
        missing=(
            f"In-Shop file not found: {path} (expected the DeepFashion In-Shop layout: "
            f"{INSHOP_FILE} in --root)"
        ),
    )
    lines = text_lines(text)
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DatasetFormatError.at(
            path, 1, f"expected the number of images (an integer), got {lines[0].strip()!r}"
        ) from None
    rows = []
    for number, fields in header_and_rows(path, lines, INSHOP_HEADER, header_line=2):
        if fields[2] not in INSHOP_SPLITS:
            raise DatasetFormatError.at(
                path,
                number,
                f"expected evaluation_status train, query or gallery, got {fields[2]!r}",
            )
        rows.append((fields[0], fields[1], fields[2]))
    if count != len(rows):
        raise DatasetFormatError.at(
            path, 1, f"the image count says {count} but the file lists {len(rows)} images"
        )
    if not rows:
        raise DatasetFormatError(
            f"{path.name}: no image lines after the header (expected one line per image: "
            f"'{' '.join(INSHOP_HEADER)}')",
            path=path,
        )
    return rows
