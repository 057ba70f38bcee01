"""The merchandiser page in a real browser against a real service.

A tiny model indexes a small demo catalogue into Milvus Lite; the app runs under uvicorn on a
free local port; headless Chromium (through Selenium and chromedriver) drives the page: versions,
photo upload, result cards, the category filter, "more like this", an invalid upload, the
keyboard, the address bar and Back, a phone-sized screen, and a rollout seen by an open page.
Skips, saying which, when Chromium, chromedriver or Selenium is missing.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Debian's `chromium` and `chromium-driver`; VITRINE_CHROMIUM / VITRINE_CHROMEDRIVER override.
CHROMIUM = os.environ.get("VITRINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("VITRINE_CHROMEDRIVER")
    or shutil.which("chromedriver")
    or "/usr/bin/chromedriver"
)
# Headless Chromium in a container: it will not start as root with its sandbox (checked here:
# "Chrome instance exited" without --no-sandbox), and Docker's /dev/shm is often only 64 MB.
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--window-size=1280,1600",  # every card of a result grid in view, so lazy images load
)
READY_TIMEOUT_S = 30.0
TOKEN = "page-test-token"
WAIT_S = 15.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"Chromium not found ({CHROMIUM})"),
    pytest.mark.skipif(
        not Path(CHROMEDRIVER).is_file(), reason=f"chromedriver not found ({CHROMEDRIVER})"
    ),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@dataclass(frozen=True)
class Running:
    """The running service and what the test knows about its catalogue."""

    url: str
    model_version: str
    collection: str
    photo: Path  # a catalogue photo of `product`
    other_photo: Path  # a photo of another product
    image_id: str  # that photo's image id
    product: str
    category: str  # `product`'s category, which has other products too
    categories: list[str]
    validated: Path  # the validated manifest and the model package, for a second build
    package: Path
    milvus: Path


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _wait_ready(url: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if not thread.is_alive():
            pytest.fail("uvicorn stopped before the service was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as err:
            last = err.read().decode(errors="replace")
        except OSError as err:
            last = str(err)
        time.sleep(0.2)
    pytest.fail(f"service not ready after {READY_TIMEOUT_S:.0f} s: {last}")


def _pick_photo(validated: Path) -> tuple[dict[str, str], list[str]]:
    """The first photo of a product whose category holds at least one other product."""
    with validated.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    products = defaultdict(set)
    for row in rows:
        products[row["category"]].add(row["product_id"])
    row = next(r for r in rows if len(products[r["category"]]) > 1)
    return row, sorted(products)


def _path(row: dict[str, str]) -> Path:
    return Path(row["image_uri"].removeprefix("file://")).resolve()


def _other_product_row(validated: Path, row: dict[str, str]) -> dict[str, str]:
    with validated.open(newline="") as handle:
        return next(r for r in csv.DictReader(handle) if r["product_id"] != row["product_id"])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Tiny model + demo catalogue -> validated -> Milvus Lite index -> app under uvicorn."""
    import torch
    import uvicorn

    from components.catalog.config import ImageLimits, ValidationConfig
    from components.catalog.demo import generate_demo_catalog
    from components.index import IndexBuildConfig, build_index
    from components.validate import validate_catalog
    from model.package import ModelConfig, build_model, save_package
    from serving.app import create_app
    from serving.settings import Settings
    from tests.conftest import TINY_BACKBONE

    root = tmp_path_factory.mktemp("page")
    torch.manual_seed(0)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=24, pooling="gem")
    package = save_package(build_model(config).eval(), config, root / "tiny-2024-06-01")
    manifest = generate_demo_catalog(
        root / "catalog", products=10, photos_per_product=3, progress=False, image_size=96
    )
    validation = ValidationConfig(data_docs=False, images=ImageLimits(min_side=32))
    validate_catalog(manifest, root / "validated", validation, progress=False)
    milvus = root / "milvus"
    summary = build_index(
        root / "validated" / "validated.csv",
        package,
        IndexBuildConfig(uri=str(milvus)),
        progress=False,
    )
    row, categories = _pick_photo(root / "validated" / "validated.csv")

    app = create_app(
        Settings(milvus_uri=str(milvus), upload_dir=str(root / "uploads"), admin_token=TOKEN)
    )
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_ready(url, thread)
        yield Running(
            url=url,
            model_version=summary["model_version"],
            collection=summary["collection"],
            photo=_path(row),
            other_photo=_path(_other_product_row(root / "validated" / "validated.csv", row)),
            image_id=row["image_sha256"],  # the index step keys images by content hash
            product=row["product_id"],
            category=row["category"],
            categories=categories,
            validated=root / "validated" / "validated.csv",
            package=package,
            milvus=milvus,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium; a start-up failure fails the tests (it is not a missing tool)."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    except WebDriverException as err:
        pytest.fail(f"headless Chromium did not start with {CHROME_FLAGS}: {err.msg}")
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser: WebDriver, service: Running) -> WebDriverWait:
    """Load the page and wait until it has read /v1/info; returns a waiter."""
    browser.get(service.url + "/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda d: d.find_element(By.ID, "versions").get_attribute("data-collection"))
    return wait


def _upload(browser: WebDriver, path: Path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(path.resolve()))


def _settled(query: str):
    """A wait condition: the grid shows the answer to `query` (done or error)."""

    def check(driver: WebDriver) -> bool:
        grid = driver.find_element(By.ID, "results")
        return grid.get_attribute("data-query") == query and grid.get_attribute("data-state") in (
            "done",
            "error",
        )

    return check


def _cards(browser: WebDriver) -> list[dict]:
    """What each result card shows, read in the page."""
    return browser.execute_script(
        """
        return [...document.querySelectorAll('#results .card')].map((card) => {
          const text = (cls) => (card.querySelector('.' + cls) || {}).textContent || '';
          const img = card.querySelector('img');
          return {
            productId: card.dataset.productId, imageId: card.dataset.imageId,
            category: card.dataset.category, title: text('title'),
            shownCategory: text('category'), price: text('price'), score: text('score'),
            shownId: text('product-id'), imageLoaded: !!img && img.complete,
            imageWidth: img ? img.naturalWidth : 0,
          };
        });
        """
    )


def _images_loaded(driver: WebDriver) -> bool:
    cards = _cards(driver)
    return bool(cards) and all(c["imageLoaded"] for c in cards)


def _status(browser: WebDriver):
    return browser.find_element(By.ID, "status")


def _uncaught_errors(browser: WebDriver) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if "Uncaught" in e["message"]]


