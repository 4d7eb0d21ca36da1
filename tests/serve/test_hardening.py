"""Hardening in-process: the decode budget, off-loop decoding, EXIF orientation, the API key (empty means
open; no model list for strangers), strict v2 numbers, and the settings behind the connection limits.
The same server as a real uvicorn process: test_hardening_live.py."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kiln.bundle import Bundle
from kiln.errors import InputError
from kiln.serve import images
from kiln.serve.app import create_app
from kiln.serve.numeric import parse_tensor
from kiln.serve.settings import Settings

from .conftest import FakeBackend, png

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(classify_bundle: Bundle, detect_bundle: Bundle) -> Iterator[MakeClient]:
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        app = create_app([("digits", classify_bundle), ("shapes", detect_bundle)],
                         Settings(**{"max_delay_ms": 1.0, **settings}),
                         loader=lambda bundle, _s: FakeBackend(bundle))
        client = TestClient(app, raise_server_exceptions=False).__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


# ---- decode budget and where decoding runs ------------------------------------------------------------


def test_decode_budget_is_checked_from_headers(make_client: MakeClient,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client(max_request_pixels=100 * 100)
    decoded: list[int] = []
    real = images.processing.decode
    monkeypatch.setattr(images.processing, "decode",
                        lambda img, spec=None, where="": decoded.append(1) or real(img, spec, where))
    resp = client.post("/v1/models/digits/predict", files=files(png(size=(80, 80)), png(size=(80, 80))))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_many_pixels", resp.text
    assert "12800 pixels" in resp.json()["error"]["message"] and "10000" in resp.json()["error"]["message"]
    assert decoded == []  # refused before a single image was decoded
    assert client.post("/v1/models/digits/predict", files=files(png(size=(80, 80)))).status_code == 200
    assert decoded == [1]
    # the per-image limit still answers 400 naming the image
    client = make_client(max_image_pixels=50 * 50)
    resp = client.post("/v1/models/digits/predict", files=files(png(), png(size=(60, 60))))
    assert resp.status_code == 400 and "image 1: image is 60x60" in resp.json()["error"]["message"]


def test_many_small_images_are_decoded_off_the_loop(make_client: MakeClient,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client()
    offloaded: list[int] = []
    real = images.DecodePool.run

    async def spy(pool: Any, fn: Callable[..., Any], *args: Any) -> Any:
        offloaded.append(len(args[0]))
        return await real(pool, fn, *args)

    monkeypatch.setattr(images.DecodePool, "run", spy)
    assert (
        client.post("/v1/models/digits/predict", files=files(*[png()] * images.INLINE_IMAGES)).status_code
        == 200
    )
    assert offloaded == []
    resp = client.post("/v1/models/digits/predict", files=files(*[png(value=0)] * 64))
    assert resp.status_code == 200 and len(resp.json()["predictions"]) == 64
    assert offloaded == [64]


def test_release_memory_is_safe_to_call() -> None:
    images.release_memory()  # malloc_trim on glibc, nothing elsewhere


# ---- EXIF orientation ---------------------------------------------------------------------------------


def sideways_jpeg() -> bytes:
    """Stored 40x20, top half white; EXIF Orientation 6 (rotate 90 degrees clockwise to display):
    displayed 20x40 with the white half on the right."""
    stored = Image.new("L", (40, 20), 0)
    stored.paste(255, (0, 0, 40, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    (img,) = images.open_images([sideways_jpeg()], 10_000, 10_000)
    shown = np.asarray(images.processing.decode(img))
    assert shown.shape == (40, 20)  # rows, columns: 20 wide, 40 high
    assert shown[:, :8].mean() < 30 and shown[:, 12:].mean() > 225


def test_predict_reports_the_oriented_size(make_client: MakeClient) -> None:
    client = make_client()
    resp = client.post("/v1/models/shapes/predict",
                       files=[("file", ("p.jpg", sideways_jpeg(), "image/jpeg"))])
    assert resp.status_code == 200, resp.text
    pred = resp.json()["predictions"][0]
    assert (pred["width"], pred["height"]) == (20, 40)


# ---- the API key --------------------------------------------------------------------------------------


def test_empty_key_means_open_with_a_warning(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("KILN_API_KEY", "")
    assert Settings().api_key is None and Settings(api_key="  ").api_key_value() is None
    with caplog.at_level(logging.WARNING, logger="kiln.serve"):
        client = make_client(api_key="")
        assert client.get("/v1/models").status_code == 200
        assert client.get("/metrics").status_code == 200
    assert "every endpoint is open" in caplog.text


def test_key_is_checked_before_the_body_and_models_stay_private(make_client: MakeClient) -> None:
    client = make_client(api_key="s3cret", max_body_bytes=1000)
    # no key: 401 even for a body over the limit; the gate answers before reading it
    resp = client.post("/v1/models/digits/predict", content=b"x" * 5000,
                       headers={"content-type": "application/json"})
    assert resp.status_code == 401 and resp.headers["connection"] == "close"
    assert client.get("/v1/models/nope").status_code == 401
    assert client.get("/no/such/route").status_code == 401
    # per-model readiness would tell a stranger which names are served: it needs the key too
    stranger = client.get("/v2/models/nope/ready")
    assert stranger.status_code == 401 and "digits" not in stranger.text
    member = client.get("/v2/models/nope/ready", headers={"Authorization": "Bearer s3cret"})
    assert member.status_code == 404 and "digits" in member.text
    assert client.get("/v1/models/nope", headers={"Authorization": "Bearer s3cret"}).status_code == 404


def test_cors_preflight_needs_no_key_and_401_carries_cors(make_client: MakeClient) -> None:
    client = make_client(api_key="s3cret", cors_origins="https://a.example")
    pre = client.options("/v1/models/digits/predict",
                         headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200
    denied = client.get("/v1/models", headers={"Origin": "https://a.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://a.example"


# ---- strict v2 numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "needle"),
    [(None, "received null at index 5"), (math.nan, "received NaN"), (math.inf, "finite"),
     (-math.inf, "finite"), (1e39, "out of range"),
     (True, "received true"), ("1.5", 'received "1.5"'), ([1.0], "regular array")],
)
def test_v2_numbers_are_strict(value: Any, needle: str) -> None:
    data = [0.0] * 5 + [value] + [0.0] * 2
    with pytest.raises(InputError) as err:
        parse_tensor("images", data, "FP32", np.dtype("float32"))
    assert "Input tensor: images" in str(err.value) and needle in str(err.value), err.value


@pytest.mark.parametrize(
    ("data", "datatype", "needle"),
    [([1, 2.5], "INT32", "expected an integer"), ([1, True], "INT32", "expected an integer"),
     ([1, 2**31], "INT32", "out of range"), ([-1], "UINT8", "out of range"),
     ([1, 0], "BOOL", "true or false"),
     ([70000.0], "FP16", "out of range"), ([[1.0, 2.0], [3.0]], "FP32", "regular array")],
)
def test_v2_numbers_per_datatype(data: list[Any], datatype: str, needle: str) -> None:
    from kiln.serve.schemas import V2_DTYPES

    with pytest.raises(InputError, match=needle):
        parse_tensor("t", data, datatype, np.dtype(V2_DTYPES[datatype]))


def test_v2_good_numbers_pass() -> None:
    out = parse_tensor("x", [[1, 2.5], [3.4e38, -0.0]], "FP32", np.dtype("float32"))
    assert out.dtype == np.float32 and out.shape == (4,) and out[1] == 2.5
    assert parse_tensor("i", [0, 255], "UINT8", np.dtype("uint8")).tolist() == [0, 255]
    assert parse_tensor("b", [True, False], "BOOL", np.dtype("bool")).tolist() == [True, False]


@pytest.mark.parametrize("bad", ["null", "NaN", "Infinity", "1e39", "true", '"0.5"'])
def test_v2_infer_refuses_bad_numbers(make_client: MakeClient, bad: str) -> None:
    client = make_client()
    data = ",".join(["0.0"] * 783 + [bad])
    body = (
        '{"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ['
        + data
        + "]}]}"
    )
    resp = client.post("/v2/models/digits/infer", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    message = json.dumps(resp.json())
    if bad not in ("NaN", "Infinity"):  # not JSON at all: refused by the parser, before any tensor
        assert "images" in message, message


# ---- settings behind the connection limits --------------------------------------------------------------


def test_limit_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.serve import cli
    from kiln.serve.http_server import DrainingServer, build_server

    for name, value in [("MAX_REQUEST_PIXELS", "1000"), ("DECODE_THREADS", "3"), ("MAX_HEADER_BYTES", "4096"),
                        ("BODY_TIMEOUT_S", "2.5"), ("KEEP_ALIVE_S", "7"), ("DRAIN_S", "0")]:
        monkeypatch.setenv(f"KILN_{name}", value)
    s = Settings()
    assert (s.max_request_pixels, s.decode_threads, s.max_header_bytes) == (1000, 3, 4096)
    assert (s.body_timeout_s, s.keep_alive_s, s.drain_s) == (2.5, 7, 0)
    assert {"max_request_pixels", "decode_threads", "max_header_bytes", "body_timeout_s", "keep_alive_s",
            "drain_s"} <= set(cli._FLAGS)
    server = build_server(object(), None, s)  # type: ignore[arg-type]
    assert isinstance(server, DrainingServer)
    assert server.config.h11_max_incomplete_event_size == 4096 and server.config.timeout_keep_alive == 7
