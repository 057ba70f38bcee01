"""Admin changes hold to the catalogue: its validation rules, one owner per photo, a product's
extra fields; and what the service reports stays true (the canary after removals, the row
count and categories across a rollout). On real Milvus Lite, through the HTTP API."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.index import IndexBuildConfig, build_index
from serving.app import create_app
from serving.catalogue_rules import CatalogueRules, RuleBroken
from serving.uploads import UploadLimits
from tests.live_server import serve_in_thread
from tests.test_serving_api import (  # noqa: F401  (module fixtures)
    ADMIN,
    NEW_CATEGORY,
    PRODUCTS,
    World,
    _add,
    _error,
    _new_product_photo,
    _ok,
    _wait_ready,
    client,
    world,
)


def _rows(service: TestClient | httpx.Client) -> int:
    return _ok(service.get("/v1/info"))["rows"]


def test_a_photo_of_another_product_is_refused(client: TestClient, world: World) -> None:  # noqa: F811
    """The photo's bytes are its id: adding another product's photo would take it from that
    product (which may then vanish), so it is refused, as validation refuses duplicates."""
    rows = _rows(client)
    taken = _error(_add(client, world.photo("P00003", 1), ADMIN, product_id="NEW0003"), 409)
    assert taken["code"] == "image_of_another_product" and "'P00003'" in taken["message"]
    assert len(_ok(client.get("/v1/products/P00003"))["images"]) == 3
    _error(client.get("/v1/products/NEW0003"), 404, "unknown_product")
    assert _rows(client) == rows


def test_adds_and_updates_hold_to_the_catalogues_rules(client: TestClient, world: World) -> None:  # noqa: F811
    """The world's catalogue was validated with 32 px as the smallest side and the default
    price ceiling; what the next night's validation would quarantine is refused now."""
    rows, photo = _rows(client), _new_product_photo(seed=31)
    bad_id = _error(_add(client, photo, ADMIN, product_id="new\nline"), 422)
    assert bad_id["code"] == "invalid_product_id" and "line break" in bad_id["message"]
    expensive = _error(_add(client, photo, ADMIN, price="2000000"), 422, "price_out_of_range")
    assert "1e+06" in expensive["message"]
    for field in ("category", "title"):
        form = {"product_id": "NEW0004", "category": "toys", "title": "t", "price": "1"}
        form[field] = "   "
        files = {"image": ("new.jpg", photo, "image/jpeg")}
        answer = client.post("/v1/admin/products", files=files, data=form, headers=ADMIN)
        _error(answer, 422, f"invalid_{field}")
    small = io.BytesIO()
    Image.new("RGB", (24, 24), "red").save(small, "JPEG")
    tiny = _error(_add(client, small.getvalue(), ADMIN), 400, "image_too_small")
    assert "at least 32 px" in tiny["message"]
    twice = [("image", ("a.jpg", photo, "image/jpeg")), ("image", ("b.jpg", photo, "image/jpeg"))]
    form = {"product_id": "NEW0004", "category": "toys", "title": "t", "price": "1"}
    answer = client.post("/v1/admin/products", files=twice, data=form, headers=ADMIN)
    assert "'image'" in _error(answer, 422, "repeated_field")["message"]
    assert _rows(client) == rows  # nothing was added

    url = "/v1/admin/products/P00004"
    for change, code in [
        ({"price": True}, "invalid_request"),
        ({"price": "5"}, "invalid_request"),
        ({"price": 2e6}, "price_out_of_range"),
        ({"category": " "}, "invalid_category"),
        ({"title": ""}, "invalid_request"),
    ]:
        _error(client.patch(url, json=change, headers=ADMIN), 422, code)
    assert _ok(client.get("/v1/products/P00004"))["price"] == float(
        world.products["P00004"]["price"]
    )


