"""The validate step: every row valid or quarantined with every reason, outputs, increments."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from components.catalog.bad_rows import DEMO_BAD_ROWS
from components.catalog.config import ValidationConfig
from components.catalog.demo import generate_demo_catalog
from components.validate import validate_catalog
from model.datasets import DatasetFormatError, load_dataset

REPO = Path(__file__).resolve().parents[1]
FAST = ValidationConfig(data_docs=False)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo catalogue (12 products x 3 photos) with one bad row of each kind appended."""
    root = tmp_path_factory.mktemp("demo")
    return generate_demo_catalog(root, products=12, photos_per_product=3, progress=False)


@pytest.fixture(scope="module")
def demo_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_out")
    return out, validate_catalog(demo, out, progress=False)


def test_demo_bad_rows_each_get_their_reasons(demo: Path, demo_run: tuple[Path, dict]) -> None:
    out, summary = demo_run
    rows = _csv(demo)
    good = rows[: 12 * 3]
    bad = rows[12 * 3 :]
    assert len(bad) == len(DEMO_BAD_ROWS)
    quarantine = {int(r["source_row"]): r for r in _csv(out / "quarantine.csv")}
    for number, expected in enumerate(DEMO_BAD_ROWS.values(), start=len(good) + 1):
        assert set(quarantine[number]["reasons"].split(";")) == set(expected), number
        assert quarantine[number]["details"]
    valid = _csv(out / "validated.csv")
    assert [r["image_path"] for r in valid] == [r["image_path"] for r in good]
    assert summary["input_rows"] == len(rows) == summary["valid_rows"] + summary["quarantined_rows"]
    assert summary["valid_products"] == 12
    assert sum(summary["quarantined_by_reason"].values()) == sum(
        len(reasons) for reasons in DEMO_BAD_ROWS.values()
    )
    assert summary["expectations"]["success"] is False
    assert (out / "data_docs" / "index.html").is_file()
    results = json.loads((out / "expectations.json").read_text())
    assert results["success"] is False and results["results"]


def test_validated_manifest_trains_directly(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    dataset = load_dataset("catalog", out / "validated.csv")
    records = dataset.train + dataset.splits["test"]
    assert len(records) == 36 and all(r.path.is_file() for r in records)
    row = _csv(out / "validated.csv")[0]
    assert {"image_uri", "image_sha256", "width", "height", "image_format", "source_row"} <= set(
        row
    )
    assert row["width"] == "224" and row["image_format"] == "JPEG"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _photo(root: Path, name: str, colour: tuple[int, int, int]) -> str:
    (root / "images").mkdir(exist_ok=True)
    Image.new("RGB", (90, 90), colour).save(root / "images" / name)
    return f"images/{name}"


def test_malformed_rows_and_extra_columns_travel(tmp_path: Path) -> None:
    a = _photo(tmp_path, "a.jpg", (250, 0, 0))
    b = _photo(tmp_path, "b.jpg", (0, 250, 0))
    manifest = _write(
        tmp_path / "manifest.csv",
        "product_id,image_path,category,title,price,brand\n"
        f"P1,{a},mugs,Red mug,3.5,Acme\n"
        f"P2,{b},mugs,Green mug,4,Acme,surplus\n"
        "P3,images/c.jpg,mugs\n",
    )
    summary = validate_catalog(manifest, tmp_path / "out", FAST, progress=False)
    assert (summary["valid_rows"], summary["quarantined_rows"]) == (1, 2)
    (valid,) = _csv(tmp_path / "out" / "validated.csv")
    assert valid["brand"] == "Acme" and valid["title"] == "Red mug"
    quarantine = _csv(tmp_path / "out" / "quarantine.csv")
    assert [q["reasons"] for q in quarantine] == ["malformed_row", "malformed_row"]
    assert quarantine[0]["line"] == "3" and quarantine[0]["raw"].endswith("Acme,surplus")
    assert "expected 6 fields" in quarantine[1]["details"]


def test_first_clean_duplicate_is_kept(tmp_path: Path) -> None:
    a = _photo(tmp_path, "a.jpg", (250, 0, 0))
    (tmp_path / "images" / "copy.jpg").write_bytes((tmp_path / a).read_bytes())
    manifest = _write(
        tmp_path / "manifest.csv",
        "product_id,image_path,category,title,price\n"
        f"P1,{a},mugs,Mug,-1\n"  # bad price: not the one to keep
        f"P1,{a},mugs,Mug,2\n"  # same path, clean: kept
        "P1,images/copy.jpg,mugs,Mug,2\n",  # same bytes: duplicate of the kept row
    )
    validate_catalog(manifest, tmp_path / "out", FAST, progress=False)
    (valid,) = _csv(tmp_path / "out" / "validated.csv")
    assert valid["source_row"] == "2"
    reasons = {
        q["source_row"]: set(q["reasons"].split(";"))
        for q in _csv(tmp_path / "out" / "quarantine.csv")
    }
    assert reasons == {
        "1": {"price_out_of_range", "duplicate_image_path", "duplicate_image"},
        "3": {"duplicate_image"},
    }


def test_manifest_rules(tmp_path: Path) -> None:
    rows = ["product_id,image_path,category,title,price"]
    cases = {
        "missing_category": "P1,{img},,T,1",
        "missing_title": "P1,{img},c,,1",
        "missing_price": "P1,{img},c,T,",
        "price_not_a_number": "P1,{img},c,T,1.2.3",
        "price_out_of_range": "P1,{img},c,T,2000001",
        "unknown_category": "P1,{img},other,T,1",
        "title_too_long": "P1,{img},c," + "x" * 501 + ",1",
        "product_id_too_long": "P" * 129 + ",{img},c,T,1",
    }
    for i, template in enumerate(cases.values()):
        rows.append(template.format(img=_photo(tmp_path, f"{i}.jpg", (20 * i, 100, 50))))
    rows.append("P2,{img},c,T,1e2".format(img=_photo(tmp_path, "ok.jpg", (1, 2, 3))))
    manifest = _write(tmp_path / "manifest.csv", "\n".join(rows) + "\n")
    config = ValidationConfig(categories=("c",), max_price=2_000_000, data_docs=False)
    summary = validate_catalog(manifest, tmp_path / "out", config, progress=False)
    got = [q["reasons"] for q in _csv(tmp_path / "out" / "quarantine.csv")]
    assert got == list(cases)
    assert summary["valid_rows"] == 1


def test_parquet_manifest(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "product_id": ["P1", "P2"],
            "image_path": [_photo(tmp_path, "a.png", (9, 9, 9)), "images/none.jpg"],
            "category": ["c", "c"],
            "title": ["A", "B"],
            "price": [1.25, 3.0],
            "stock": [4, 5],
        }
    )
    frame.to_parquet(tmp_path / "manifest.parquet")
    summary = validate_catalog(tmp_path, tmp_path / "out", FAST, progress=False)
    assert (summary["valid_rows"], summary["quarantined_by_reason"]) == (1, {"file_missing": 1})
    (valid,) = _csv(tmp_path / "out" / "validated.csv")
    assert (valid["price"], valid["stock"], valid["image_format"]) == ("1.25", "4", "PNG")


