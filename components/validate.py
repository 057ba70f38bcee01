"""The validate step: catalogue manifest + images in; validated manifest and quarantine out.

Every input row ends in exactly one of two files, ``validated.csv`` or ``quarantine.csv``
(the latter with every reason the row failed), and ``summary.json`` counts them by reason.
A bad row never stops the good ones; only a manifest that cannot be read at all is an error.
The CLI, the DVC stage, the KFP component and the Airflow task all call
:func:`validate_catalog`.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.catalog.config import ValidationConfig
from components.catalog.image_checks import ImageCheck, ImageFacts, check_images
from components.catalog.snapshot import SNAPSHOT_FILE, read_snapshot, write_snapshot
from model.datasets import find_manifest
from model.datasets.catalog import IMAGE_URI_COLUMN, ManifestRow, read_manifest
from model.jsonfile import write_json

log = logging.getLogger(__name__)

VALIDATED_FILE = "validated.csv"
QUARANTINE_FILE = "quarantine.csv"
SUMMARY_FILE = "summary.json"
EXPECTATIONS_FILE = "expectations.json"
DATA_DOCS_DIR = "data_docs"
# Columns validation adds to each valid row.
ADDED_COLUMNS = ("source_row", IMAGE_URI_COLUMN, "image_sha256", "image_format", "width", "height")
QUARANTINE_COLUMNS = ("source_row", "line", "reasons", "details")
_DUPLICATES = ("duplicate_image_path", "duplicate_image")


class ValidationInvariantError(RuntimeError):
    """Input rows != valid rows + quarantined rows: a bug, never a property of the data."""


@dataclass
class _RowVerdict:
    """Everything decided about one input row."""

    row: ManifestRow
    reasons: list[tuple[str, str]] = field(default_factory=list)
    image: ImageCheck | None = None

    def add(self, reason: str, detail: str) -> None:
        if reason not in self.codes:
            self.reasons.append((reason, detail))

    @property
    def codes(self) -> list[str]:
        return [reason for reason, _ in self.reasons]

    def fine_apart_from_duplicates(self) -> bool:
        return all(reason in _DUPLICATES for reason in self.codes)


def validate_catalog(
    catalogue: str | Path,
    out_dir: str | Path,
    config: ValidationConfig | None = None,
    *,
    root: str | Path | None = None,
    previous: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Validate a catalogue: the GX manifest suite, then the image checks, then the split.

    Args:
        catalogue: The manifest (CSV or Parquet) or a folder holding ``manifest.csv`` or
            ``manifest.parquet``.
        out_dir: Folder for ``validated.csv``, ``quarantine.csv``, ``summary.json``,
            ``expectations.json``, ``image_facts.csv`` and ``data_docs/`` (created; files of
            an earlier run there are replaced).
        config: Thresholds; the defaults of :class:`ValidationConfig` when None.
        root: The catalogue root image paths are relative to; the manifest's folder if None.
        previous: An earlier run's ``out_dir``: images whose content hash it knows are not
            decoded again.
        progress: Show a progress bar while checking images.

    Returns:
        The summary (also written to ``summary.json``): row counts, counts by reason, images
        decoded and reused, the suite's outcome, timings and output paths.

    Raises:
        DatasetFormatError: The manifest (or the previous snapshot) cannot be read at all.
    """
    config = config or ValidationConfig()
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    manifest = find_manifest(Path(catalogue).expanduser())
    table = read_manifest(manifest, config.required_columns)
    image_root = table.path.parent if root is None else Path(root).expanduser().resolve()
    known: dict[str, ImageFacts] = read_snapshot(Path(previous)) if previous else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = [_RowVerdict(row) for row in table.rows]
    for verdict in verdicts:
        if verdict.row.problem:
            verdict.add("malformed_row", verdict.row.problem)
    seconds["read"] = time.perf_counter() - started

    tick = time.perf_counter()
    suite = _run_manifest_suite(table.columns, verdicts, config, out)
    seconds["suite"] = time.perf_counter() - tick

    tick = time.perf_counter()
    to_check = [v for v in verdicts if not v.row.problem and v.row.values.get("image_path")]
    checks = check_images(
        [v.row.values["image_path"] for v in to_check],
        image_root,
        config.images,
        known,
        workers=config.workers,
        progress=progress,
    )
    for verdict, check in zip(to_check, checks, strict=True):
        verdict.image = check
        for reason, detail in check.problems:
            verdict.add(reason, detail)
    _settle_duplicates(verdicts)
    seconds["images"] = time.perf_counter() - tick

    tick = time.perf_counter()
    valid = [v for v in verdicts if not v.reasons]
    quarantined = [v for v in verdicts if v.reasons]
    if len(valid) + len(quarantined) != len(table.rows):
        raise ValidationInvariantError(
            f"{len(table.rows)} input rows but {len(valid)} valid + {len(quarantined)} quarantined"
        )
    _write_valid(out / VALIDATED_FILE, table.columns, valid)
    _write_quarantine(out / QUARANTINE_FILE, table.columns, quarantined)
    write_snapshot(out / SNAPSHOT_FILE, (c.facts for c in checks if c.facts is not None))
    seconds["write"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started

    by_reason = Counter(reason for v in quarantined for reason in v.codes)
    decoded = sum(c.decoded for c in checks)
    reused = sum(1 for c in checks if c.facts is not None and not c.decoded and c.facts.reusable)
    summary: dict[str, Any] = {
        "catalogue": str(table.path),
        "image_root": str(image_root),
        "input_rows": len(table.rows),
        "valid_rows": len(valid),
        "quarantined_rows": len(quarantined),
        "quarantined_by_reason": dict(sorted(by_reason.items())),
        "valid_products": len({v.row.values["product_id"] for v in valid}),
        "images": {
            "checked": len(checks),
            "decoded": decoded,
            "reused_from_previous": reused if known else 0,
            "previous": str(Path(previous).resolve()) if previous else None,
        },
        "expectations": suite,
        "seconds": seconds,
        "outputs": {
            "validated": str(out / VALIDATED_FILE),
            "quarantine": str(out / QUARANTINE_FILE),
            "snapshot": str(out / SNAPSHOT_FILE),
            "expectations": str(out / EXPECTATIONS_FILE),
            "data_docs": suite.get("data_docs"),
        },
        "config": config.to_dict(),
    }
    write_json(out / SUMMARY_FILE, summary)
    log.info(
        "validated %s: %d rows in, %d valid, %d quarantined (%s)",
        table.path,
        len(table.rows),
        len(valid),
        len(quarantined),
        ", ".join(f"{k} {n}" for k, n in by_reason.most_common()) or "none",
    )
    return summary


def _run_manifest_suite(
    columns: list[str], verdicts: Sequence[_RowVerdict], config: ValidationConfig, out: Path
) -> dict[str, Any]:
    """Run the GX suite over the readable rows, record row reasons, write its results."""
    from components.catalog.expectations import manifest_frame, run_suite

    frame = manifest_frame(
        {v.row.number: v.row.values for v in verdicts if not v.row.problem}, columns
    )
    docs_dir = out / DATA_DOCS_DIR
    shutil.rmtree(docs_dir, ignore_errors=True)
    outcome = run_suite(frame, config, docs_dir if config.data_docs else None)
    by_number = {v.row.number: v for v in verdicts}
    for number, reasons in outcome.row_reasons.items():
        for reason, detail in reasons:
            by_number[number].add(reason, detail)
    write_json(out / EXPECTATIONS_FILE, outcome.result)
    statistics = outcome.result.get("statistics", {})
    return {
        "success": outcome.success,
        "evaluated": statistics.get("evaluated_expectations"),
        "successful": statistics.get("successful_expectations"),
        "failed_table_expectations": outcome.failed_table_expectations,
        "data_docs": str(outcome.data_docs) if outcome.data_docs else None,
    }


def _settle_duplicates(verdicts: Sequence[_RowVerdict]) -> None:
    """Keep one row of each duplicate group and quarantine the others.

    Rows sharing an ``image_path`` (flagged by the suite), or whose images pass every image
    check and have the same content hash, form a group; the first row with no other problem
    is kept (or, if every row has one, the first row), and each other row is quarantined
    naming the row that was kept.
    """
    by_path: dict[str, list[_RowVerdict]] = defaultdict(list)
    by_hash: dict[str, list[_RowVerdict]] = defaultdict(list)
    for verdict in verdicts:
        if "duplicate_image_path" in verdict.codes:
            by_path[verdict.row.values["image_path"]].append(verdict)
        image = verdict.image
        if image is not None and image.facts is not None and not image.problems:
            by_hash[image.facts.sha256].append(verdict)  # copies of a bad file add nothing
    for group in by_path.values():
        keeper = _keeper(group)
        keeper.reasons = [r for r in keeper.reasons if r[0] != "duplicate_image_path"]
        kept = f"image_path also on {keeper.row.where} (kept)"
        for verdict in group:
            if verdict is not keeper:
                verdict.reasons = [
                    (r, kept if r == "duplicate_image_path" else d) for r, d in verdict.reasons
                ]
    for group in by_hash.values():
        if len(group) < 2:
            continue
        keeper = _keeper(group)
        for verdict in group:
            if verdict is not keeper:
                verdict.add("duplicate_image", f"same image content as {keeper.row.where} (kept)")


def _keeper(group: list[_RowVerdict]) -> _RowVerdict:
    return next((v for v in group if v.fine_apart_from_duplicates()), group[0])


def _write_valid(path: Path, columns: list[str], verdicts: Sequence[_RowVerdict]) -> None:
    """The validated manifest: the input columns plus what validation learnt of each image."""
    header = [c for c in columns if c not in ADDED_COLUMNS] + list(ADDED_COLUMNS)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for verdict in verdicts:
            assert verdict.image is not None and verdict.image.facts is not None
            facts = verdict.image.facts
            writer.writerow(
                {
                    **verdict.row.values,
                    "source_row": verdict.row.number,
                    IMAGE_URI_COLUMN: verdict.image.location,
                    "image_sha256": facts.sha256,
                    "image_format": facts.format,
                    "width": facts.width,
                    "height": facts.height,
                }
            )


def _write_quarantine(path: Path, columns: list[str], verdicts: Sequence[_RowVerdict]) -> None:
    """One row per rejected input row: where it was, every reason, and all its data."""
    header = list(QUARANTINE_COLUMNS) + [c for c in columns if c not in QUARANTINE_COLUMNS]
    header.append("raw")
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for verdict in verdicts:
            writer.writerow(
                {
                    **verdict.row.values,
                    "source_row": verdict.row.number,
                    "line": verdict.row.line if verdict.row.line is not None else "",
                    "reasons": ";".join(verdict.codes),
                    "details": "; ".join(detail for _, detail in verdict.reasons),
                    "raw": verdict.row.raw,
                }
            )