def test_the_recorded_rules_decide_photo_formats_pixels_and_lengths(
    client: TestClient,  # noqa: F811
) -> None:
    """A catalogue validated to JPEG only, at most 10,000 pixels, with titles up to 1,000
    characters: the API refuses a PNG and a larger photo, and takes a 600-character title
    (longer than the defaults allow); spaces around fields go, as validation strips them."""
    pair = client.app.state.holder.current
    recorded = pair.metadata
    rules = CatalogueRules(formats=("JPEG",), max_pixels=10_000, max_title_length=1000, min_side=32)
    pair.metadata = {**recorded, "catalogue_rules": rules.to_dict()}
    try:
        photo = Image.open(io.BytesIO(_new_product_photo(seed=61)))  # 96 x 96 px
        png = io.BytesIO()
        photo.save(png, "PNG")
        refused = _add(client, png.getvalue(), ADMIN)
        assert refused.status_code == 415, refused.text
        large = io.BytesIO()
        photo.resize((128, 96)).save(large, "JPEG")
        _error(_add(client, large.getvalue(), ADMIN), 413, "too_many_pixels")

        form = {"product_id": " NEW0006 ", "category": f" {NEW_CATEGORY} ", "title": "t" * 600}
        files = {"image": ("new.jpg", _new_product_photo(seed=61), "image/jpeg")}
        added = client.post(
            "/v1/admin/products", files=files, data={**form, "price": "2"}, headers=ADMIN
        )
        assert added.status_code == 201, added.text
        product = _ok(client.get("/v1/products/NEW0006"))
        assert (product["category"], len(product["title"])) == (NEW_CATEGORY, 600)
        assert NEW_CATEGORY + " " not in _ok(client.get("/v1/info"))["categories"]
    finally:
        pair.metadata = {**pair.metadata, "catalogue_rules": recorded.get("catalogue_rules")}
        client.delete("/v1/admin/products/NEW0006", headers=ADMIN)


def test_an_admin_change_landing_after_a_swap_onto_the_same_collection_updates_the_new_pair(
    client: TestClient,  # noqa: F811
) -> None:
    """A request that took the old pair and then waited for the admin lock while a rollout
    swapped in a new pair of the same collection: the new pair's counts must follow it."""
    from serving.routes import _catalogue_changed

    holder, store = client.app.state.holder, client.app.state.store
    current = holder.current
    old = dataclasses.replace(current)  # the pair the request took
    rows = current.metadata["rows"]
    current.metadata = {**current.metadata, "rows": rows - 1}  # as read before the change
    client.portal.call(_catalogue_changed, holder, old, store, client.app.state.metrics, [])
    assert current.metadata["rows"] == rows == _ok(client.get("/v1/info"))["rows"]


def test_catalogue_rules_from_a_validation_summary_or_the_defaults(tmp_path: Path) -> None:
    rules = CatalogueRules(categories=("mugs", "toys"), max_price=50.0)
    assert CatalogueRules.of_metadata({"catalogue_rules": rules.to_dict()}) == rules
    assert CatalogueRules.of_metadata({}) == CatalogueRules()  # built before rules existed
    assert CatalogueRules.of_validated_manifest(tmp_path / "validated.csv") == CatalogueRules()
    with pytest.raises(RuleBroken, match="not one of the catalogue's: mugs, toys"):
        rules.check_fields(category="lamps")
    rules.check_fields(category="mugs", title="A mug", price=50.0)
    rules.check_product_id("SKU/12 a\u00e9")
    narrowed = CatalogueRules(formats=("JPEG",), max_pixels=100).upload_limits(UploadLimits())
    assert (narrowed.formats, narrowed.max_pixels, narrowed.min_side) == (("JPEG",), 100, 64)


