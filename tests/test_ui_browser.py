"""The page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which `make test` installs) driven by Selenium against a real
uvicorn server on 127.0.0.1, run with `batchsight ui`'s own options. Loads every
page, searches by clicking a thumbnail, uploads an image, labels two uncertain
images (one by click, one by key press) and checks the labels are stored; a page
on another origin tries to drive the server and is refused. Screenshots of each
page go to `ui-screenshots/` (gitignored; BATCHSIGHT_SCREENSHOTS names another
folder)."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import shutil
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from PIL import Image

from flows.ui import create_app
from flows.ui.serving import uvicorn_options
from tasks.categories.labels import LabelLog
from tasks.storage import LocalStore
from tests.ui_catalog import UiCatalog, build_ui_catalog

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.helpers import free_port

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


class Recorder:
    """ASGI: notes the method, path and status of every response the app gives."""

    def __init__(self, app) -> None:
        self.app = app
        self.seen: list[tuple[str, str, int]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def noting_send(message):
            if message["type"] == "http.response.start":
                self.seen.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, noting_send)


@dataclass
class Served:
    url: str
    out: Path
    cat: UiCatalog
    responses: list[tuple[str, str, int]] = field(default_factory=list)


def start_uvicorn(app, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    srv = uvicorn.Server(uvicorn.Config(app, **uvicorn_options("127.0.0.1", port)))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return srv, thread


@pytest.fixture(scope="module")
def server(tmp_path_factory, resnet18_weights):
    """A copy of the shared catalogue served by uvicorn in a thread, as `batchsight ui` serves it."""
    cat = build_ui_catalog(tmp_path_factory, resnet18_weights)
    out = tmp_path_factory.mktemp("browser") / "out"
    shutil.copytree(cat.output, out)
    port = free_port()
    recorder = Recorder(create_app(str(out), allowed_hosts=["127.0.0.1"]))
    srv, thread = start_uvicorn(recorder, port)
    yield Served(f"http://127.0.0.1:{port}", out, cat, recorder.seen)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed: `make test` installs them (apt-get install "
                    "chromium chromium-driver, as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("BATCHSIGHT_SCREENSHOTS", ROOT / "ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(driver, url: str) -> WebDriverWait:
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    return wait


def score_of(card) -> float:
    return float(card.find_element(By.CSS_SELECTOR, ".score").text.removeprefix("score "))


def no_console_errors(driver) -> None:
    """The CSP must not have blocked anything the page needs."""
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_search_by_clicking_a_thumbnail_and_by_upload(server, browser, shots):
    url, cat = server.url, server.cat
    wait = open_page(browser, f"{url}/search")
    images = browser.find_elements(By.CSS_SELECTOR, "#grid .card img")
    assert len(images) == 31
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)"))
    browser.save_screenshot(str(shots / "search.png"))

    target = next(i for i in images if i.get_attribute("data-key") == cat.copy_of)
    browser.execute_script("arguments[0].scrollIntoView()", target)
    target.click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "results-title"), f"Similar to {cat.copy_of}"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
    assert len(cards) == 12
    assert cards[0].find_element(By.CSS_SELECTOR, "img").get_attribute("data-key") == cat.copy_key
    assert score_of(cards[0]) > 0.999
    browser.save_screenshot(str(shots / "search-by-click.png"))

    browser.find_element(By.ID, "file").send_keys(str(cat.source / cat.copy_of))
    wait.until(ec.text_to_be_present_in_element((By.ID, "results-title"), "Similar to item-00.jpg"))
    first = browser.find_element(By.CSS_SELECTOR, "#grid .card")
    assert first.find_element(By.CSS_SELECTOR, "img").get_attribute("data-key") == cat.copy_of
    assert score_of(first) > 0.9999
    browser.save_screenshot(str(shots / "search-by-upload.png"))
    no_console_errors(browser)


def test_duplicates_runs_and_docs_pages(server, browser, shots):
    url, cat = server.url, server.cat
    wait = open_page(browser, f"{url}/duplicates")
    threshold = browser.find_element(By.ID, "threshold")
    threshold.clear()
    threshold.send_keys("0.9999")
    browser.find_element(By.ID, "dup-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "dup-title"), "above cosine 0.9999"))
    keys = {i.get_attribute("data-key") for i in browser.find_elements(By.CSS_SELECTOR, "#groups .group img")}
    assert {cat.copy_key, cat.copy_of} <= keys
    with urllib.request.urlopen(f"{url}/api/duplicates?threshold=0.9999", timeout=30) as r:
        columns = json.loads(r.read())["columns"]
    shown = {f.get_attribute("data-column") for f in browser.find_elements(By.CSS_SELECTOR, "#groups .field")}
    assert "group_size" in shown and shown <= set(columns), (shown, columns)  # the table's own columns, listed
    # each group: its representative marked, every other member with its cosine to it
    for group in browser.find_elements(By.CSS_SELECTOR, "#groups .group"):
        cards = group.find_elements(By.CSS_SELECTOR, ".card")
        marked = [c for c in cards if "representative" in c.get_attribute("class")]
        assert len(marked) == 1 and marked[0].find_element(By.CSS_SELECTOR, ".badge").text.lower() == "representative"
        others = [c for c in cards if c not in marked]
        assert all(c.find_element(By.CSS_SELECTOR, ".score").text.startswith("cosine to representative")
                   for c in others) and len(others) == len(cards) - 1
    assert browser.find_element(By.ID, "csv").get_attribute("href").endswith("threshold=0.9999")
    browser.save_screenshot(str(shots / "duplicates.png"))

    open_page(browser, f"{url}/runs")
    assert browser.find_element(By.ID, "served").text.startswith("Serving version 2")
    assert not browser.find_element(By.ID, "load-failure").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect.speed")) >= 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) >= 1
    assert "broken/truncated.jpg" in browser.find_element(By.ID, "failures").text
    browser.save_screenshot(str(shots / "runs.png"))

    open_page(browser, f"{url}/docs")
    assert "/api/search/image" in browser.find_element(By.ID, "api").text
    browser.save_screenshot(str(shots / "api-docs.png"))
    no_console_errors(browser)


def test_label_two_uncertain_images_by_click_and_key(server, browser, shots):
    url, out = server.url, server.out
    wait = open_page(browser, f"{url}/review")
    cards = browser.find_elements(By.CSS_SELECTOR, "#review .card")
    assert len(cards) >= 2
    first_id, second_id = (c.get_attribute("data-image-id") for c in cards[:2])
    choices = [b.get_attribute("data-label") for b in cards[0].find_elements(By.CSS_SELECTOR, "button.choice")]
    assert len(choices) >= 2
    cards[0].find_element(By.CSS_SELECTOR, f"button[data-label='{choices[1]}']").click()
    wait.until(lambda d: "labelled" in cards[0].get_attribute("class"))
    # the first card was selected; labelling it by click leaves the selection, so move on by arrow, then press "1"
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: "selected" in cards[1].get_attribute("class"))
    browser.find_element(By.TAG_NAME, "body").send_keys("1")
    wait.until(lambda d: "labelled" in cards[1].get_attribute("class"))
    browser.save_screenshot(str(shots / "review.png"))

    latest = LabelLog(LocalStore(out)).latest()
    stored = dict(zip(latest["image_id"].astype(str), latest["label"], strict=True))
    assert stored[first_id] == choices[1] and stored[second_id] == choices[0]

    open_page(browser, f"{url}/review")  # labelled images leave the queue
    remaining = {c.get_attribute("data-image-id") for c in browser.find_elements(By.CSS_SELECTOR, "#review .card")}
    assert first_id not in remaining and second_id not in remaining
    no_console_errors(browser)


ATTACK = """<!doctype html><html><body><script>
const target = "%(target)s", png = Uint8Array.from(atob("%(png)s"), (c) => c.charCodeAt(0));
async function attempt(path, options) {
  try { await fetch(target + path, Object.assign({ method: "POST" }, options)); } catch (e) { /* blocked */ }
}
(async () => {
  await attempt("/api/search/image", { mode: "no-cors", body: new Blob([png]) });
  await attempt("/api/search/image", { mode: "no-cors", body: png, headers: { "content-type": "text/plain" } });
  await attempt("/api/search/image", { mode: "cors", body: new Blob([png], { type: "image/png" }) });
  await attempt("/api/labels", { mode: "no-cors", headers: { "content-type": "text/plain" },
    body: JSON.stringify({ labels: [{ image_id: "%(image_id)s", label: "form" }] }) });
  document.body.setAttribute("data-done", "1");
})();
</script></body></html>"""


def test_a_page_on_another_site_cannot_drive_the_server(server, browser, tmp_path):
    """Issue 29, item 1: a page elsewhere drove `/api/search/image` through its
    visitor's browser with `fetch(..., {mode: "no-cors"})`. Here a page served
    from another origin tries uploads (no-cors and CORS) and a label write; the
    server refuses each (403) before any route runs."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "PNG")
    (tmp_path / "attack.html").write_text(ATTACK % {"target": server.url, "image_id": "1",
                                                    "png": base64.b64encode(buf.getvalue()).decode()})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    before = len(server.responses)
    try:
        browser.get(f"http://127.0.0.1:{attacker.server_address[1]}/attack.html")
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done"))
        time.sleep(0.5)
    finally:
        attacker.shutdown()
    reached = server.responses[before:]
    assert ("POST", "/api/search/image", 403) in reached and ("POST", "/api/labels", 403) in reached, reached
    assert ("OPTIONS", "/api/search/image", 403) in reached, reached  # the CORS upload's preflight
    assert all(status == 403 for _, _, status in reached), reached
