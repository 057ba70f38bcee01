"""Dataset readers on tiny files written in the official formats, and on the shared real data."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model.datasets import (
    DATASET_NAMES,
    DatasetFormatError,
    ImageFileDataset,
    collate_skipping_unreadable,
    load_catalog,
    load_dataset,
    load_inshop,
    load_sop,
    report_skipped,
)

SOP_HEADER = "image_id class_id super_class_id path\n"
INSHOP_HEADER = "image_name item_id evaluation_status\n"


def write_jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> Path:
    """Write a small real JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, format="JPEG")
    return path


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A transform without torchvision: HWC uint8 to CHW float."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def write_sop(root: Path) -> None:
    """Two train classes (ids 1, 10) and two test classes (ids 9, 2), blank trailing lines."""
    (root / "Ebay_train.txt").write_text(
        SOP_HEADER
        + "1 10 2 chair_final/c_0.JPG\n"
        + "2 10 2 chair_final/c_1.JPG\n"
        + "3 1 1 bicycle_final/b_0.JPG\n"
        + "\n\n"
    )
    (root / "Ebay_test.txt").write_text(
        SOP_HEADER
        + "1 9 1 bicycle_final/b_9.JPG\n"
        + "2 2 3 mug_final/m_0.JPG\r\n"
        + "3 2 3 mug_final/m_1.JPG\r\n"
    )


# --- Stanford Online Products ---------------------------------------------------------------


def test_sop_happy_path(tmp_path: Path) -> None:
    write_sop(tmp_path)
    write_jpeg(tmp_path / "chair_final" / "c_0.JPG")
    ds = load_sop(tmp_path)
    assert ds.name == "sop"
    assert ds.protocol == "sop"
    assert set(ds.splits) == {"train", "test"}
    assert len(ds.train) == 3
    assert len(ds.splits["test"]) == 3
    assert ds.query is ds.gallery is ds.splits["test"]
    assert ds.query_is_gallery
    # Dense labels per split, in ascending numeric class-id order (1 < 10, 2 < 9).
    assert [r.label for r in ds.train] == [1, 1, 0]
    assert [r.class_key for r in ds.train] == ["10", "10", "1"]
    assert [r.label for r in ds.splits["test"]] == [1, 0, 0]
    assert ds.num_classes("train") == 2
    # One super-class map over both files: ids 1, 2, 3 -> 0, 1, 2.
    assert [r.super_label for r in ds.train] == [1, 1, 0]
    assert [r.super_label for r in ds.splits["test"]] == [0, 2, 2]
    for record in ds.train + ds.splits["test"]:
        assert record.path.is_absolute()
    assert ds.train[0].path == tmp_path.resolve() / "chair_final" / "c_0.JPG"
    assert ds.train[0].path.is_file()
    # Existence is not checked here: the missing images are still listed.
    assert not ds.train[1].path.exists()


def test_sop_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    write_sop(tmp_path)
    (tmp_path / "Ebay_train.txt").write_text(
        SOP_HEADER + "1 1 1 a/0.jpg\n" + "2 1 a/1.jpg\n" + "3 1 1 a/2.jpg\n"
    )
    with pytest.raises(DatasetFormatError) as info:
        load_sop(tmp_path)
    message = str(info.value)
    assert message.startswith("Ebay_train.txt line 3: ")
    assert "expected 4 fields 'image_id class_id super_class_id path', got 3" in message
    assert info.value.line == 3
    assert info.value.path == tmp_path.resolve() / "Ebay_train.txt"


def test_sop_non_integer_id_names_line(tmp_path: Path) -> None:
    write_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").write_text(SOP_HEADER + "1 1 1 a/0.jpg\n" + "2 x7 1 a/1.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"Ebay_test\.txt line 3: .*class_id.*'x7'"):
        load_sop(tmp_path)


def test_sop_bad_header(tmp_path: Path) -> None:
    write_sop(tmp_path)
    (tmp_path / "Ebay_train.txt").write_text("1 1 1 a/0.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"Ebay_train\.txt line 1: expected the header"):
        load_sop(tmp_path)


def test_sop_missing_file(tmp_path: Path) -> None:
    write_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetFormatError) as info:
        load_sop(tmp_path)
    message = str(info.value)
    assert message.startswith(f"SOP file not found: {tmp_path.resolve() / 'Ebay_test.txt'}")
    assert "Ebay_train.txt and Ebay_test.txt" in message