@pytest.fixture(scope="module")
def branded(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:  # noqa: F811
    """A service over a collection of its own, built from the world's catalogue with a
    ``brand`` column: its tests remove products, which the shared collection must keep."""
    folder = tmp_path_factory.mktemp("branded")
    manifest = folder / "validated" / "validated.csv"
    manifest.parent.mkdir()
    shutil.copy(world.validated.with_name("summary.json"), manifest.with_name("summary.json"))
    with world.validated.open(newline="", encoding="utf-8") as source:
        rows = list(csv.DictReader(source))
    with manifest.open("w", newline="", encoding="utf-8") as target:
        writer = csv.DictWriter(target, [*rows[0], "brand"])
        writer.writeheader()
        writer.writerows({**row, "brand": f"brand-{row['product_id']}"} for row in rows)
    config = IndexBuildConfig(uri=str(folder / "milvus"))
    build_index(manifest, world.packages["a"], config, progress=False)
    settings = world.settings(
        milvus_uri=str(folder / "milvus"), upload_dir=str(folder / "uploads"), canary_interval_s=0
    )
    app = create_app(settings)
    with serve_in_thread(app, log_level="warning") as url, httpx.Client(base_url=url) as http:
        _wait_ready(http)
        yield http


def test_a_new_photo_of_a_product_takes_its_extra_fields(branded: httpx.Client) -> None:
    photo = _new_product_photo(seed=41)
    assert _add(branded, photo, ADMIN, product_id="P00001").status_code == 201
    files = {"image": ("q.jpg", photo, "image/jpeg")}
    first = _ok(branded.post("/v1/search/image", files=files, data={"top_k": "1"}))["results"][0]
    assert (first["product_id"], first["extra"]) == ("P00001", {"brand": "brand-P00001"})
    assert _ok(branded.get("/v1/products/P00001"))["extra"] == {"brand": "brand-P00001"}


def test_the_canary_leaves_out_products_removed_since_the_build(branded: httpx.Client) -> None:
    """Removing products through the admin API is no fault of the model or the index: their
    probes are left out, not counted as misses (which set off the critical alert)."""
    before = _ok(branded.post("/v1/admin/canary", headers=ADMIN))
    assert before["removed"] == 0
    for number in range(PRODUCTS // 2):
        _ok(branded.delete(f"/v1/admin/products/P{number:05d}", headers=ADMIN))
    after = _ok(branded.post("/v1/admin/canary", headers=ADMIN))
    assert after["removed"] > 0 and after["probes"] == before["probes"] - after["removed"]
    assert after["recall"]["recall@10"] >= after["expected"]["recall@10"] - 0.05


def test_an_add_during_a_rollout_onto_the_same_collection_is_counted(world: World) -> None:  # noqa: F811
    """The new pair reads the collection's rows and categories before its model loads; an
    add landing meanwhile must still show in /v1/info, /readyz and the metric after the swap."""
    app = create_app(world.settings())
    with serve_in_thread(app, log_level="warning") as url, httpx.Client(base_url=url) as http:
        _wait_ready(http)
        rows = _rows(http)
        holder = app.state.holder
        build_pair = holder._build_pair
        added = threading.Event()

        async def add_while_loading(target: str):
            pair = await build_pair(target)
            photo = _new_product_photo(seed=51)
            answer = await asyncio.to_thread(_add, http, photo, ADMIN, "4", "DURING1")
            assert answer.status_code == 201, answer.text
            added.set()
            return pair

        holder._build_pair = add_while_loading
        try:
            _ok(http.post("/v1/admin/rollout", headers=ADMIN))
        finally:
            holder._build_pair = build_pair
        assert added.is_set()
        try:
            info = _ok(http.get("/v1/info"))
            assert info["rows"] == _ok(http.get("/readyz"))["rows"] == rows + 1
            assert NEW_CATEGORY in info["categories"]
            assert f"vitrine_collection_rows {float(rows + 1)}" in http.get("/metrics").text
        finally:
            _ok(http.delete("/v1/admin/products/DURING1", headers=ADMIN))


def test_a_category_the_collections_record_has_no_room_for_is_refused_before_writing() -> None:
    from types import SimpleNamespace

    from serving.errors import ApiError
    from serving.routes import _check_live_fits

    full = SimpleNamespace(metadata={"categories": [f"{n:06d}" * 100 for n in range(110)]})
    _check_live_fits(full, "000001" * 100)  # one it has: no room needed
    with pytest.raises(ApiError, match="no room to record another category") as refused:
        _check_live_fits(full, "new")
    assert (refused.value.status, refused.value.code) == (422, "too_many_categories")
    _check_live_fits(SimpleNamespace(metadata={"categories": ["mugs"]}), "new")


def test_a_search_with_two_photos_is_refused(client: TestClient, world: World) -> None:  # noqa: F811
    photos = [("image", (f"{n}.jpg", world.photo("P00001", n), "image/jpeg")) for n in (0, 1)]
    answer = client.post("/v1/search/image", files=photos)
    assert "'image'" in _error(answer, 422, "repeated_field")["message"]
