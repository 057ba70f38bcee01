"""The merchandiser page in a real browser against a real service.

A tiny model indexes a small demo catalogue into Milvus Lite; the app runs under uvicorn on a
free local port; headless Chromium (through Selenium and chromedriver) drives the page: versions,
photo upload, result cards, the category filter, "more like this", an invalid upload, a photo
over the upload limits, a photo dropped anywhere, an answer without the error envelope, the
keyboard (and its focus after a failure), the address bar and Back, a phone-sized screen (and a
result tapped far down it), and a rollout seen by an open page.
Skips, saying which, when Chromium, chromedriver or Selenium is missing.
"""

from __future__ import annotations

import contextlib
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
# The service's upload limits here: small, so that a test photo can be over them.
MAX_UPLOAD_BYTES = 2 * 2**20
MAX_UPLOAD_PIXELS = 5_000_000
SCALED_SIDE = 2048  # the longest side of a photo the page scaled down

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
        Settings(
            milvus_uri=str(milvus),
            upload_dir=str(root / "uploads"),
            admin_token=TOKEN,
            max_upload_bytes=MAX_UPLOAD_BYTES,
            max_upload_pixels=MAX_UPLOAD_PIXELS,
        )
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


def _answer_next_fetch(browser: WebDriver, body: str, status: int, content_type: str) -> None:
    """The page's next fetch gets this answer (a gateway's, say) instead of the service's."""
    browser.execute_script(
        """
        const [body, status, type] = arguments;
        const real = window.fetch;
        window.fetch = () => {
          window.fetch = real;  // once
          return Promise.resolve(new Response(body, {status, headers: {"content-type": type}}));
        };
        """,
        body,
        status,
        content_type,
    )


def _record_searches(browser: WebDriver) -> None:
    """From now on the page keeps each photo it sends to /v1/search/image (see _sent)."""
    browser.execute_script(
        """
        window.sentPhotos = [];
        const real = window.fetch;
        window.fetch = (url, options) => {
          if (String(url).startsWith("/v1/search/image")) {
            const image = options.body.get("image");
            const facts = {size: image.size, type: image.type, width: 0, height: 0};
            window.sentPhotos.push(createImageBitmap(image).then(
              (b) => ({...facts, width: b.width, height: b.height}), () => facts));
          }
          return real(url, options);
        };
        """
    )


def _sent(browser: WebDriver) -> list[dict]:
    """Size, type, width and height of each photo the page sent since _record_searches."""
    return browser.execute_async_script(
        "Promise.all(window.sentPhotos).then(arguments[arguments.length - 1])"
    )


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


@contextlib.contextmanager
def _phone_screen(browser: WebDriver) -> Iterator[None]:
    """A phone-sized screen (320 x 640 CSS px) while the block runs."""
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 320, "height": 640, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        yield
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_phone_sized_screen_does_not_scroll_sideways(browser, service) -> None:
    with _phone_screen(browser):
        wait = _open(browser, service)
        _upload(browser, service.photo)
        wait.until(_settled("image"))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 320, f"the page is {width} px wide on a 320 px screen"


def _oversize_photo(source: Path, tmp_path: Path, over: str) -> Path:
    """A catalogue photo made larger than the service takes: in pixels (a smooth JPEG under
    the byte limit) or in bytes (a noisy PNG under the pixel limit)."""
    import numpy as np
    from PIL import Image

    with Image.open(source) as image:
        photo = image.convert("RGB")
    if over == "pixels":
        path = tmp_path / "studio.jpg"
        photo.resize((3000, 2000), Image.Resampling.BICUBIC).save(path, quality=85)
        assert path.stat().st_size < MAX_UPLOAD_BYTES
    else:
        path = tmp_path / "heavy.png"
        pixels = np.asarray(photo.resize((1400, 1000), Image.Resampling.BICUBIC), dtype=np.int16)
        noise = np.random.default_rng(0).integers(-24, 25, pixels.shape)
        Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(path)
        assert path.stat().st_size > MAX_UPLOAD_BYTES
    return path