def test_sop_not_utf8_names_line(tmp_path: Path) -> None:
    write_sop(tmp_path)
    (tmp_path / "Ebay_train.txt").write_bytes(
        SOP_HEADER.encode() + b"1 1 1 a/0.jpg\n2 1 1 a/\xff.jpg\n"
    )
    with pytest.raises(DatasetFormatError, match=r"Ebay_train\.txt line 3: expected UTF-8"):
        load_sop(tmp_path)


def test_sop_header_only_is_an_error(tmp_path: Path) -> None:
    write_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").write_text(SOP_HEADER)
    with pytest.raises(DatasetFormatError, match=r"Ebay_test\.txt: no image lines"):
        load_sop(tmp_path)


# --- DeepFashion In-Shop --------------------------------------------------------------------


def write_inshop(root: Path, lines: list[str], count: int | None = None) -> Path:
    """Write list_eval_partition.txt with the given data lines."""
    path = root / "list_eval_partition.txt"
    n = len(lines) if count is None else count
    path.write_text(f"{n}\n" + INSHOP_HEADER + "".join(line + "\n" for line in lines))
    return path


INSHOP_LINES = [
    "img/WOMEN/Dresses/id_00000002/02_1_front.jpg           id_00000002  train",
    "img/WOMEN/Dresses/id_00000002/02_2_side.jpg            id_00000002  train",
    "img/MEN/Denim/id_00000080/01_1_front.jpg               id_00000080  train",
    "img/WOMEN/Skirts/id_00000007/01_1_front.jpg            id_00000007  query",
    "img/WOMEN/Skirts/id_00000007/01_2_side.jpg             id_00000007  gallery",
    "img/WOMEN/Skirts/id_00000007/01_3_back.jpg             id_00000007  gallery",
    "img/MEN/Tees_Tanks/id_00000003/02_1_front.jpg          id_00000003  query",
    "img/MEN/Tees_Tanks/id_00000003/02_2_side.jpg           id_00000003  gallery",
    "img/WOMEN/Blouses_Shirts/id_00000005/01_1_front.jpg    id_00000005  gallery",
]


def test_inshop_happy_path(tmp_path: Path) -> None:
    write_inshop(tmp_path, INSHOP_LINES)
    ds = load_inshop(tmp_path)
    assert ds.name == "inshop"
    assert ds.protocol == "inshop"
    assert not ds.query_is_gallery
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (3, 2, 4)
    assert ds.query is ds.splits["query"]
    assert ds.gallery is ds.splits["gallery"]
    assert [r.label for r in ds.train] == [0, 0, 1]
    assert [r.class_key for r in ds.train] == ["id_00000002", "id_00000002", "id_00000080"]
    # Query and gallery share one label map over ids 3, 5, 7 -> 0, 1, 2.
    assert [r.label for r in ds.query] == [2, 0]
    assert [r.label for r in ds.gallery] == [2, 2, 0, 1]
    gallery_labels = {r.class_key: r.label for r in ds.gallery}
    for record in ds.query:
        assert gallery_labels[record.class_key] == record.label
    first = ds.train[0]
    assert first.path == tmp_path.resolve() / "img/WOMEN/Dresses/id_00000002/02_1_front.jpg"
    assert first.super_label is None


def test_inshop_wrong_count(tmp_path: Path) -> None:
    write_inshop(tmp_path, INSHOP_LINES, count=10)
    with pytest.raises(DatasetFormatError) as info:
        load_inshop(tmp_path)
    assert str(info.value).startswith("list_eval_partition.txt line 1: ")
    assert "10" in str(info.value) and "9" in str(info.value)


def test_inshop_count_not_an_integer(tmp_path: Path) -> None:
    path = write_inshop(tmp_path, INSHOP_LINES)
    path.write_text(path.read_text().replace("9\n", "nine\n", 1))
    with pytest.raises(DatasetFormatError, match=r"line 1: expected the number of images"):
        load_inshop(tmp_path)


def test_inshop_unknown_status_names_line(tmp_path: Path) -> None:
    lines = list(INSHOP_LINES)
    lines[2] = lines[2].replace("train", "validation")
    write_inshop(tmp_path, lines)
    with pytest.raises(DatasetFormatError) as info:
        load_inshop(tmp_path)
    message = str(info.value)
    assert message.startswith("list_eval_partition.txt line 5: ")
    assert "'validation'" in message
    assert info.value.line == 5


