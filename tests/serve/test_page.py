"""The try-it page at / in headless Chromium (Debian's chromium + chromium-driver), driven by selenium."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.bundle import Bundle
from kiln.serve.app import create_app
from kiln.serve.settings import Settings
from tests.browser import chromium, needs_chromium

from .conftest import FakeBackend, png

pytestmark = needs_chromium


@pytest.fixture
def live_url(classify_bundle: Bundle, detect_bundle: Bundle) -> Iterator[str]:
    import uvicorn

    app = create_app([("digits", classify_bundle), ("shapes", detect_bundle)], Settings(),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 15
    while True:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "server did not get ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def browser() -> Iterator[object]:
    yield from chromium()


def _js(driver: object, script: str) -> object:
    # read in one script call: the panel re-renders its cards, so element handles can go stale
    return driver.execute_script(script)  # type: ignore[attr-defined]


def _predict_calls(driver: object) -> int:
    return _js(driver,  # type: ignore[return-value]
               "return performance.getEntriesByType('resource').filter(e => "
               "e.name.includes('/predict')).length")


SHOTS = Path(__file__).resolve().parents[2] / "docs" / "studio"


def test_page_uploads_images_and_shows_bars_and_boxes(live_url: str, browser: object, tmp_path: Path) -> None:
    """Two images at once in the test panel: top-k bars and a latency per image; then a detector's boxes
    in a colour per class, re-filtered by the score and IoU sliders without a new request."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    white, grey = tmp_path / "white.png", tmp_path / "grey.png"
    white.write_bytes(png(value=255))
    grey.write_bytes(png(value=20))
    driver = browser
    driver.get(live_url + "/")  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 15)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
    driver.find_element(By.CSS_SELECTOR, ".kt-file").send_keys(f"{white}\n{grey}")  # type: ignore[attr-defined]
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".kt-card")) == 2
               and d.find_elements(By.CSS_SELECTOR, ".kt-bar"))
    cards = _js(driver, "return [...document.querySelectorAll('.kt-card')].map(c => "
                        "[c.querySelector('.kt-name').innerText,"
                        " [...c.querySelectorAll('.kt-bar .kt-label')].map(l => l.innerText), "
                        "c.querySelector('.kt-ms').innerText])")
    assert [c[0] for c in cards] == ["white.png", "grey.png"]  # type: ignore[union-attr]
    white_card = cards[0]  # type: ignore[index]
    assert white_card[1][0] == "9" and len(white_card[1]) == 3  # the brightest class, top 3 from kiln.json
    assert all(c[2].endswith(" ms") for c in cards)  # type: ignore[union-attr]
    assert _predict_calls(driver) == 2

    # detection: the other model; the boxes come before NMS and the sliders filter them in the page
    Select(driver.find_element(By.ID, "model")).select_by_value("shapes")  # type: ignore[attr-defined]
    scene = tmp_path / "scene.png"
    scene.write_bytes(png("RGB", (128, 64), (0, 0, 0)))
    driver.find_element(By.CSS_SELECTOR, ".kt-file").send_keys(str(scene))  # type: ignore[attr-defined]
    listed = "return [...document.querySelectorAll('.kt-box')].map(b => b.innerText)"
    wait.until(lambda d: _js(d, listed))
    assert _js(driver, listed) == ["circle 0.900", "square 0.700"]  # overlapping circles: NMS at IoU 0.45
    assert _predict_calls(driver) == 3
    _js(driver,
        "const s = document.querySelector('.kt-iou'); s.value = 1; s.dispatchEvent(new Event('input'))")
    assert _js(driver, listed) == ["circle 0.900", "circle 0.800", "square 0.700"]
    _js(driver,
        "const s = document.querySelector('.kt-score'); s.value = 0.75; s.dispatchEvent(new Event('input'))")
    assert _js(driver, listed) == ["circle 0.900", "circle 0.800"]
    assert _predict_calls(driver) == 3  # the sliders asked the server nothing
    _js(driver,
        "const s = document.querySelector('.kt-score'); s.value = 0.25; s.dispatchEvent(new Event('input'))")
    colours = _js(driver, "const c = document.querySelector('.kt-canvas'); "
                          "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                          "const seen = new Set(); for (let i = 0; i < d.length; i += 4) { "
                          "if (d[i] + d[i+1] + d[i+2] > 150) seen.add(d[i] + ',' + d[i+1] + ',' + d[i+2]); }"
                          "return [...seen]")
    assert "230,25,75" in colours and "60,180,75" in colours  # type: ignore[operator]  # a colour per class
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / "serve-page.png"))  # type: ignore[attr-defined]


def test_page_and_studio_load_one_panel_file(live_url: str, tmp_path: Path) -> None:
    """kiln serve's page and the studio's page load the same test panel, shipped once in kiln.serve."""
    import importlib.resources
    import re

    from fastapi.testclient import TestClient

    from kiln.studio.app import build_app
    from kiln.studio.config import StudioConfig

    shipped = importlib.resources.files("kiln.serve") / "static"
    assert not (importlib.resources.files("kiln.studio") / "static" / "testpanel.js").is_file()  # no copy
    (tmp_path / "ws").mkdir()
    studio = build_app(StudioConfig.build(tmp_path / "ws", []), start_runner=False)
    with TestClient(studio, base_url="http://127.0.0.1") as client:
        for name in ("testpanel.js", "testpanel.css"):
            pages = {"serve": (httpx.get, live_url), "studio": (client.get, "")}
            bodies = {}
            for which, (get, base) in pages.items():
                html = get(base + "/").text
                refs = re.findall(r'(?:src|href)="([^"]*' + re.escape(name) + ')"', html)
                assert refs, f"{which}'s page does not load {name}"
                resp = get(base + "/" + refs[0])
                assert resp.status_code == 200, (which, resp.status_code)
                bodies[which] = resp.content
            assert bodies["serve"] == bodies["studio"] == shipped.joinpath(name).read_bytes()


def test_docs_render_offline(live_url: str, browser: object) -> None:
    """Swagger UI and ReDoc load their scripts from the server itself, not a CDN (the machine running
    this test has no internet), and render the API's operations."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    html = httpx.get(live_url + "/docs").text
    assert "cdn" not in html.lower() and "/docs-assets/swagger-ui-bundle.js" in html
    driver.get(live_url + "/docs")  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 5)
    paths = driver.execute_script(  # type: ignore[attr-defined]
        "return Array.from(document.querySelectorAll('.opblock-summary-path')).map(e => e.innerText)")
    assert any("/v1/models/{name}/predict" in p for p in paths), paths
    assert any("/v2/models/{name}/infer" in p for p in paths), paths

    driver.get(live_url + "/redoc")  # type: ignore[attr-defined]
    wait.until(lambda d: "predict" in d.find_element(By.TAG_NAME, "body").text.lower())