def _search_and_record(browser: WebDriver, service: Running, photo: Path) -> list[dict]:
    """Search by ``photo`` from a fresh page and see it succeed; the photos the page sent."""
    wait = _open(browser, service)
    _record_searches(browser)
    _upload(browser, photo)
    wait.until(_settled("image"))
    status = _status(browser)
    assert not status.get_attribute("class"), status.text
    assert _cards(browser), status.text
    assert "like your photo" in status.text
    return _sent(browser)


@pytest.mark.parametrize("over", ["pixels", "bytes"])
def test_a_photo_over_the_upload_limits_is_scaled_down_and_searched(
    browser, service, tmp_path, over
) -> None:
    sent = _search_and_record(browser, service, _oversize_photo(service.photo, tmp_path, over))
    assert sent, "no photo was sent"
    last = sent[-1]
    assert last["type"] == "image/jpeg", sent
    assert 0 < max(last["width"], last["height"]) <= SCALED_SIDE, sent
    assert last["width"] * last["height"] <= MAX_UPLOAD_PIXELS, sent
    assert last["size"] <= MAX_UPLOAD_BYTES, sent
    caption = browser.find_element(By.ID, "query-caption").text
    size = f"{last['width']}×{last['height']}"
    # Too many pixels: fewer. Too many bytes: a JPEG of the same size (fewer if still too many).
    assert f"scaled down to {size}" in caption or (
        over == "bytes" and f"sent as a smaller JPEG ({size})" in caption
    ), caption
    assert not _uncaught_errors(browser)


