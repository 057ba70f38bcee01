"""Validation on the real Grocery photos with 10% injected bad rows of every kind.

Every row must land in exactly one output with exactly its reasons, no good product may be
lost, and the next night's run (``previous=``) must decode only the images that changed. The
photos are hard-linked into a catalogue under ``tmp_path``: the shared data folder is only read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from components.catalog.bad_rows import DEMO_BAD_ROWS, write_png_bomb
from components.catalog.config import ImageLimits, ValidationConfig
from components.validate import validate_catalog

pytestmark = pytest.mark.slow

Row = dict[str, str]
Builder = Callable[[Path, Row, str], Row]

COLUMNS = ("product_id", "image_path", "category", "title", "price")
BAD_SHARE = 0.10
CHANGED_SHARE = 0.05
# Far above the largest Grocery photo (about 40 kB) and the 20000 x 20000 PNG bomb (about
# 390 kB), far below the noise PNG written for file_too_large (about 1.4 MB).
MAX_FILE_BYTES = 1024 * 1024
# Every reason validation can give; the injected rows must produce each of them.
ALL_REASONS = {
    "malformed_row",
    "missing_product_id",
    "missing_image_path",
    "missing_category",
    "missing_title",
    "missing_price",
    "product_id_too_long",
    "title_too_long",
    "unknown_category",
    "price_not_a_number",
    "price_out_of_range",
    "duplicate_image_path",
    "duplicate_image",
    "path_escape",
    "unsupported_uri",
    "file_missing",
    "file_too_large",
    "unreadable_file",
    "not_an_image",
    "too_many_pixels",
    "format_not_allowed",
    "too_small",
    "corrupt_image",
}
# A row with one of these reasons never has its pixels decoded (refused before, or unreadable).
REFUSED_BEFORE_DECODING = {
    "malformed_row",
    "missing_image_path",
    "path_escape",
    "unsupported_uri",
    "file_missing",
    "file_too_large",
    "unreadable_file",
    "not_an_image",
    "too_many_pixels",
    "format_not_allowed",
    "too_small",
}
# Undecoded files whose facts are final (Pillow refused the header whatever the limits): a
# later run reuses them. The other header refusals (too small, GIF, 8000 x 8000 bomb) are
# opened again next night, since new limits could accept them, but still not decoded.
FINAL_UNDECODED_KINDS = {"not_an_image", "pillow_bomb"}


@dataclass
class Entry:
    """One manifest row as written, and what validation must decide about it."""

    number: int
    values: Row
    kind: str = "grocery"
    reasons: frozenset[str] = frozenset()
    raw: str = ""  # a malformed line, written as it is
    source: int = 0  # the number of the good row a bad row was built from

    @property
    def good(self) -> bool:
        return not self.reasons


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _link_grocery(grocery_root: Path, root: Path) -> list[Row]:
    """One manifest row per Grocery photo (product = class_id), the photo hard-linked in."""
    rows = []
    for split in ("Ebay_train.txt", "Ebay_test.txt"):
        lines = (grocery_root / split).read_text().splitlines()[1:]
        for line in filter(str.strip, lines):
            _, class_id, super_class_id, relative = line.split(" ", 3)
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(grocery_root / relative, target)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(grocery_root / relative, target)
            rows.append(
                {
                    "product_id": class_id,
                    "image_path": relative,
                    "category": super_class_id,
                    "title": PurePosixPath(relative).parent.name.replace("-", " "),
                    "price": f"{0.49 + int(class_id) * 0.1:.2f}",
                }
            )
    return rows


def _mirrored(root: Path, good: Row, tag: str, **changes: str) -> Row:
    """A distinct valid photo (the good one mirrored) under a new name, with ``changes``."""
    relative = f"images/{tag}_mirrored.jpg"
    with Image.open(root / good["image_path"]) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / relative)
    return {**good, "image_path": relative, **changes}


def _fields(**changes: str) -> Builder:
    """A row whose photo is fine and whose manifest fields are not."""

    def build(root: Path, good: Row, tag: str) -> Row:
        return _mirrored(root, good, tag, **changes)

    return build


def _too_large(root: Path, good: Row, tag: str) -> Row:
    """A valid PNG of noise, larger than ``MAX_FILE_BYTES``."""
    relative = f"images/{tag}_large.png"
    noise = np.random.default_rng(0).integers(0, 256, size=(700, 700, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / relative)
    assert (root / relative).stat().st_size > MAX_FILE_BYTES
    return {**good, "image_path": relative}


def _pillow_bomb(root: Path, good: Row, tag: str) -> Row:
    """400 megapixels: Pillow itself refuses the header (DecompressionBombError)."""
    relative = f"images/{tag}_bomb.png"
    write_png_bomb(root / relative, 20_000, 20_000)
    return {**good, "image_path": relative}


def _no_image_path(root: Path, good: Row, tag: str) -> Row:
    return {**good, "image_path": ""}


def _unsupported_uri(root: Path, good: Row, tag: str) -> Row:
    return {**good, "image_path": f"nosuchscheme://bucket/{tag}.jpg"}


def _symlink_escape(root: Path, good: Row, tag: str) -> Row:
    """A link inside the root to a valid photo outside it."""
    outside = root.parent / "outside" / f"{tag}.jpg"
    outside.parent.mkdir(exist_ok=True)
    shutil.copyfile(root / good["image_path"], outside)
    relative = f"images/{tag}_link.jpg"
    (root / relative).symlink_to(outside)
    return {**good, "image_path": relative}


def _directory(root: Path, good: Row, tag: str) -> Row:
    relative = f"images/{tag}_folder.jpg"
    (root / relative).mkdir()
    return {**good, "image_path": relative}


def _through_a_file(root: Path, good: Row, tag: str) -> Row:
    """A path that treats a photo as a folder: stat fails with ENOTDIR, not ENOENT."""
    return {**good, "image_path": f"{good['image_path']}/{tag}.jpg"}


def _reencoded(image_format: str, suffix: str) -> Builder:
    """A good row: the photo saved again in another allowed format."""

    def build(root: Path, good: Row, tag: str) -> Row:
        relative = f"images/{tag}_good{suffix}"
        with Image.open(root / good["image_path"]) as image:
            image.save(root / relative, format=image_format)
        return {**good, "image_path": relative}

    return build


# Bad rows DEMO_BAD_ROWS does not make, each injected once, with their reasons.
SPECIAL_BAD_ROWS: dict[str, tuple[Builder, tuple[str, ...]]] = {
    "missing_category": (_fields(category=""), ("missing_category",)),
    "missing_title": (_fields(title=""), ("missing_title",)),
    "missing_price": (_fields(price=""), ("missing_price",)),
    "missing_image_path": (_no_image_path, ("missing_image_path",)),
    "title_too_long": (_fields(title="x" * 501), ("title_too_long",)),
    "unknown_category": (_fields(category="999"), ("unknown_category",)),
    "product_id_too_long": (_fields(product_id="p" * 129), ("product_id_too_long",)),
    "price_too_high": (_fields(price="2000000"), ("price_out_of_range",)),
    "file_too_large": (_too_large, ("file_too_large",)),
    "pillow_bomb": (_pillow_bomb, ("too_many_pixels",)),
    "unsupported_uri": (_unsupported_uri, ("unsupported_uri",)),
    "symlink_escape": (_symlink_escape, ("path_escape",)),
    "directory": (_directory, ("file_missing",)),
    "through_a_file": (_through_a_file, ("unreadable_file",)),
}
GOOD_EXTRAS: dict[str, Builder] = {
    "webp": _reencoded("WEBP", ".webp"),
    "png": _reencoded("PNG", ".png"),
}


def _make_unique(root: Path, row: Row, good: Row, tag: str, seen: set[str]) -> Row:
    """Give a builder's row its own path and file content.

    Builders write fixed names (``images/bad_truncated.jpg``), so the file is renamed; those
    that write nothing get a distinct path. Builders whose bytes do not depend on the good row
    (the text file, the PNG bomb) get a trailer after their data, so that repeats do not also
    become ``duplicate_image``. A row meant to repeat its good row's path keeps it.
    """
    path = row["image_path"]
    if path == good["image_path"]:
        return row
    unique = str(PurePosixPath(path).with_name(f"{tag}_{PurePosixPath(path).name}"))
    if path.startswith("images/") and (root / path).is_file():
        os.replace(root / path, root / unique)
        if _sha256(root / unique) in seen:
            with (root / unique).open("ab") as handle:
                handle.write(f"\n{tag}\n".encode())
        seen.add(_sha256(root / unique))
    return {**row, "image_path": unique}


def _build_catalogue(grocery_root: Path, root: Path) -> tuple[list[Entry], list[int]]:
    """Grocery rows with 10% bad rows interleaved, each right after the good row it copies.

    Returns:
        The entries in manifest order, and the indices (into the Grocery rows) that no bad row
        was built from.
    """
    (root / "images").mkdir(parents=True)
    grocery = _link_grocery(grocery_root, root)
    n_good = len(grocery) + len(GOOD_EXTRAS)
    n_bad = math.ceil(n_good * BAD_SHARE / (1 - BAD_SHARE))
    demo = list(DEMO_BAD_ROWS)
    kinds = [*SPECIAL_BAD_ROWS, "malformed_row"]
    kinds += [demo[i % len(demo)].__name__ for i in range(n_bad - len(kinds))]
    by_name = {builder.__name__: builder for builder in demo}
    stride = (len(grocery) - len(GOOD_EXTRAS)) // n_bad
    assert stride >= 2, "not enough Grocery photos for one distinct source per bad row"
    bad_after: dict[int, tuple[str, int]] = {k * stride: (kind, k) for k, kind in enumerate(kinds)}
    extras_after = {len(grocery) - 1 - i: kind for i, kind in enumerate(GOOD_EXTRAS)}

    entries: list[Entry] = []
    seen: set[str] = set()
    for index, good in enumerate(grocery):
        entries.append(Entry(len(entries) + 1, good))
        if index in extras_after:
            kind = extras_after[index]
            row = GOOD_EXTRAS[kind](root, good, f"x{index}")
            entries.append(Entry(len(entries) + 1, row, kind))
        if index not in bad_after:
            continue
        kind, k = bad_after[index]
        tag, source = f"b{k:04d}", len(entries) - (index in extras_after)
        if kind == "malformed_row":  # an unquoted comma in the title: six fields, not five
            raw = ",".join([*(good[c] for c in COLUMNS[:3]), "Loose, per kg", good["price"]])
            entry = Entry(len(entries) + 1, good, kind, frozenset({kind}), raw, source)
        elif kind in SPECIAL_BAD_ROWS:
            builder, reasons = SPECIAL_BAD_ROWS[kind]
            row = builder(root, good, tag)
            entry = Entry(len(entries) + 1, row, kind, frozenset(reasons), source=source)
        else:
            builder = by_name[kind]
            row = _make_unique(root, builder(root, good), good, tag, seen)
            reasons = DEMO_BAD_ROWS[builder]
            entry = Entry(len(entries) + 1, row, kind, frozenset(reasons), source=source)
        entries.append(entry)
    untouched = [i for i in range(len(grocery)) if i not in bad_after and i not in extras_after]
    return entries, untouched


def _write_manifest(path: Path, entries: list[Entry]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        handle.write(",".join(COLUMNS) + "\n")
        writer = csv.writer(handle, lineterminator="\n")
        for entry in entries:
            if entry.raw:
                handle.write(entry.raw + "\n")
            else:
                writer.writerow([entry.values[c] for c in COLUMNS])


def _read(path: Path) -> dict[int, Row]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_number = {int(row["source_row"]): row for row in rows}
    assert len(by_number) == len(rows), f"a source row appears twice in {path.name}"
    return by_number


def _fingerprint(grocery_root: Path, rows: list[Entry]) -> dict[str, tuple[int, int]]:
    """Size and modification time of every shared photo the catalogue links to."""
    return {
        e.values["image_path"]: (
            (grocery_root / e.values["image_path"]).stat().st_size,
            (grocery_root / e.values["image_path"]).stat().st_mtime_ns,
        )
        for e in rows
    }


def test_grocery_catalogue_with_injected_bad_rows(grocery_root, tmp_path):
    root = tmp_path / "catalogue"
    entries, untouched = _build_catalogue(grocery_root, root)
    manifest = root / "manifest.csv"
    _write_manifest(manifest, entries)
    grocery_rows = [e for e in entries if e.kind == "grocery"]
    shared_before = _fingerprint(grocery_root, grocery_rows)
    good = {e.number: e for e in entries if e.good}
    bad = {e.number: e for e in entries if not e.good}
    assert len(good) >= 2000
    assert len(bad) / len(entries) == pytest.approx(BAD_SHARE, abs=0.001)
    kinds = Counter(e.kind for e in bad.values())
    assert min(kinds[builder.__name__] for builder in DEMO_BAD_ROWS) > 1  # each builder repeats
    assert max(size for size, _ in shared_before.values()) < MAX_FILE_BYTES
    config = ValidationConfig(
        images=ImageLimits(max_file_bytes=MAX_FILE_BYTES),
        categories=tuple(sorted({e.values["category"] for e in grocery_rows}, key=int)),
    )

    out = tmp_path / "night1"
    summary = validate_catalog(manifest, out, config, progress=False)

    validated, quarantine = _read(out / "validated.csv"), _read(out / "quarantine.csv")
    assert set(validated) == set(good)
    assert all(validated[n]["image_path"] == e.values["image_path"] for n, e in good.items())
    assert set(quarantine) == set(bad)
    found = {n: frozenset(row["reasons"].split(";")) for n, row in quarantine.items()}
    assert {n: (e.kind, found[n]) for n, e in bad.items()} == {
        n: (e.kind, e.reasons) for n, e in bad.items()
    }
    assert all(row["line"] == str(n + 1) for n, row in quarantine.items())
    (malformed,) = (e for e in bad.values() if e.kind == "malformed_row")
    assert quarantine[malformed.number]["raw"] == malformed.raw
    assert set().union(*found.values()) == ALL_REASONS
    for number, entry in bad.items():  # a duplicate names the good row that was kept
        if entry.reasons & {"duplicate_image", "duplicate_image_path"}:
            assert entry.source in good
            assert f"line {entry.source + 1} (kept)" in quarantine[number]["details"]

    assert summary["input_rows"] == len(entries) == len(validated) + len(quarantine)
    assert summary["valid_rows"] == len(validated) and summary["quarantined_rows"] == len(bad)
    assert summary["quarantined_by_reason"] == dict(
        Counter(reason for e in bad.values() for reason in e.reasons)
    )
    written = json.loads((out / "summary.json").read_text())
    assert written["input_rows"] == written["valid_rows"] + written["quarantined_rows"]
    assert written["input_rows"] == summary["input_rows"]
    assert written["quarantined_by_reason"] == summary["quarantined_by_reason"]
    expectations = json.loads((out / "expectations.json").read_text())
    assert expectations["success"] is False and summary["expectations"]["success"] is False
    assert summary["expectations"]["failed_table_expectations"] == []
    assert (out / "data_docs" / "index.html").is_file()

    grocery_products = {e.values["product_id"] for e in grocery_rows}
    assert {row["product_id"] for row in validated.values()} == grocery_products
    assert summary["valid_products"] == len(grocery_products) == 81
    assert Counter(row["image_format"] for row in validated.values()) == {
        "JPEG": len(grocery_rows),
        "WEBP": 1,
        "PNG": 1,
    }
    decoded_bad = [e for e in bad.values() if not e.reasons & REFUSED_BEFORE_DECODING]
    checked = [e for e in entries if not e.raw and e.values["image_path"]]
    assert summary["images"]["checked"] == len(checked)
    assert summary["images"]["decoded"] == len(good) + len(decoded_bad)
    assert summary["images"]["reused_from_previous"] == 0

    # The next night: 5% of the good photos were replaced by new files (new bytes, same path).
    n_changed = round(CHANGED_SHARE * len(good))
    step = len(untouched) // n_changed
    changed = [grocery_rows[i] for i in untouched[::step][:n_changed]]
    assert len(changed) == n_changed
    shared_hashes = {e.number: _sha256(grocery_root / e.values["image_path"]) for e in changed}
    for entry in changed:
        target = root / entry.values["image_path"]
        fresh = target.with_name(target.name + ".new")
        with Image.open(target) as image:
            image.save(fresh, format="JPEG", quality=83)
        os.replace(fresh, target)  # replaces the link; the shared file keeps its bytes

    out2 = tmp_path / "night2"
    summary2 = validate_catalog(manifest, out2, config, previous=out, progress=False)

    assert summary2["images"]["decoded"] == n_changed
    final_undecoded = sum(1 for e in bad.values() if e.kind in FINAL_UNDECODED_KINDS)
    reusable_first_night = summary["images"]["decoded"] + final_undecoded
    assert summary2["images"]["reused_from_previous"] == reusable_first_night - n_changed
    validated2, quarantine2 = _read(out2 / "validated.csv"), _read(out2 / "quarantine.csv")
    assert set(validated2) == set(good) and set(quarantine2) == set(bad)
    assert {n: row["reasons"] for n, row in quarantine2.items()} == {
        n: row["reasons"] for n, row in quarantine.items()
    }
    new_hash = {n for n in good if validated2[n]["image_sha256"] != validated[n]["image_sha256"]}
    assert new_hash == {e.number for e in changed}
    for key in ("input_rows", "valid_rows", "quarantined_rows", "quarantined_by_reason"):
        assert summary2[key] == summary[key]

    # The shared data folder was only read.
    assert _fingerprint(grocery_root, grocery_rows) == shared_before
    assert {
        e.number: _sha256(grocery_root / e.values["image_path"]) for e in changed
    } == shared_hashes
