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


def _rows(driver: object) -> list[str]:
    # read in one script call: the page rebuilds the table, so element handles can go stale
    return driver.execute_script(  # type: ignore[attr-defined,no-any-return]
        "return Array.from(document.querySelectorAll('#results tr.prediction')).map(r => r.innerText)"
    )


def test_page_uploads_image_and_shows_prediction(live_url: str, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    white = tmp_path / "white.png"
    white.write_bytes(png(value=255))
    driver = browser
    driver.get(live_url + "/")  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 15)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
    driver.find_element(By.ID, "file").send_keys(str(white))  # type: ignore[attr-defined]
    wait.until(lambda d: _rows(d))
    rows = _rows(driver)
    assert rows[0].split()[0] == "9" and len(rows) == 3  # the brightest class, top 3 from kiln.json
    assert "done in" in driver.find_element(By.ID, "status").text  # type: ignore[attr-defined]

    # detection: pick the other model, upload again, see boxes listed and drawn on the canvas
    Select(driver.find_element(By.ID, "model")).select_by_value("shapes")  # type: ignore[attr-defined]
    scene = tmp_path / "scene.png"
    scene.write_bytes(png("RGB", (128, 64), (0, 0, 0)))
    driver.find_element(By.ID, "file").send_keys(str(scene))  # type: ignore[attr-defined]
    wait.until(lambda d: any("circle" in r for r in _rows(d)))
    painted = driver.execute_script(  # type: ignore[attr-defined]
        "const c = document.getElementById('canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) { if (d[i] > 200 && d[i + 1] < 100) n++; } return [c.width, n];"
    )
    assert painted[0] == 256 and painted[1] > 50  # red box outlines on a black image


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
