"""Dataset readers: Stanford Online Products, DeepFashion In-Shop and the Vitrine catalogue.

Each reader turns its files into a :class:`RetrievalDataset` of :class:`ImageRecord` splits
and raises :class:`DatasetFormatError` naming the file and line when they do not follow the
format. :class:`ImageFileDataset` loads the images, skipping unreadable ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.datasets.catalog import load_catalog
from model.datasets.inshop import load_inshop
from model.datasets.records import DatasetFormatError, ImageRecord, RetrievalDataset
from model.datasets.sop import load_sop

DATASET_NAMES = ("sop", "inshop", "catalog")
MANIFEST_NAMES = ("manifest.csv", "manifest.parquet")

__all__ = [
    "DATASET_NAMES",
    "DatasetFormatError",
    "ImageFileDataset",
    "ImageRecord",
    "RetrievalDataset",
    "collate_skipping_unreadable",
    "find_manifest",
    "load_catalog",
    "load_dataset",
    "load_inshop",
    "load_sop",
    "report_skipped",
]


_IMAGE_LOADING = ("ImageFileDataset", "collate_skipping_unreadable", "report_skipped")


def __getattr__(name: str) -> Any:
    """Import the image loaders (and torch with them) only when someone asks for them, so
    reading manifests and split files stays light."""
    if name in _IMAGE_LOADING:
        from model.datasets import images

        return getattr(images, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(name: str, root: str | Path, **kwargs: Any) -> RetrievalDataset:
    """Read a dataset by name.

    Args:
        name: One of :data:`DATASET_NAMES`: ``"sop"``, ``"inshop"`` or ``"catalog"``.
        root: The dataset folder. For ``"catalog"``, the manifest file itself or a folder
            holding ``manifest.csv`` (or ``manifest.parquet``).
        **kwargs: Passed to the reader; for ``"catalog"`` these are ``test_fraction``,
            ``seed`` and ``image_root`` (the folder image paths are relative to, by default
            the manifest's folder).

    Returns:
        The dataset's splits and evaluation protocol.

    Raises:
        ValueError: ``name`` is not a known dataset.
        DatasetFormatError: The dataset's files are missing or malformed.
    """
    if name == "sop":
        return load_sop(root, **kwargs)
    if name == "inshop":
        return load_inshop(root, **kwargs)
    if name == "catalog":
        image_root = kwargs.pop("image_root", None)
        return load_catalog(find_manifest(Path(root).expanduser()), root=image_root, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASET_NAMES)}")


def find_manifest(root: Path) -> Path:
    """The manifest file itself, or the first of :data:`MANIFEST_NAMES` inside a folder."""
    if not root.is_dir():
        return root
    for manifest_name in MANIFEST_NAMES:
        if (root / manifest_name).is_file():
            return root / manifest_name
    raise DatasetFormatError(
        f"catalogue manifest not found in {root} (expected {' or '.join(MANIFEST_NAMES)})",
        path=root,
    )