def test_inshop_wrong_field_count_and_header(tmp_path: Path) -> None:
    lines = [*INSHOP_LINES, "img/x.jpg id_00000009"]
    write_inshop(tmp_path, lines)
    with pytest.raises(DatasetFormatError, match=r"line 12: expected 3 fields"):
        load_inshop(tmp_path)
    (tmp_path / "list_eval_partition.txt").write_text(
        "1\nimage item status\nimg/a.jpg id_1 train\n"
    )
    with pytest.raises(DatasetFormatError, match=r"line 2: expected the header"):
        load_inshop(tmp_path)


def test_inshop_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"In-Shop file not found: .*list_eval_partition"):
        load_inshop(tmp_path)


# --- Vitrine catalogue manifest -------------------------------------------------------------


def write_manifest(root: Path, n_products: int = 30, images_per_product: int = 3) -> Path:
    """A CSV manifest of n_products, with a quoted title holding a comma and a newline."""
    rows = ["product_id,image_path,category,title,price"]
    for p in range(n_products):
        for k in range(images_per_product):
            category = "" if p == 0 else f"cat{p % 4}"
            rows.append(f'P{p:03d},images/P{p:03d}_{k}.jpg,{category},"Item {p}, size\nM",{p}.5')
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_catalog_happy_path(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    ds = load_catalog(manifest)
    assert ds.name == "catalog"
    assert ds.protocol == "sop"
    assert ds.root == tmp_path.resolve()
    assert ds.query is ds.gallery is ds.splits["test"]
    assert len(ds.train) + len(ds.splits["test"]) == 90
    assert ds.train and ds.splits["test"]
    for split in ("train", "test"):
        records = ds.splits[split]
        assert sorted({r.label for r in records}) == list(range(ds.num_classes(split)))
        keys = sorted({r.class_key for r in records})
        assert all(r.label == keys.index(r.class_key) for r in records)
    record = next(r for r in ds.train + ds.splits["test"] if r.class_key == "P001")
    assert record.path == tmp_path.resolve() / "images" / "P001_0.jpg"
    # Categories cat0..cat3 -> 0..3; product P000 has none.
    assert record.super_label == 1
    assert all(r.super_label is None for r in ds.train + ds.splits["test"] if r.class_key == "P000")


def test_catalog_split_is_by_product_and_deterministic(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    ds = load_catalog(manifest, seed=3)
    train_products = {r.class_key for r in ds.train}
    test_products = {r.class_key for r in ds.splits["test"]}
    assert not train_products & test_products
    assert len(train_products | test_products) == 30
    again = load_catalog(manifest, seed=3)
    assert again.splits == ds.splits
    other = load_catalog(manifest, seed=4)
    assert {r.class_key for r in other.splits["test"]} != test_products
    assert not load_catalog(manifest, test_fraction=0.0).splits["test"]
    assert not load_catalog(manifest, test_fraction=1.0).train
    with pytest.raises(ValueError, match="test_fraction"):
        load_catalog(manifest, test_fraction=1.5)


def test_catalog_split_is_stable_when_products_are_added(tmp_path: Path) -> None:
    small = load_catalog(write_manifest(tmp_path, n_products=10))
    big = load_catalog(write_manifest(tmp_path, n_products=30))
    small_test = {r.class_key for r in small.splits["test"]}
    big_test = {r.class_key for r in big.splits["test"]}
    assert small_test == {k for k in big_test if int(k[1:]) < 10}


def test_catalog_image_root_override(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, n_products=2)
    ds = load_catalog(manifest, root=tmp_path / "elsewhere", test_fraction=0.0)
    assert ds.root == (tmp_path / "elsewhere").resolve()
    assert ds.train[0].path == (tmp_path / "elsewhere").resolve() / "images" / "P000_0.jpg"


def test_catalog_missing_column(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("product_id,path\nP1,a.jpg\n")
    with pytest.raises(DatasetFormatError) as info:
        load_catalog(manifest)
    assert str(info.value).startswith("manifest.csv line 1: missing required column(s) image_path")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_catalog_empty_file(tmp_path: Path, content: str) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)
    with pytest.raises(DatasetFormatError, match=r"manifest\.csv: the file is empty"):
        load_catalog(manifest)


def test_catalog_header_only(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("product_id,image_path\n")
    with pytest.raises(DatasetFormatError, match=r"manifest\.csv: no image rows"):
        load_catalog(manifest)


def test_catalog_not_utf8_names_line(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"product_id,image_path,title\nP1,a.jpg,ok\nP2,b.jpg,caf\xe9\n")
    with pytest.raises(DatasetFormatError, match=r"manifest\.csv line 3: expected UTF-8"):
        load_catalog(manifest)


def test_catalog_bad_rows_name_their_line(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    # The quoted title spans lines 2-3, so the short row is on line 5.
    manifest.write_text('product_id,image_path,title\nP1,a.jpg,"two\nlines"\n\nP2,b.jpg\n')
    with pytest.raises(DatasetFormatError, match=r"manifest\.csv line 5: expected 3 fields"):
        load_catalog(manifest)
    manifest.write_text("product_id,image_path\r\nP1,a.jpg\r\n,b.jpg\r\n")
    with pytest.raises(DatasetFormatError, match=r"manifest\.csv line 3: .*product_id"):
        load_catalog(manifest)


def test_catalog_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="catalogue manifest not found"):
        load_catalog(tmp_path / "nope.csv")


def test_catalog_parquet_without_pandas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pandas and pyarrow"):
        load_catalog(manifest)


# --- load_dataset ---------------------------------------------------------------------------


def test_load_dataset_by_name(tmp_path: Path) -> None:
    assert DATASET_NAMES == ("sop", "inshop", "catalog")
    write_sop(tmp_path)
    write_inshop(tmp_path, INSHOP_LINES)
    manifest = write_manifest(tmp_path, n_products=4)
    assert load_dataset("sop", tmp_path).protocol == "sop"
    assert load_dataset("inshop", str(tmp_path)).protocol == "inshop"
    from_folder = load_dataset("catalog", tmp_path, seed=1)
    from_file = load_dataset("catalog", manifest, seed=1)
    assert from_folder.splits == from_file.splits
    other_root = load_dataset("catalog", manifest, image_root=tmp_path / "x", test_fraction=0)
    assert other_root.train[0].path.parent.parent == (tmp_path / "x").resolve()


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sop, inshop, catalog"):
        load_dataset("cub200", tmp_path)
    with pytest.raises(DatasetFormatError, match=r"manifest\.csv"):
        load_dataset("catalog", tmp_path)


# --- image loading --------------------------------------------------------------------------


@pytest.fixture
def image_records(tmp_path: Path) -> list:
    """Five records: two good JPEGs, a corrupt file, a truncated JPEG and a missing file."""
    write_jpeg(tmp_path / "a.jpg", (255, 0, 0))
    write_jpeg(tmp_path / "b.jpg", (0, 0, 255))
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    full = write_jpeg(tmp_path / "full.jpg", (0, 255, 0), size=64).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    lines = [f"{i + 1} {i % 2 + 1} 1 {name}\n" for i, name in enumerate(["a.jpg", "corrupt.jpg"])]
    lines += ["3 1 1 b.jpg\n", "4 2 1 truncated.jpg\n", "5 2 1 missing.jpg\n"]
    (tmp_path / "Ebay_train.txt").write_text(SOP_HEADER + "".join(lines))
    (tmp_path / "Ebay_test.txt").write_text(SOP_HEADER + "1 3 1 a.jpg\n")
    return load_sop(tmp_path).train


def test_image_dataset_returns_none_for_unreadable(image_records: list) -> None:
    ds = ImageFileDataset(image_records, to_tensor)
    assert len(ds) == 5
    image, label, index = ds[0]
    assert image.shape == (3, 8, 8)
    assert image[0].mean() > 0.9 and image[2].mean() < 0.1  # red, decoded as RGB
    assert (label, index) == (0, 0)
    assert ds[1] is None  # corrupt
    assert ds[2][1:] == (0, 2)
    assert ds[3] is None  # truncated
    assert ds[4] is None  # missing


def test_image_dataset_converts_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 4), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    (tmp_path / "Ebay_train.txt").write_text(SOP_HEADER + "1 1 1 gray.png\n2 1 1 rgba.png\n")
    (tmp_path / "Ebay_test.txt").write_text(SOP_HEADER + "1 2 1 gray.png\n")
    ds = ImageFileDataset(load_sop(tmp_path).train, to_tensor)
    assert ds[0][0].shape == ds[1][0].shape == (3, 4, 4)


def test_image_dataset_decodes_as_query_uploads_are_decoded(tmp_path: Path) -> None:
    """A catalogue photo is embedded as the same photo uploaded as a query would be: turned
    by its EXIF orientation, and 16-bit grayscale scaled rather than clipped."""
    from serving.uploads import UploadLimits, decode_upload

    sideways = Image.new("RGB", (40, 20), "blue")
    sideways.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    sideways.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (20, 1))
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    sideways.resize((1600, 800)).save(tmp_path / "big.jpg", quality=90, exif=exif)
    (tmp_path / "Ebay_train.txt").write_text(
        SOP_HEADER + "1 1 1 phone.jpg\n2 1 1 wide.png\n3 1 1 big.jpg\n"
    )
    (tmp_path / "Ebay_test.txt").write_text(SOP_HEADER + "1 2 1 phone.jpg\n")
    names = ("phone.jpg", "wide.png", "big.jpg")
    for side in (None, 200):  # full size (training), and scaled to a model's resize side
        ds = ImageFileDataset(load_sop(tmp_path).train, np.asarray, decode_side=side)
        for name, (pixels, _, _) in zip(names, (ds[0], ds[1], ds[2]), strict=True):
            data = (tmp_path / name).read_bytes()
            query = decode_upload(data, None, UploadLimits(), decode_side=side)
            np.testing.assert_array_equal(pixels, np.asarray(query))
        assert ds[0][0].shape == (40, 20, 3)  # upright: 20 wide, 40 high
        assert ds[1][0].max() == 255 and abs(ds[1][0].mean() - 127.5) < 2
        assert ds[2][0].shape == ((1600, 800, 3) if side is None else (400, 200, 3))


def test_collate_drops_unreadable(image_records: list) -> None:
    loader = DataLoader(
        ImageFileDataset(image_records, to_tensor),
        batch_size=5,
        collate_fn=collate_skipping_unreadable,
    )
    images, labels, indices = next(iter(loader))
    assert images.shape == (2, 3, 8, 8)
    assert labels.tolist() == [0, 0]
    assert indices.tolist() == [0, 2]
    assert labels.dtype == indices.dtype == torch.long


def test_collate_all_unreadable_batch_is_empty() -> None:
    images, labels, indices = collate_skipping_unreadable([None, None])
    assert images.shape == (0, 0, 0, 0)
    assert labels.shape == indices.shape == (0,)
    assert indices.dtype == torch.long


def test_report_skipped(image_records: list, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.datasets")
    with caplog.at_level(logging.WARNING, logger="test.datasets"):
        report_skipped(image_records, [], logger)
        assert not caplog.records
        report_skipped(image_records, [1, 3, 4], logger, max_paths=2)
    (record,) = caplog.records
    assert "skipped 3 of 5 images" in record.getMessage()
    assert "corrupt.jpg" in record.getMessage()
    assert "truncated.jpg" in record.getMessage()
    assert "missing.jpg" not in record.getMessage()
    assert "and 1 more" in record.getMessage()


# --- the real Grocery Store data in both formats --------------------------------------------


def test_grocery_sop(grocery_root: Path) -> None:
    ds = load_sop(grocery_root)
    assert len(ds.train) == 2822
    assert len(ds.splits["test"]) == 2680
    assert (ds.num_classes("train"), ds.num_classes("test")) == (41, 40)
    assert not {r.class_key for r in ds.train} & {r.class_key for r in ds.splits["test"]}
    for record in ds.train + ds.splits["test"]:
        assert record.path.is_file(), record.path


def test_grocery_inshop(grocery_root: Path) -> None:
    ds = load_inshop(grocery_root)
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (2822, 1197, 1483)
    gallery = {(r.class_key, r.label) for r in ds.gallery}
    for record in ds.query:
        assert (record.class_key, record.label) in gallery
    for record in ds.train + ds.query + ds.gallery:
        assert record.path.is_file(), record.path


def test_grocery_images_load(grocery_root: Path) -> None:
    records = load_inshop(grocery_root).query[:4]
    batch = collate_skipping_unreadable(
        [ImageFileDataset(records, lambda im: to_tensor(im.resize((32, 32))))[i] for i in range(4)]
    )
    assert batch[0].shape == (4, 3, 32, 32)
    assert batch[2].tolist() == [0, 1, 2, 3]
