"""The Test page with a real trained detector (kiln-det-s, 6 epochs on 96 shapes images at 96 px, about
20 s of training): /api/predict gives
every box over the page's lowest score before NMS, the page draws them in a colour per class, and its score
and IoU sliders re-filter them without a new request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.browser import chromium, needs_chromium

from .conftest import WRITE, LiveStudio, copy_bundle

SHAPES_COUNT = "96"


@pytest.fixture(scope="module")
def det_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """kiln-det-s with a little skill: boxes of more than one class over the page's lowest score."""
    import torch

    from kiln.train.config import TrainConfig
    from kiln.train.loop import train

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_SHAPES_COUNT", SHAPES_COUNT)
        out = tmp_path_factory.mktemp("det") / "shapes"
        train(TrainConfig(data="shapes", model="kiln-det-s", epochs=6, batch_size=16, image_size=96,
                          out=str(out)),
              progress=False)
    yield out


@pytest.fixture
def scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A validation image of the shapes set the detector was trained on."""
    from kiln.data import open_dataset

    monkeypatch.setenv("KILN_SHAPES_COUNT", SHAPES_COUNT)
    _, val = open_dataset("shapes", val_fraction=0.2, seed=0)
    path = tmp_path / "scene.png"
    val.image(0).save(path)
    return path


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_predict_gives_a_detectors_boxes_before_nms(client: TestClient, workspace: Path, det_master: Path,
                                                    scene: Path) -> None:
    from kiln.studio.routes_models import TEST_CONF

    run = copy_bundle(det_master, workspace, "shapes")
    r = client.post("/api/predict", params={"run": run},
                    files=[("files", ("scene.png", scene.read_bytes(), "image/png"))],
                    headers=WRITE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "detect" and body["classes"] == ["circle", "square", "triangle"]
    res = body["results"][0]
    boxes = res["boxes"]
    assert boxes and min(b["score"] for b in boxes) >= TEST_CONF
    assert (res["width"], res["height"]) == _image_size(scene)
    # no NMS yet: NMS at the bundle's IoU (greedy, per class, as the page runs it) removes many boxes
    iou = body["postprocess"]["iou_threshold"]
    kept: list[dict] = []  # type: ignore[type-arg]
    for b in sorted(boxes, key=lambda b: -b["score"]):
        if not any(k["index"] == b["index"] and _iou(k["box"], b["box"]) > iou for k in kept):
            kept.append(b)
    assert len(kept) < 0.7 * len(boxes), (len(kept), len(boxes))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


@pytest.fixture
def browser() -> Iterator[object]:
    yield from chromium()


@needs_chromium
def test_test_page_draws_detections_and_its_sliders_refilter_them_without_a_request(
        live_studio: LiveStudio, browser: object, det_master: Path, scene: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    copy_bundle(det_master, live_studio.workspace, "shapes")
    d = browser
    d.get(live_studio.url + "/#test")  # type: ignore[attr-defined]
    wait = WebDriverWait(d, 60)
    wait.until(
        lambda x: "runs/shapes" in [o.text for o in x.find_elements(By.CSS_SELECTOR, "#test-run option")]
    )
    Select(d.find_element(By.ID, "test-run")).select_by_value("runs/shapes")  # type: ignore[attr-defined]

    def listed() -> list[str]:
        return d.execute_script("return [...document.querySelectorAll('.kt-box')].map(b => b.innerText)")  # type: ignore[attr-defined,no-any-return]

    def slide(cls: str, value: float) -> None:
        d.execute_script(f"const s = document.querySelector('.{cls}'); s.value = arguments[0];"  # type: ignore[attr-defined]
                         "s.dispatchEvent(new Event('input'))", value)

    d.find_element(By.CSS_SELECTOR, "#test-panel .kt-file").send_keys(str(scene))  # type: ignore[attr-defined]
    wait.until(lambda x: x.execute_script("return document.querySelector('.kt-count') !== null"))
    assert d.find_element(By.CSS_SELECTOR, ".kt-controls").is_displayed()  # type: ignore[attr-defined]
    slide("kt-score", 0.0)
    slide("kt-iou", 1.0)
    every = listed()
    slide("kt-iou", 0.3)
    after_nms = listed()
    assert 0 < len(after_nms) < len(every)  # NMS in the page removed overlapping boxes
    scores = sorted((float(b.split()[-1]) for b in every), reverse=True)
    slide("kt-score", scores[len(scores) // 2])
    assert len(listed()) < len(after_nms) or len(after_nms) == 1
    slide("kt-score", 0.0)
    painted = d.execute_script(  # type: ignore[attr-defined]
        "const c = document.querySelector('.kt-canvas'); const d = c.getContext('2d').getImageData(0, 0, "
        "c.width, c.height).data;"
        "const seen = new Set(); for (let i = 0; i < d.length; i += 4) seen.add(d[i] + ',' + d[i+1] + ',' + "
        "d[i+2]);"
        "return [...seen]")
    drawn = {"230,25,75", "60,180,75", "0,130,200"} & set(painted)  # the first three class colours
    labels = {b.split()[0] for b in every}
    assert len(labels) >= 2 and len(drawn) == len(labels)  # a colour per class found in the boxes
    calls = d.execute_script(  # type: ignore[attr-defined]
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/api/predict')).length")
    assert calls == 1  # every slider move above re-filtered in the page
    slide("kt-score", 0.25)
    d.save_screenshot(str(Path(__file__).resolve().parents[2] / "docs" / "studio" / "test-detect.png"))  # type: ignore[attr-defined]
