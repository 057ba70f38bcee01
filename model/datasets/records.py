"""Records shared by every dataset reader: one image, one split set, one format error."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

EvalProtocol = Literal["sop", "inshop"]
_Key = TypeVar("_Key", str, int)

# The splits each evaluation protocol needs: SOP searches the test split against itself,
# In-Shop searches the query split against the gallery split.
_PROTOCOL_SPLITS: dict[str, tuple[str, ...]] = {
    "sop": ("train", "test"),
    "inshop": ("train", "query", "gallery"),
}


class DatasetFormatError(ValueError):
    """A dataset file is missing or does not follow its published format.

    The message names the file and, where it applies, the 1-based line number and what was
    expected there, e.g. ``"Ebay_train.txt line 17: expected 4 fields 'image_id class_id
    super_class_id path', got 3"``.

    Attributes:
        path: The offending file, when known.
        line: The 1-based line number in ``path``, when the problem is on one line.
    """

    def __init__(self, message: str, *, path: Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path = path
        self.line = line

    @classmethod
    def at(cls, path: Path, line: int, expected: str) -> DatasetFormatError:
        """Build the error for one line: ``"<file name> line <n>: <expected>"``."""
        return cls(f"{path.name} line {line}: {expected}", path=path, line=line)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a retrieval dataset.

    Attributes:
        path: Absolute path of the image file (it may not exist; the image loader skips it).
        label: Dense class index ``0..C-1`` within the split set the image belongs to.
        class_key: The class, item or product id as written in the source file.
        super_label: Dense coarse-class index (SOP super class, catalogue category), if any.
    """

    path: Path
    label: int
    class_key: str
    super_label: int | None = None


@dataclass
class RetrievalDataset:
    """The splits of one retrieval benchmark and how it is evaluated.

    Attributes:
        name: Dataset name (``"sop"``, ``"inshop"`` or ``"catalog"``).
        root: Absolute folder the image paths were resolved against.
        splits: Records per split name; ``"train"`` always, plus ``"test"`` for the SOP
            protocol or ``"query"`` and ``"gallery"`` for the In-Shop protocol.
        protocol: ``"sop"``: every test image queries all other test images.
            ``"inshop"``: query images search the gallery images only.
    """

    name: str
    root: Path
    splits: dict[str, list[ImageRecord]]
    protocol: EvalProtocol

    def __post_init__(self) -> None:
        """Check that the splits the protocol needs are there."""
        if self.protocol not in _PROTOCOL_SPLITS:
            raise ValueError(
                f"unknown evaluation protocol {self.protocol!r}; expected one of "
                f"{', '.join(_PROTOCOL_SPLITS)}"
            )
        missing = [s for s in _PROTOCOL_SPLITS[self.protocol] if s not in self.splits]
        if missing:
            raise ValueError(
                f"dataset {self.name!r} (protocol {self.protocol!r}) lacks split(s): "
                f"{', '.join(missing)}"
            )

    @property
    def train(self) -> list[ImageRecord]:
        """Training images."""
        return self.splits["train"]

    @property
    def query(self) -> list[ImageRecord]:
        """Evaluation queries: the test split (SOP protocol) or the query split (In-Shop)."""
        return self.splits["test" if self.protocol == "sop" else "query"]

    @property
    def gallery(self) -> list[ImageRecord]:
        """Evaluation gallery: the test split (SOP protocol) or the gallery split (In-Shop)."""
        return self.splits["test" if self.protocol == "sop" else "gallery"]

    @property
    def query_is_gallery(self) -> bool:
        """True under the SOP protocol, where each query must not retrieve itself."""
        return self.protocol == "sop"

    def num_classes(self, split: str = "train") -> int:
        """Number of distinct labels in one split."""
        return len({r.label for r in self.splits[split]})


def dense_labels(keys: Iterable[_Key]) -> dict[_Key, int]:
    """Map class keys to ``0..C-1`` in sorted order, so labels do not depend on line order."""
    return {key: i for i, key in enumerate(sorted(set(keys)))}


def read_text(path: Path, *, missing: str) -> str:
    """Read a UTF-8 text file; raise DatasetFormatError(``missing``) if it is not there."""
    if not path.is_file():
        raise DatasetFormatError(missing, path=path)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetFormatError.at(
            path, line, f"expected UTF-8 text, got byte 0x{data[err.start]:02x}"
        ) from None


def text_lines(text: str) -> list[str]:
    """Split text into lines the way editors number them (``\\n`` or ``\\r\\n``)."""
    return [line.rstrip("\r") for line in text.split("\n")]


def header_and_rows(
    path: Path, lines: list[str], header: tuple[str, ...], header_line: int
) -> Iterator[tuple[int, list[str]]]:
    """Check the header at 1-based ``header_line``, then yield ``(line number, fields)`` for each
    non-blank line after it, each with exactly ``len(header)`` whitespace-separated fields."""
    found = lines[header_line - 1] if len(lines) >= header_line else ""
    if tuple(found.split()) != header:
        raise DatasetFormatError.at(
            path, header_line, f"expected the header '{' '.join(header)}', got {found.strip()!r}"
        )
    for number, line in enumerate(lines[header_line:], start=header_line + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(header):
            raise DatasetFormatError.at(
                path,
                number,
                f"expected {len(header)} fields '{' '.join(header)}', got {len(fields)}",
            )
        yield number, fields