def test_page_shows_the_served_versions_and_categories(browser, service) -> None:
    _open(browser, service)
    versions = browser.find_element(By.ID, "versions").text
    assert service.model_version in versions
    assert service.collection in versions
    options = [
        o.get_attribute("value") for o in Select(browser.find_element(By.ID, "category")).options
    ]
    assert options == ["", *service.categories]


def test_uploaded_photo_finds_its_product_with_complete_cards(browser, service) -> None:
    wait = _open(browser, service)
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    assert not _status(browser).get_attribute("class"), _status(browser).text

    wait.until(_images_loaded)
    cards = _cards(browser)
    assert cards[0]["productId"] == service.product
    assert cards[0]["imageId"] == service.image_id  # the very photo scores best
    assert len({c["productId"] for c in cards}) == len(cards)  # one card per product
    for card in cards:
        assert card["imageWidth"] > 0, card  # the image really loaded
        assert card["title"] and card["shownId"] == card["productId"], card
        assert card["shownCategory"] == card["category"] and card["category"], card
        assert float(card["price"]) >= 0, card
        assert card["score"].startswith("score "), card
    assert float(cards[0]["score"].split()[1]) == pytest.approx(1.0, abs=1e-2)
    assert f"{len(cards)} products like your photo" in _status(browser).text
    assert browser.find_element(By.ID, "preview").is_displayed()
    assert not _uncaught_errors(browser)


