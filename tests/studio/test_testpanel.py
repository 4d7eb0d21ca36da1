"""The test panel component (serve/static/testpanel.js) in headless Chromium: detection boxes in a colour
per class, re-filtered by the score and IoU sliders without a new request; classification as bars."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.browser import chromium, needs_chromium

pytestmark = needs_chromium
STATIC = Path(__file__).resolve().parents[2] / "serve" / "static"

# boxes before NMS, as the studio returns them: two overlapping circles, a square, a weak square
ANSWER = {"task": "detect", "backend": "stub", "precision": "fp32", "results": [{
    "name": "scene.png", "width": 200, "height": 100, "ms": 1.5, "boxes": [
        {"box": [10, 10, 60, 60], "label": "circle", "index": 0, "score": 0.9},
        {"box": [12, 12, 62, 62], "label": "circle", "index": 0, "score": 0.8},
        {"box": [100, 20, 150, 70], "label": "square", "index": 1, "score": 0.7},
        {"box": [160, 20, 190, 50], "label": "square", "index": 1, "score": 0.1},
    ]}]}


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    html = tmp_path / "panel.html"
    html.write_text("<!doctype html><html><head>"
                    f"""<link rel="stylesheet" href="{STATIC / 'testpanel.css'}"></head><body>
<div id="panel"></div><script src="{STATIC / 'testpanel.js'}"></script>
<script>window.calls = 0; window.answer = null;
KilnTestPanel.mount(document.getElementById("panel"), {{score: 0.25, iou: 0.45,
  predict: async (files) => {{ window.calls++; return window.answer; }} }});</script></body></html>""")
    Image.new("RGB", (200, 100), (0, 0, 0)).save(tmp_path / "scene.png")
    for driver in chromium():
        driver.get(html.as_uri())  # type: ignore[attr-defined]
        yield driver


def _listed(d) -> list[str]:  # type: ignore[no-untyped-def]
    return d.execute_script("return [...document.querySelectorAll('.kt-box')].map(b => b.innerText)")  # type: ignore[no-any-return]


def _set(d, cls: str, value: float) -> None:  # type: ignore[no-untyped-def]
    d.execute_script(f"const s = document.querySelector('.{cls}'); s.value = arguments[0];"
                     "s.dispatchEvent(new Event('input'))", value)


def test_detection_sliders_refilter_boxes_without_a_new_request(page: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = page
    d.execute_script(f"window.answer = {json.dumps(ANSWER)}")  # type: ignore[attr-defined]
    d.find_element(By.CSS_SELECTOR, ".kt-file").send_keys(str(tmp_path / "scene.png"))  # type: ignore[attr-defined]
    WebDriverWait(d, 15).until(lambda x: _listed(x))
    assert _listed(d) == ["circle 0.900", "square 0.700"]  # the second circle overlaps the first: NMS at 0.45
    _set(d, "kt-iou", 1.0)
    assert _listed(d) == ["circle 0.900", "circle 0.800", "square 0.700"]
    _set(d, "kt-score", 0.05)
    assert len(_listed(d)) == 4
    _set(d, "kt-score", 0.75)
    assert _listed(d) == ["circle 0.900", "circle 0.800"]
    assert d.execute_script("return window.calls") == 1  # type: ignore[attr-defined]
    swatches = d.execute_script(  # type: ignore[attr-defined]
        "_s = document.querySelector('.kt-score'); _s.value = 0; _s.dispatchEvent(new Event('input'));"
        "return [...document.querySelectorAll('.kt-swatch')].map(s => s.style.background)")
    assert len(set(swatches)) == 2  # a colour per class
    # the boxes are drawn on the image: pixels of the circle's colour and of the square's
    colours = d.execute_script(  # type: ignore[attr-defined]
        "const c = document.querySelector('.kt-canvas'); const d = c.getContext('2d').getImageData(0, 0, "
        "c.width, c.height).data;"
        "const seen = new Set(); for (let i = 0; i < d.length; i += 4) { if (d[i] + d[i+1] + d[i+2] > 150) "
        "seen.add(d[i] + ',' + d[i+1] + ',' + d[i+2]); }"
        "return [...seen]")
    assert "230,25,75" in colours and "60,180,75" in colours


def test_classification_answers_show_bars(page: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = page
    answer = {"task": "classify", "results": [{"name": "scene.png", "width": 200, "height": 100, "ms": 2.0,
                                               "top_k": [{"label": "cat", "score": 0.75},
                                                         {"label": "dog", "score": 0.25}]}]}
    d.execute_script(f"window.answer = {json.dumps(answer)}")  # type: ignore[attr-defined]
    d.find_element(By.CSS_SELECTOR, ".kt-file").send_keys(str(tmp_path / "scene.png"))  # type: ignore[attr-defined]
    WebDriverWait(d, 15).until(lambda x: x.find_elements(By.CSS_SELECTOR, ".kt-bar"))
    bars = d.execute_script(  # type: ignore[attr-defined]
        "return [...document.querySelectorAll('.kt-bar')].map(b => [b.innerText.split('\\n')[0], "
        "b.querySelector('.kt-bar-fill').style.width])")
    assert bars == [["cat", "75%"], ["dog", "25%"]]
    assert d.find_element(By.CSS_SELECTOR, ".kt-controls").get_attribute("hidden") is not None  # type: ignore[attr-defined]
    assert d.find_element(By.CSS_SELECTOR, ".kt-ms").text == "2.0 ms"  # type: ignore[attr-defined]


