"""The studio end to end in headless Chromium (Debian's chromium + chromium-driver), driven by selenium,
against the real `kiln studio` command: a folder dataset, a 1-epoch run whose curve gains a point,
two runs compared, an fp32+int8 export and its table, an image tested, a server started and called with
the copied curl line. Screenshots of each page go to docs/studio/."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import chromium, needs_chromium

from .conftest import LiveStudio, copy_bundle
from .test_models_api import digit_png

pytestmark = needs_chromium
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "studio"


@pytest.fixture
def browser() -> Iterator[object]:
    yield from chromium()


def js(driver, script: str, *args):  # type: ignore[no-untyped-def]
    return driver.execute_script(script, *args)


def shot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def test_studio_from_a_folder_of_photos_to_a_served_model(live_studio: LiveStudio, browser: object, photo_folder: Path,
                                                          digits_bundle: Path, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    # The page re-renders lists as data arrives: an element read mid-render is looked up again.
    stale = (StaleElementReferenceException,)
    wait = WebDriverWait(d, 60, ignored_exceptions=stale)
    long_wait = WebDriverWait(d, 900, poll_frequency=0.5, ignored_exceptions=stale)
    copy_bundle(digits_bundle, live_studio.workspace, "digits-cli")  # a run from the command line

    # Datasets: a folder under the data root
    d.get(live_studio.url + "/#datasets")  # type: ignore[attr-defined]
    wait.until(lambda x: js(x, "return document.querySelectorAll('#ds-form option').length") > 3)
    spec = d.find_element(By.ID, "ds-spec")  # type: ignore[attr-defined]
    spec.clear()
    spec.send_keys(f"folder:{photo_folder}")
    d.find_element(By.ID, "ds-add").click()  # type: ignore[attr-defined]
    wait.until(lambda x: f"folder:{photo_folder}" in x.find_element(By.ID, "ds-list").text)
    wait.until(lambda x: x.find_elements(By.CSS_SELECTOR, ".ds-counts tr"))
    counts = js(d, "return [...document.querySelectorAll('.ds-counts tr')].slice(1).map(r => [...r.cells].map(c => c.innerText))")
    per_class = {row[0]: int(row[1]) + int(row[2]) for row in counts}
    assert per_class == {"china": 8, "flower": 8, "total": 16}, counts
    wait.until(lambda x: js(x, "const i = document.querySelector('img.sheet'); return i && i.complete && i.naturalWidth > 0"))
    shot(d, "datasets")

    # New run: 1 epoch on digits; the command is shown
    d.get(live_studio.url + "/#new")  # type: ignore[attr-defined]
    wait.until(lambda x: x.find_element(By.NAME, "epochs").get_attribute("value") == "20")
    epochs = d.find_element(By.NAME, "epochs")  # type: ignore[attr-defined]
    epochs.clear()
    epochs.send_keys("1")
    name = d.find_element(By.NAME, "name")  # type: ignore[attr-defined]
    name.send_keys("first")
    command = "kiln train --epochs=1 --out=runs/first"
    wait.until(lambda x: x.find_element(By.ID, "new-command").text == command,
               f"the command shown is not {command!r}")
    shot(d, "new-run")
    d.find_element(By.ID, "new-start").click()  # type: ignore[attr-defined]

    # Runs: the live curve gains its point, the run ends done
    wait.until(lambda x: x.find_element(By.ID, "run-title").text == "runs/first")
    long_wait.until(lambda x: js(x, "return document.getElementById('chart-metric').dataset.points") in ("2",))
    long_wait.until(lambda x: "done" in x.find_element(By.ID, "run-status").text)
    shot(d, "runs")

    # Compare: both runs, curves overlaid, one table row each
    d.get(live_studio.url + "/#compare")  # type: ignore[attr-defined]
    wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, "#cmp-pick input")) == 2)
    for box in d.find_elements(By.CSS_SELECTOR, "#cmp-pick input"):  # type: ignore[attr-defined]
        box.click()
    d.find_element(By.ID, "cmp-go").click()  # type: ignore[attr-defined]
    wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, "#cmp-table tr")) == 3)
    rows = js(d, "return [...document.querySelectorAll('#cmp-table tr')].slice(1).map(r => r.cells[0].innerText)")
    assert sorted(rows) == ["runs/digits-cli", "runs/first"]
    assert int(js(d, "return document.getElementById('cmp-metric').dataset.points")) == 5  # 4 + 1 epochs
    shot(d, "compare")

    # Export fp32 + int8 of the new run, and the accuracy x size x speed table
    d.get(live_studio.url + "/#export")  # type: ignore[attr-defined]
    wait.until(lambda x: "runs/first" in [o.text for o in x.find_elements(By.CSS_SELECTOR, "#ex-run option")])
    Select(d.find_element(By.ID, "ex-run")).select_by_value("runs/first")  # type: ignore[attr-defined]
    d.find_element(By.ID, "ex-int8").click()  # type: ignore[attr-defined]
    calib = d.find_element(By.ID, "ex-calib")  # type: ignore[attr-defined]
    calib.clear()
    calib.send_keys("128")
    d.find_element(By.ID, "ex-go").click()  # type: ignore[attr-defined]
    long_wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, "#ex-table tr.artifact-row")) >= 3)
    table = js(d, "return [...document.querySelectorAll('#ex-table tr.artifact-row')].map(r => [...r.cells].map(c => c.innerText))")
    by_file = {row[0]: row for row in table}
    assert {"model.pt", "model.onnx", "model.int8.onnx"} <= set(by_file), table
    assert by_file["model.int8.onnx"][2] == "int8" and float(by_file["model.int8.onnx"][4]) > 10
    shot(d, "export")

    # Test: an image in, top-k bars out, with its latency
    data, label = digit_png(3)
    image = tmp_path / "digit.png"
    image.write_bytes(data)
    d.get(live_studio.url + "/#test")  # type: ignore[attr-defined]
    wait.until(lambda x: "runs/first" in [o.text for o in x.find_elements(By.CSS_SELECTOR, "#test-run option")])
    Select(d.find_element(By.ID, "test-run")).select_by_value("runs/digits-cli")  # type: ignore[attr-defined]
    d.find_element(By.CSS_SELECTOR, "#test-panel .kt-file").send_keys(str(image))  # type: ignore[attr-defined]
    wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, ".kt-bar")) == 5)
    top = js(d, "return document.querySelector('.kt-bar .kt-label').innerText")
    assert top == str(label)
    assert js(d, "return document.querySelector('.kt-ms').innerText").endswith(" ms")
    shot(d, "test")

    # Serve: start kiln serve from the page, call it with the copied curl line
    d.get(live_studio.url + "/#serve")  # type: ignore[attr-defined]
    wait.until(lambda x: "runs/first" in [o.text for o in x.find_elements(By.CSS_SELECTOR, "#serve-run option")])
    Select(d.find_element(By.ID, "serve-run")).select_by_value("runs/digits-cli")  # type: ignore[attr-defined]
    d.find_element(By.ID, "serve-go").click()  # type: ignore[attr-defined]
    long_wait.until(lambda x: x.find_elements(By.CSS_SELECTOR, ".server[data-ready='true']"))
    curl = d.find_element(By.CSS_SELECTOR, ".snippet-curl").text  # type: ignore[attr-defined]
    shot(d, "serve")
    shutil.copy(image, tmp_path / "image.jpg")
    out = subprocess.run(shlex.split(curl), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["predictions"][0]["top_k"][0]["label"] == str(label)
    d.find_element(By.CSS_SELECTOR, ".server button").click()  # type: ignore[attr-defined]
    long_wait.until(lambda x: "no server running" in x.find_element(By.ID, "serve-list").text)