def test_category_filter_then_similar_products(browser, service) -> None:
    wait = _open(browser, service)
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    first = browser.find_element(By.CSS_SELECTOR, "#results .card")

    Select(browser.find_element(By.ID, "category")).select_by_value(service.category)
    wait.until(ec.staleness_of(first))
    wait.until(_settled("image"))
    cards = _cards(browser)
    assert cards, _status(browser).text
    assert {c["category"] for c in cards} == {service.category}
    assert {c["shownCategory"] for c in cards} == {service.category}
    assert cards[0]["productId"] == service.product

    browser.find_element(By.CSS_SELECTOR, f'.card[data-product-id="{service.product}"]').click()
    wait.until(_settled(f"product:{service.product}"))
    status = _status(browser)
    assert not status.get_attribute("class"), status.text
    assert f"like {service.product}" in status.text
    wait.until(_images_loaded)
    cards = _cards(browser)
    assert cards, status.text  # the category holds other products
    assert service.product not in {c["productId"] for c in cards}
    assert {c["category"] for c in cards} == {service.category}  # the filter still applies
    assert all(c["imageWidth"] > 0 for c in cards)
    assert not _uncaught_errors(browser)


def test_non_image_upload_shows_the_api_error(browser, service, tmp_path) -> None:
    import httpx

    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo, just some notes\n")
    api = httpx.post(
        f"{service.url}/v1/search/image",
        files={"image": (notes.name, notes.read_bytes(), "text/plain")},
        data={"top_k": "12"},
    )
    assert api.status_code >= 400
    message = api.json()["error"]["message"]

    wait = _open(browser, service)
    _upload(browser, notes)
    wait.until(_settled("image"))
    grid = browser.find_element(By.ID, "results")
    assert grid.get_attribute("data-state") == "error"
    status = _status(browser)
    assert status.text == message
    assert status.get_attribute("class") == "error"
    assert not browser.find_elements(By.CSS_SELECTOR, "#results .card")
    # Still the page, not a blank one: the header, versions and controls are there.
    assert browser.find_element(By.TAG_NAME, "h1").text == "Vitrine"
    assert service.collection in browser.find_element(By.ID, "versions").text
    # The browser cannot show the file either: the broken preview gives way to the prompt.
    wait.until(ec.invisibility_of_element_located((By.ID, "preview")))
    assert browser.find_element(By.ID, "drop-text").is_displayed()
    assert not _uncaught_errors(browser)


def _query(browser: WebDriver) -> str:
    return browser.find_element(By.ID, "results").get_attribute("data-query")


def test_the_photo_chooser_and_the_results_work_from_the_keyboard(browser, service) -> None:
    wait = _open(browser, service)
    browser.execute_script("document.activeElement.blur()")
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element.get_attribute("id") == "drop"
    # Enter opens the file chooser (a click on the hidden input; headless shows no dialog).
    browser.execute_script(
        "window.chooserOpened = false; document.getElementById('file').addEventListener("
        "'click', (e) => { window.chooserOpened = true; e.preventDefault(); }, {once: true});"
    )
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    assert browser.execute_script("return window.chooserOpened")

    _upload(browser, service.photo)
    wait.until(_settled("image"))
    browser.find_element(By.CSS_SELECTOR, "#results .card").send_keys(Keys.ENTER)
    wait.until(_settled(f"product:{service.product}"))
    # Focus moves to the new results, not back to the top of the page.
    focused = browser.switch_to.active_element
    assert "card" in focused.get_attribute("class"), focused.tag_name
    # The query shows the product now, not the photo uploaded before.
    caption = browser.find_element(By.ID, "query-caption").text
    assert service.product in caption and len(caption) > len(service.product) + 3