def test_incremental_run_decodes_only_changed_images(demo: Path, tmp_path: Path) -> None:
    import shutil

    catalogue = tmp_path / "catalogue"
    shutil.copytree(demo.parent, catalogue)
    first = validate_catalog(catalogue, tmp_path / "night1", FAST, progress=False)
    rows = _csv(catalogue / "manifest.csv")[:36]
    changed = rows[::18]  # 2 of 36 good rows, about 5%
    for row in changed:
        with Image.open(catalogue / row["image_path"]) as image:
            image.rotate(90).save(catalogue / row["image_path"])
    second = validate_catalog(
        catalogue, tmp_path / "night2", FAST, previous=tmp_path / "night1", progress=False
    )
    assert first["images"]["decoded"] > 36
    assert second["images"]["decoded"] == len(changed)
    # Everything else is known by hash, except files never read (missing, path escape) and
    # files refused on their header alone, whose header is read again (tiny, GIF, bomb).
    unread, header_only = 2, 3
    assert second["images"]["reused_from_previous"] == (
        first["images"]["checked"] - len(changed) - unread - header_only
    )
    for key in ("valid_rows", "quarantined_rows", "quarantined_by_reason"):
        assert second[key] == first[key]
    with pytest.raises(DatasetFormatError, match=r"no image_facts\.csv"):
        validate_catalog(catalogue, tmp_path / "night3", FAST, previous=tmp_path, progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "components.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"product_id,image_path,title,price\nP1,a.jpg,t,1\n",
            "missing required column(s) category",
        ),
        (
            b"product_id,image_path,category,title,price\nP1,a.jpg,c,caf\xe9,1\n",
            "line 2: expected UTF-8",
        ),
        (b"", "the file is empty"),
        (b"product_id,image_path,category,title,price\n", "no image rows"),
    ],
    ids=["missing-column", "not-utf8", "empty", "header-only"],
)
def test_unreadable_manifest_is_one_clear_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    (tmp_path / "manifest.csv").write_bytes(content)
    result = _cli("validate", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "validated.csv").exists()


def test_cli_validate_prints_counts_and_writes_json(demo: Path, tmp_path: Path) -> None:
    result = _cli(
        "validate",
        str(demo),
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(tmp_path / "s.json"),
        "--no-data-docs",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "48 rows in: 36 valid (12 products), 12 quarantined" in result.stdout
    assert "path_escape" in result.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["outputs"]["data_docs"] is None and summary["valid_rows"] == 36
