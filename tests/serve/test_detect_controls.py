"""Detection controls per request on /v1 predict: query parameters and JSON body fields override
kiln.json's defaults; top_k on a detector and detection controls on a classifier are 400s."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from kiln.bundle import Bundle
from kiln.serve.app import create_app
from kiln.serve.settings import Settings

from .conftest import FakeBackend, png

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture
def client(classify_bundle: Bundle, detect_bundle: Bundle) -> Iterator[TestClient]:
    app = create_app([("digits", classify_bundle), ("shapes", detect_bundle)], Settings(max_delay_ms=1.0),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    with TestClient(app, raise_server_exceptions=False) as c:
        end = time.monotonic() + 5
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.01)
        yield c


def _labels(resp) -> list[str]:  # type: ignore[no-untyped-def]
    assert resp.status_code == 200, resp.text
    return [d["label"] for d in resp.json()["predictions"][0]["boxes"]]


def _file() -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("a.png", png("RGB", (64, 64), (0, 0, 0)), "image/png")}


def test_query_controls(client: TestClient) -> None:
    url = "/v1/models/shapes/predict"
    # fake outputs: circle 0.9 and circle 0.8 overlapping, square 0.7 elsewhere, a low-scoring 4th box
    assert _labels(client.post(url, files=_file())) == ["circle", "square"]  # one label per box, NMS
    assert _labels(client.post(url + "?conf=0.75", files=_file())) == ["circle"]
    assert _labels(client.post(url + "?iou=0.95", files=_file())) == ["circle", "circle", "square"]
    assert _labels(client.post(url + "?max_det=1", files=_file())) == ["circle"]
    assert _labels(client.post(url + "?classes=square", files=_file())) == ["square"]
    multi = _labels(client.post(url + "?multi_label=true&conf=0.09&iou=0.95", files=_file()))
    # a box once per class over 0.09
    assert sorted(multi) == ["circle", "circle", "circle", "square", "square"]
    assert _labels(client.post(url + "?agnostic=true&multi_label=true&conf=0.09", files=_file())) == [
        "circle",
        "square",
    ]
    assert _labels(client.post(url + "?classes=1,circle", files=_file())) == ["circle", "square"]


def test_json_body_controls_and_query_wins(client: TestClient) -> None:
    img = base64.b64encode(png("RGB", (64, 64), (0, 0, 0))).decode()
    url = "/v1/models/shapes/predict"
    assert _labels(client.post(url, json={"images": [img], "conf": 0.75})) == ["circle"]
    assert _labels(client.post(url + "?conf=0.5", json={"images": [img], "conf": 0.75})) == [
        "circle",
        "square",
    ]
    assert _labels(client.post(url, json={"images": [img], "classes": ["square"]})) == ["square"]


def test_bad_controls_are_400(client: TestClient) -> None:
    url = "/v1/models/shapes/predict"
    resp = client.post(url + "?top_k=1", files=_file())
    assert resp.status_code == 400 and "max_det" in resp.text
    resp = client.post(url + "?classes=hexagon", files=_file())
    assert resp.status_code == 400 and "hexagon" in resp.text
    assert client.post(url + "?conf=2", files=_file()).status_code in (400, 422)
    resp = client.post("/v1/models/digits/predict?conf=0.5", files={"file": ("a.png", png(), "image/png")})
    assert resp.status_code == 400 and "detection" in resp.text