def test_searches_are_steps_of_the_history_and_addresses(browser, service) -> None:
    browser.get("about:blank")
    wait = _open(browser, service)
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    assert browser.current_url == service.url + "/"
    browser.find_element(By.CSS_SELECTOR, f'.card[data-product-id="{service.product}"]').click()
    wait.until(_settled(f"product:{service.product}"))
    assert browser.current_url.endswith(f"/?product={service.product}")
    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    Select(browser.find_element(By.ID, "category")).select_by_value(service.category)
    wait.until(ec.staleness_of(first))
    wait.until(_settled(f"product:{service.product}"))
    shared = browser.current_url  # a filter change replaces the step
    assert shared.endswith(f"/?product={service.product}&category={service.category}")

    browser.back()  # to the photo's results, searched again with the filters of then
    wait.until(_settled("image"))
    assert _cards(browser)[0]["productId"] == service.product
    assert Select(browser.find_element(By.ID, "category")).first_selected_option.text == "all"
    browser.back()  # to the empty page
    wait.until(lambda d: _query(d) == "" and not d.find_elements(By.CSS_SELECTOR, ".card"))
    assert browser.current_url == service.url + "/"
    browser.forward()
    wait.until(_settled("image"))

    # The shared address runs the product search with its filter, on a fresh page too.
    browser.get(shared)
    wait.until(_settled(f"product:{service.product}"))
    cards = _cards(browser)
    assert cards and {c["category"] for c in cards} == {service.category}
    assert Select(browser.find_element(By.ID, "category")).first_selected_option.text == (
        service.category
    )
    wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("naturalWidth") != "0")
    # A reload cannot bring a photo back: its step asks for it again, even once another
    # photo has been searched after the reload.
    browser.back()
    browser.refresh()
    wait.until(lambda d: "choose the photo again" in _status(d).text)
    _upload(browser, service.other_photo)
    wait.until(_settled("image"))
    browser.back()
    wait.until(lambda d: "choose the photo again" in _status(d).text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert not _uncaught_errors(browser)


def test_a_fractional_result_count_is_rounded_not_an_error(browser, service) -> None:
    wait = _open(browser, service)
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("2.5")
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    assert not _status(browser).get_attribute("class"), _status(browser).text
    assert len(_cards(browser)) == 3  # 2.5 rounds to 3
    assert "top_k=3" in browser.current_url


def test_an_outage_answer_offers_to_try_again(browser, service) -> None:
    """A 503 (Milvus down) is shown with a button that repeats the search; the first answer
    is replaced in the page by the one a Milvus outage gives, the retry reaches the service."""
    wait = _open(browser, service)
    browser.execute_script(
        """
        const real = window.fetch;
        window.fetch = (url, options) => {
          window.fetch = real;  // once
          const body = {error: {code: "milvus_unavailable", message: "Milvus is unavailable"}};
          return Promise.resolve(new Response(JSON.stringify(body), {status: 503}));
        };
        """
    )
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    assert _status(browser).get_attribute("class") == "error"
    assert "Milvus is unavailable" in _status(browser).text
    browser.find_element(By.ID, "retry").click()
    wait.until(lambda d: _cards(d))
    assert _cards(browser)[0]["productId"] == service.product
    assert not _status(browser).get_attribute("class")
    assert not browser.find_elements(By.ID, "retry")


def test_a_phone_sized_screen_does_not_scroll_sideways(browser, service) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 320, "height": 640, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        wait = _open(browser, service)
        _upload(browser, service.photo)
        wait.until(_settled("image"))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 320, f"the page is {width} px wide on a 320 px screen"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_an_open_page_follows_a_rollout(browser, service, tmp_path) -> None:
    """Last in this module: it moves the service to a new collection."""
    import httpx

    from components.index import IndexBuildConfig, build_index

    wait = _open(browser, service)
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    config = IndexBuildConfig(uri=str(service.milvus))
    built = build_index(service.validated, service.package, config, progress=False)
    rolled = httpx.post(
        f"{service.url}/v1/admin/rollout",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["serving"]["collection"] == built["collection"] != service.collection

    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("5", Keys.TAB)  # a new search
    wait.until(ec.staleness_of(first))
    wait.until(_settled("image"))
    assert built["collection"] in _status(browser).text
    wait.until(
        lambda d: (
            d.find_element(By.ID, "versions").get_attribute("data-collection")
            == built["collection"]
        )
    )
    assert built["collection"] in browser.find_element(By.ID, "versions").text