def test_a_photo_over_the_limits_the_browser_cannot_read_says_so(
    browser, service, tmp_path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(os.urandom(MAX_UPLOAD_BYTES + 1024))
    wait = _open(browser, service)
    _upload(browser, broken)
    wait.until(_settled("image"))
    status = _status(browser)
    assert status.get_attribute("class") == "error"
    assert "over the service's limits" in status.text, status.text
    assert "cannot read it" in status.text, status.text
    assert "2 MB" in status.text, status.text
    assert not _uncaught_errors(browser)


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_a_photo_in_a_format_the_service_refuses_is_sent_as_a_jpeg(
    browser, service, tmp_path, fmt
) -> None:
    """The service takes JPEG, PNG and WEBP (415 for the rest); a browser reads more."""
    from PIL import Image

    other = tmp_path / f"photo.{fmt.lower()}"
    with Image.open(service.photo) as image:
        image.convert("RGB").save(other, format=fmt)
    sent = _search_and_record(browser, service, other)
    assert [photo["type"] for photo in sent][-1] == "image/jpeg", sent
    caption = browser.find_element(By.ID, "query-caption").text
    assert caption == f"your photo, sent as a JPEG ({sent[-1]['width']}×{sent[-1]['height']})"
    assert not _uncaught_errors(browser)


def _drop_photo(browser: WebDriver, service: Running, target: str) -> list[bool]:
    """Drag a catalogue photo over `target` (a CSS selector) and drop it there, as synthetic
    drag events with a real File; returns whether the page took over dragover and drop."""
    return browser.execute_async_script(
        """
        const [target, url, done] = arguments;
        fetch(url).then((r) => r.blob()).then((blob) => {
          const data = new DataTransfer();
          data.items.add(new File([blob], "dropped.jpg", {type: blob.type || "image/jpeg"}));
          const fire = (type) => {
            const event = new DragEvent(type, {bubbles: true, cancelable: true,
                                               dataTransfer: data});
            document.querySelector(target).dispatchEvent(event);
            return event.defaultPrevented;
          };
          fire("dragenter");
          done([fire("dragover"), fire("drop")]);
        });
        """,
        target,
        f"{service.url}/v1/images/{service.image_id}",
    )


def test_a_photo_dropped_anywhere_on_the_page_is_searched_once(browser, service) -> None:
    wait = _open(browser, service)
    _record_searches(browser)
    # Not the browser's: it would open the photo in place of the page.
    assert _drop_photo(browser, service, "header h1") == [True, True]
    wait.until(_settled("image"))
    assert _cards(browser)[0]["productId"] == service.product
    assert browser.find_element(By.ID, "preview").is_displayed()
    assert len(_sent(browser)) == 1

    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert _drop_photo(browser, service, "#drop") == [True, True]
    wait.until(ec.staleness_of(first))
    wait.until(_settled("image"))
    assert _cards(browser)[0]["productId"] == service.product
    assert len(_sent(browser)) == 2  # the drop area's drop is searched once, not twice
    assert not _uncaught_errors(browser)


def test_an_error_without_the_service_envelope_is_shown_with_try_again(browser, service) -> None:
    """A gateway's 502 with a JSON body of its own does not leave the page searching."""
    wait = _open(browser, service)
    _answer_next_fetch(browser, '{"message": "Bad gateway"}', 502, "application/json")
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    status = _status(browser)
    assert status.get_attribute("class") == "error"
    assert "HTTP 502" in status.text and "Bad gateway" in status.text, status.text
    assert browser.find_element(By.ID, "results").get_attribute("aria-busy") == "false"
    browser.find_element(By.ID, "retry").click()
    wait.until(lambda d: _cards(d))
    assert _cards(browser)[0]["productId"] == service.product
    assert not _uncaught_errors(browser)


def _focused_id(browser: WebDriver) -> str:
    return browser.execute_script(
        "const e = document.activeElement; return e ? e.id || e.tagName : '';"
    )


def test_a_failed_keyboard_search_leaves_the_focus_on_try_again(browser, service) -> None:
    wait = _open(browser, service)
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    # Enter on a result whose search fails (a proxy's page): the card is gone, the focus goes
    # to "try again", not to the top of the page.
    _answer_next_fetch(browser, "<html>502 Bad Gateway</html>", 502, "text/html")
    browser.find_element(By.CSS_SELECTOR, "#results .card").send_keys(Keys.ENTER)
    wait.until(_settled(f"product:{service.product}"))
    assert _status(browser).get_attribute("class") == "error"
    assert _focused_id(browser) == "retry"
    # Enter on it searches again; the focus goes on to the first result.
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait.until(lambda d: _cards(d))
    assert "card" in browser.switch_to.active_element.get_attribute("class")

    # The photo chooser opened from the keyboard, and the upload's search fails.
    browser.execute_script("document.getElementById('drop').focus()")
    browser.execute_script(
        "document.getElementById('file').addEventListener("
        "'click', (e) => e.preventDefault(), {once: true});"
    )
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    _answer_next_fetch(browser, "<html>502 Bad Gateway</html>", 502, "text/html")
    _upload(browser, service.photo)
    wait.until(_settled("image"))
    assert _status(browser).get_attribute("class") == "error"
    assert _focused_id(browser) == "retry"
    assert not _uncaught_errors(browser)


def test_a_result_far_down_the_grid_brings_the_new_query_into_view(browser, service) -> None:
    with _phone_screen(browser):
        wait = _open(browser, service)
        _upload(browser, service.photo)
        wait.until(_settled("image"))
        last = browser.find_elements(By.CSS_SELECTOR, "#results .card")[-1]
        product = last.get_attribute("data-product-id")
        browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", last)
        top = "return document.getElementById('query').getBoundingClientRect().top"
        assert browser.execute_script(top) < -1000  # the query is far above the screen
        last.click()
        wait.until(_settled(f"product:{product}"))
        box = browser.execute_script(
            "const r = document.getElementById('query').getBoundingClientRect();"
            "return [r.top, r.bottom, window.innerHeight];"
        )
        assert 0 <= box[0] < box[2], f"the query area is at {box[0]} px of {box[2]}"
        assert product in browser.find_element(By.ID, "query-caption").text


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
