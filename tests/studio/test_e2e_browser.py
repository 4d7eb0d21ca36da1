"""The studio end to end in headless Chromium (Debian's chromium + chromium-driver), driven by selenium,
against the real `kiln studio` command, from a folder of photos to a served INT8 model: the folder added as
a dataset, a 1-epoch run on it whose curve gains a point, two runs compared, an fp32+int8 export and its
table, photos tested (bars, the validation confusion matrix and its images), the INT8 model served and
called with the copied curl line. Screenshots of each page go to docs/studio/."""

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


def test_studio_from_a_folder_of_photos_to_a_served_model(live_studio: LiveStudio, browser: object,
                                                          photo_folder: Path,
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
    counts = js(d,
                "return [...document.querySelectorAll('.ds-counts tr')].slice(1).map(r => [...r.cells].map(c "
                "=> c.innerText))")
    per_class = {row[0]: int(row[1]) + int(row[2]) for row in counts}
    assert per_class == {"china": 8, "flower": 8, "total": 16}, counts
    wait.until(lambda x: js(x,
                            "const i = document.querySelector('img.sheet'); return i && i.complete && "
                            "i.naturalWidth > 0"))
    shot(d, "datasets")

    # New run: LeNet-5 (the smallest model) for 1 epoch on the photos at 32 px; its cost and command shown
    d.get(live_studio.url + "/#new")  # type: ignore[attr-defined]
    wait.until(lambda x: x.find_element(By.NAME, "epochs").get_attribute("value") == "20")
    for field, value in (("data", f"folder:{photo_folder}"), ("model", "lenet5"), ("epochs", "1"),
                         ("image_size", "32"),
                         ("name", "first")):
        box = d.find_element(By.NAME, field)  # type: ignore[attr-defined]
        box.clear()
        box.send_keys(value)
    wait.until(lambda x: "GFLOPs per 32x32 image" in x.find_element(By.ID, "new-cost").text)
    assert d.find_element(By.ID, "new-cost").text.startswith("lenet5: 0.06M parameters")  # type: ignore[attr-defined]
    command = (
        f"kiln train --data=folder:{photo_folder} --model=lenet5 --epochs=1 --image-size=32 --out=runs/first"
    )
    wait.until(lambda x: x.find_element(By.ID, "new-command").text == command,
               f"the command shown is not {command!r}")
    shot(d, "new-run")
    d.find_element(By.ID, "new-start").click()  # type: ignore[attr-defined]

    # Runs: the live curve gains its point, the run ends done
    wait.until(lambda x: x.find_element(By.ID, "run-title").text == "runs/first")
    long_wait.until(
        lambda x: js(x, "return document.getElementById('chart-metric').dataset.points") in ("2",)
    )
    long_wait.until(lambda x: "done" in x.find_element(By.ID, "run-status").text)
    shot(d, "runs")

    # Compare: both runs, curves overlaid, one table row each
    d.get(live_studio.url + "/#compare")  # type: ignore[attr-defined]
    wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, "#cmp-pick input")) == 2)
    for box in d.find_elements(By.CSS_SELECTOR, "#cmp-pick input"):  # type: ignore[attr-defined]
        box.click()
    d.find_element(By.ID, "cmp-go").click()  # type: ignore[attr-defined]
    wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, "#cmp-table tr")) == 3)
    rows = js(
        d, "return [...document.querySelectorAll('#cmp-table tr')].slice(1).map(r => r.cells[0].innerText)"
    )
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
    calib.send_keys("16")
    d.find_element(By.ID, "ex-go").click()  # type: ignore[attr-defined]
    long_wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, "#ex-table tr.artifact-row")) >= 3)
    table = js(d,
               "return [...document.querySelectorAll('#ex-table tr.artifact-row')].map(r => "
               "[...r.cells].map(c => c.innerText))")
    by_file = {row[0]: row for row in table}
    assert {"model.pt", "model.onnx", "model.int8.onnx"} <= set(by_file), table
    assert by_file["model.int8.onnx"][2] == "int8" and float(by_file["model.int8.onnx"][4]) >= 0
    shot(d, "export")

    # Test: the INT8 model on two photos (bars and latency), then the validation split's confusion matrix,
    # a cell's images, and one of them picked and tested
    photos = sorted(photo_folder.glob("*/*-0.jpg"))
    d.get(live_studio.url + "/#test")  # type: ignore[attr-defined]
    wait.until(
        lambda x: "runs/first" in [o.text for o in x.find_elements(By.CSS_SELECTOR, "#test-run option")]
    )
    Select(d.find_element(By.ID, "test-run")).select_by_value("runs/first")  # type: ignore[attr-defined]
    Select(d.find_element(By.ID, "test-precision")).select_by_visible_text("int8")  # type: ignore[attr-defined]
    d.find_element(By.CSS_SELECTOR, "#test-panel .kt-file").send_keys("\n".join(map(str, photos)))  # type: ignore[attr-defined]
    # 2 photos x 2 classes
    wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, ".kt-card .kt-bar")) == 4)
    assert js(d, "return document.querySelector('.kt-status').innerText").endswith("int8")
    assert js(d, "return [...document.querySelectorAll('.kt-ms')].every(m => m.innerText.endsWith(' ms'))")
    d.find_element(By.ID, "val-load").click()  # type: ignore[attr-defined]
    wait.until(lambda x: x.find_elements(By.CSS_SELECTOR, ".confusion td"))
    cells = js(d, "return [...document.querySelectorAll('.confusion td')].map(c => +c.innerText)")
    assert len(cells) == 4 and sum(cells) == int(
        js(d, "return document.getElementById('val-status').innerText.split(' ')[0]")
    )
    js(d, "[...document.querySelectorAll('.confusion td')].find(c => +c.innerText > 0).click()")
    wait.until(lambda x: js(x, "return [...document.querySelectorAll('.val-item img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)"
                               " && document.querySelectorAll('.val-item').length > 0"))
    d.find_element(By.CSS_SELECTOR, ".val-item").click()  # type: ignore[attr-defined]
    d.find_element(By.ID, "val-test").click()  # type: ignore[attr-defined]
    wait.until(lambda x: len(x.find_elements(By.CSS_SELECTOR, ".kt-card")) == 1
               and x.find_elements(By.CSS_SELECTOR, ".kt-bar"))
    shot(d, "test")

    # Serve: the INT8 model started from the page and called with the copied curl line
    d.get(live_studio.url + "/#serve")  # type: ignore[attr-defined]
    wait.until(
        lambda x: "runs/first" in [o.text for o in x.find_elements(By.CSS_SELECTOR, "#serve-run option")]
    )
    Select(d.find_element(By.ID, "serve-run")).select_by_value("runs/first")  # type: ignore[attr-defined]
    Select(d.find_element(By.ID, "serve-precision")).select_by_visible_text("int8")  # type: ignore[attr-defined]
    d.find_element(By.ID, "serve-go").click()  # type: ignore[attr-defined]
    long_wait.until(lambda x: x.find_elements(By.CSS_SELECTOR, ".server[data-ready='true']"))
    curl = d.find_element(By.CSS_SELECTOR, ".snippet-curl").text  # type: ignore[attr-defined]
    shot(d, "serve")
    shutil.copy(photos[0], tmp_path / "image.jpg")
    out = subprocess.run(shlex.split(curl), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    answer = json.loads(out.stdout)
    assert answer["precision"] == "int8", answer
    assert answer["predictions"][0]["top_k"][0]["label"] in ("china", "flower")
    d.find_element(By.CSS_SELECTOR, ".server button").click()  # type: ignore[attr-defined]
    long_wait.until(lambda x: "no server running" in x.find_element(By.ID, "serve-list").text)
