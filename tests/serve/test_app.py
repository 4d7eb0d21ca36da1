"""The HTTP API with a fake numpy backend: every endpoint and every bad input the server must refuse."""

from __future__ import annotations

import base64
import gc
import io
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kiln.bundle import Bundle
from kiln.serve.app import create_app
from kiln.serve.settings import Settings

from .conftest import FakeBackend, png

MakeClient = Callable[..., TestClient]
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture
def make_client(classify_bundle: Bundle, detect_bundle: Bundle) -> Iterator[MakeClient]:
    clients: list[TestClient] = []

    def make(models: list[tuple[str, Any]] | None = None, **settings: Any) -> TestClient:
        settings.setdefault("max_delay_ms", 1.0)
        app = create_app(
            models or [("digits", classify_bundle), ("shapes", detect_bundle)],
            Settings(**settings),
            loader=lambda bundle, _s: FakeBackend(bundle),
        )
        client = TestClient(app, raise_server_exceptions=False).__enter__()
        clients.append(client)
        end = time.monotonic() + 5
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end, client.get("/readyz").json()
            time.sleep(0.01)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


def backend_of(client: TestClient, name: str = "digits") -> FakeBackend:
    return client.app.state.models[name].batcher.backend  # type: ignore[attr-defined,no-any-return]


def assert_error(resp: Any, status: int, code: str | None = None, contains: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    if resp.request.url.path.startswith("/v2"):  # the Open Inference Protocol's {"error": "<message>"}
        assert isinstance(body["error"], str), body
        assert contains.lower() in body["error"].lower(), body
        return {"message": body["error"]}
    assert {"code", "message"} <= set(body["error"])
    if code is not None:
        assert body["error"]["code"] == code, body
    assert contains.lower() in body["error"]["message"].lower(), body
    return body["error"]  # type: ignore[no-any-return]


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---- native API -----------------------------------------------------------------------------------


def test_list_and_describe_models(client: TestClient) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["digits", "shapes"]
    info = client.get("/v1/models/digits").json()
    assert info["task"] == "classify"
    assert info["labels"] == [str(i) for i in range(10)]
    assert info["backend"] == "fake" and info["precision"] == "fp32" and info["ready"] is True
    assert info["batch"] == {"min": 1, "max": 32}
    assert info["input"] == {"name": "images", "shape": [1, 28, 28], "dtype": "float32"}


def test_predict_multipart_several_images(client: TestClient) -> None:
    files = [("file", ("black.png", png(value=0), "image/png")),
             ("file", ("white.png", png(value=255), "image/png"))]
    resp = client.post("/v1/models/digits/predict", files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "digits" and body["backend"] == "fake" and body["task"] == "classify"
    assert resp.headers["x-request-id"] == body["request_id"]
    tops = [p["top_k"] for p in body["predictions"]]
    assert [t[0]["label"] for t in tops] == ["0", "9"]
    assert len(tops[0]) == 3  # top_k from kiln.json
    assert tops[0][0]["score"] > 0.9 and tops[0][0]["score"] >= tops[0][1]["score"]
    assert body["predictions"][0]["width"] == 28


def test_predict_json_base64_and_top_k(client: TestClient) -> None:
    images = [base64.b64encode(png(value=128)).decode(),
              "data:image/png;base64," + base64.b64encode(png(value=0)).decode()]
    resp = client.post("/v1/models/digits/predict", json={"images": images, "top_k": 2})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert [p["top_k"][0]["label"] for p in preds] == ["5", "0"]
    assert all(len(p["top_k"]) == 2 for p in preds)
    resp = client.post("/v1/models/digits/predict?top_k=1", json={"images": images[:1]})
    assert len(resp.json()["predictions"][0]["top_k"]) == 1


def test_settings_top_k_override(make_client: MakeClient) -> None:
    client = make_client(top_k=5)
    resp = client.post("/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")})
    assert len(resp.json()["predictions"][0]["top_k"]) == 5


@pytest.mark.parametrize(
    "make_image",
    [
        pytest.param(lambda: encode(Image.new("CMYK", (40, 30), (0, 0, 0, 0)), "JPEG"), id="cmyk-jpeg"),
        pytest.param(lambda: encode(Image.new("P", (20, 20), 3)), id="palette"),
        pytest.param(lambda: encode(Image.fromarray(np.full((16, 16), 65535, np.uint16))), id="16-bit"),
        pytest.param(lambda: encode(Image.new("RGBA", (20, 20), (255, 255, 255, 255))), id="alpha"),
        pytest.param(lambda: encode(Image.new("LA", (20, 20), (255, 0))), id="gray-alpha"),
    ],
)
def test_unusual_modes_are_converted(client: TestClient, make_image: Callable[[], bytes]) -> None:
    resp = client.post("/v1/models/digits/predict",
                       files={"file": ("x", make_image(), "application/octet-stream")})
    assert resp.status_code == 200, resp.text


def test_large_image_decoded_off_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.serve.images as images_module

    offloaded: list[str] = []
    real = images_module.DecodePool.run

    async def spy(pool: Any, fn: Callable[..., Any], *args: Any) -> Any:
        offloaded.append(fn.__name__)
        return await real(pool, fn, *args)

    monkeypatch.setattr(images_module.DecodePool, "run", spy)
    client.post("/v1/models/digits/predict", files={"file": ("small.png", png(), "image/png")})
    assert offloaded == []
    big = encode(Image.new("L", (1200, 900), 255))
    resp = client.post("/v1/models/digits/predict", files={"file": ("big.png", big, "image/png")})
    assert resp.status_code == 200, resp.text
    pred = resp.json()["predictions"][0]
    assert (pred["width"], pred["height"], pred["top_k"][0]["label"]) == (1200, 900, "9")
    assert offloaded == ["_decode_preprocess_and_release"]


# ---- bad input ----------------------------------------------------------------------------------------


def test_not_an_image(client: TestClient) -> None:
    resp = client.post("/v1/models/digits/predict",
                       files={"file": ("a.txt", b"hello, not an image", "text/plain")})
    assert_error(resp, 400, "invalid_image", "not an image")


def test_truncated_jpeg(client: TestClient) -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("L"), "JPEG", quality=90)
    resp = client.post("/v1/models/digits/predict",
                       files={"file": ("t.jpg", data[: len(data) // 2], "image/jpeg")})
    assert_error(resp, 400, "invalid_image")


def test_zero_byte_upload(client: TestClient) -> None:
    resp = client.post("/v1/models/digits/predict", files={"file": ("empty.png", b"", "image/png")})
    assert_error(resp, 400, "invalid_image", "empty")


def test_bad_base64(client: TestClient) -> None:
    resp = client.post("/v1/models/digits/predict",
                       json={"images": [base64.b64encode(png()).decode(), "@@not base64@@"]})
    assert_error(resp, 400, "invalid_base64", "images[1]")


def test_bad_json_body(client: TestClient) -> None:
    resp = client.post("/v1/models/digits/predict", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert_error(resp, 400, "invalid_request")
    resp = client.post("/v1/models/digits/predict", json={"images": []})
    assert_error(resp, 400, "invalid_request", "images")


def test_pixel_limit_bomb(make_client: MakeClient) -> None:
    client = make_client(max_image_pixels=100_000)
    bomb = encode(Image.new("L", (2000, 2000), 0))  # 4 MP of zeros compresses to a few KB
    assert len(bomb) < 20_000
    resp = client.post("/v1/models/digits/predict", files={"file": ("bomb.png", bomb, "image/png")})
    assert_error(resp, 400, "invalid_image", "over the limit")


def test_too_many_images(make_client: MakeClient) -> None:
    client = make_client(max_images_per_request=2)
    files = [("file", (f"{i}.png", png(), "image/png")) for i in range(3)]
    assert_error(client.post("/v1/models/digits/predict", files=files), 400, "too_many_images", "limit of 2")
    images = [base64.b64encode(png()).decode()] * 3
    assert_error(client.post("/v1/models/digits/predict", json={"images": images}), 400, "too_many_images")


def test_no_images_and_wrong_content_type(client: TestClient) -> None:
    resp = client.post("/v1/models/digits/predict", files={"other": ("a.png", png(), "image/png")})
    assert_error(resp, 400, "no_images")
    resp = client.post("/v1/models/digits/predict", content=png(), headers={"content-type": "image/png"})
    assert_error(resp, 415, "unsupported_media_type")


def test_body_over_limit(make_client: MakeClient) -> None:
    client = make_client(max_body_bytes=10_000)
    big = np.random.default_rng(0).integers(0, 255, 20_000, dtype=np.uint8).tobytes()
    resp = client.post("/v1/models/digits/predict", files={"file": ("x.png", big, "image/png")})
    assert_error(resp, 413, "body_too_large", "limit of 10000")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is what is checked
        for _ in range(10):
            yield b"x" * 4096

    resp = client.post("/v1/models/digits/predict", content=chunks(),
                       headers={"content-type": "application/json"})
    assert_error(resp, 413, "body_too_large")
    resp = client.post("/v1/models/digits/predict", content=chunks(),
                       headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(resp, 413, "body_too_large")
    # the limit holds for the v2 endpoint too (FastAPI parses its body)
    resp = client.post("/v2/models/digits/infer", content=chunks(),
                       headers={"content-type": "application/json"})
    assert_error(resp, 413, "body_too_large")


def test_unknown_model_and_route(client: TestClient) -> None:
    assert_error(client.post("/v1/models/nope/predict", files={"file": ("a.png", png(), "image/png")}), 404,
                 "model_not_found", "digits")
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")
    assert_error(client.get("/v2/models/nope"), 404, "model_not_found")
    assert_error(client.post("/v2/models/nope/infer",
                             json={"inputs": [{"name": "images", "shape": [1], "datatype": "FP32",
                                               "data": [0]}]}), 404)
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/v1/models/digits/predict"), 405, "method_not_allowed")


def test_api_key(make_client: MakeClient) -> None:
    client = make_client(api_key="s3cret")
    files = {"file": ("a.png", png(), "image/png")}
    err = assert_error(client.post("/v1/models/digits/predict", files=files), 401, "unauthorized", "missing")
    assert err["request_id"]
    resp = client.post("/v1/models/digits/predict", files=files, headers={"Authorization": "Bearer wrong"})
    assert_error(resp, 401, "unauthorized", "wrong")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert_error(client.get("/v1/models"), 401)
    assert_error(client.get("/metrics"), 401)
    assert_error(client.post("/v2/models/digits/infer", json=v2_body()), 401)
    ok = client.post("/v1/models/digits/predict", files=files, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    for open_path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert client.get(open_path).status_code == 200, open_path
    assert_error(client.get("/v2/models/digits/ready"), 401)  # its answer would say which names are served


def test_backend_exception_is_500_with_request_id_and_server_keeps_serving(
    client: TestClient, caplog: Any
) -> None:
    backend_of(client).fail_next = True
    files = {"file": ("a.png", png(), "image/png")}
    resp = client.post("/v1/models/digits/predict", files=files, headers={"X-Request-ID": "abc-123"})
    err = assert_error(resp, 500, "inference_failed")
    assert err["request_id"] == "abc-123" and resp.headers["x-request-id"] == "abc-123"
    assert "simulated backend failure" not in err["message"]  # no internals in the answer
    assert "simulated backend failure" in caplog.text and "abc-123" in caplog.text
    assert client.post("/v1/models/digits/predict", files=files).status_code == 200


def test_timeout_is_504(make_client: MakeClient) -> None:
    client = make_client(timeout_s=0.1)
    backend_of(client).delay = 0.5
    resp = client.post("/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")})
    assert_error(resp, 504, "timeout")


def test_full_queue_is_503_with_retry_after(make_client: MakeClient) -> None:
    import threading

    client = make_client(max_queue=1, max_batch=1)
    backend = backend_of(client)
    backend.gate = threading.Event()
    model = client.app.state.models["digits"]  # type: ignore[attr-defined]
    x = {"images": np.zeros((1, 1, 28, 28), np.float32)}
    busy = model.batcher.submit(x)
    while not backend.calls[-1:] or model.batcher.qsize():
        time.sleep(0.005)
    queued = model.batcher.submit(x)
    resp = client.post("/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")})
    assert_error(resp, 503, "queue_full")
    assert int(resp.headers["retry-after"]) >= 1
    backend.gate.set()
    busy.result(5), queued.result(5)


# ---- KServe v2 ------------------------------------------------------------------------------------------


def v2_body(name: str = "images", shape: list[int] | None = None, datatype: str = "FP32",
            n: int = 2) -> dict[str, Any]:
    shape = shape or [n, 1, 28, 28]
    data = np.zeros(int(np.prod(shape)), np.float32)
    data[: data.size // 2] = 1.0  # first image bright, second dark
    return {"id": "r1",
            "inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data.tolist()}]}


def test_v2_metadata_and_health(client: TestClient) -> None:
    assert client.get("/v2").json()["name"] == "kiln"
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/digits").json()
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}


def test_v2_infer_flat_and_nested(client: TestClient) -> None:
    resp = client.post("/v2/models/digits/infer", json=v2_body())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_name"] == "digits" and body["id"] == "r1"
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["shape"] == [2, 10] and out["datatype"] == "FP32"
    logits = np.asarray(out["data"]).reshape(2, 10)
    assert logits.argmax(1).tolist() == [9, 5]  # raw input 1.0 -> brightness 1.0; 0.0 -> 0.5
    nested = np.zeros((1, 1, 28, 28), np.float32).tolist()
    resp = client.post("/v2/models/digits/infer",
                       json={"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                         "data": nested}], "outputs": [{"name": "logits"}]})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (v2_body(name="pixels"), "pixels"),
        (v2_body(shape=[2, 1, 28, 27]), "shape"),
        (v2_body(shape=[1, 28, 28]), "shape"),
        (v2_body(datatype="INT64"), "datatype"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [1.0, 2.0]}]},
         "values"),
        ({**v2_body(), "outputs": [{"name": "probs"}]}, "probs"),
    ],
)
def test_v2_wrong_tensor_is_400_naming_it(client: TestClient, body: dict[str, Any], needle: str) -> None:
    err = assert_error(client.post("/v2/models/digits/infer", json=body), 400, None, needle)
    assert "images" in err["message"] or "probs" in err["message"] or "pixels" in err["message"]


def test_v2_malformed_request_is_400(client: TestClient) -> None:
    assert_error(client.post("/v2/models/digits/infer", json={"inputs": "nope"}), 400, "invalid_request")


# ---- health, metrics, docs, page, CORS -----------------------------------------------------------------


def test_readyz_waits_for_load(classify_bundle: Bundle) -> None:
    import threading

    release = threading.Event()

    def slow_loader(bundle: Bundle, _s: Settings) -> FakeBackend:
        release.wait(5)
        return FakeBackend(bundle)

    app = create_app([("digits", classify_bundle)], Settings(), loader=slow_loader)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert_error(client.get("/readyz"), 503, "not_ready", "loading")
        assert_error(client.post("/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")}),
                     503, "not_ready")
        assert client.get("/v2/models/digits/ready").status_code == 400
        release.set()
        end = time.monotonic() + 5
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.01)


def test_load_failure_reported(classify_bundle: Bundle) -> None:
    failures: list[str] = []

    def broken(bundle: Bundle, _s: Settings) -> FakeBackend:
        raise RuntimeError("no artifact for backend onnxruntime")

    app = create_app([("digits", classify_bundle)], Settings(), loader=broken,
                     on_load_error=lambda n, e: failures.append(n))
    with TestClient(app) as client:
        end = time.monotonic() + 5
        while not failures:
            assert time.monotonic() < end
            time.sleep(0.01)
        assert_error(client.get("/readyz"), 503, "not_ready", "no artifact")
        assert client.get("/v1/models/digits").json()["error"].startswith("no artifact")


def test_metrics(client: TestClient) -> None:
    client.post("/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")})
    client.get("/v1/models/nope")
    text = client.get("/metrics").text
    assert ('kiln_request_duration_seconds_count{model="digits",route="/v1/models/{name}/predict",'
            'status="200"} 1.0' in text)
    assert 'kiln_request_duration_seconds_count{model="",route="/v1/models/{name}",status="404"} 1.0' in text
    assert 'kiln_batch_size_count{model="digits"}' in text
    assert 'kiln_inference_duration_seconds_count{model="digits"}' in text
    assert 'kiln_queue_depth{model="digits"} 0.0' in text
    assert (
        'kiln_backend_info{backend="fake",device="cpu",max_batch="32",model="digits",precision="fp32"} 1.0'
        in text
    )


def test_openapi_and_page(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/models/{name}/predict", "/v2/models/{name}/infer", "/readyz", "/v2/health/live"):
        assert path in spec["paths"], path
    content = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "v1/models" in page.text


def test_cors_only_when_configured(make_client: MakeClient) -> None:
    plain = make_client()
    assert "access-control-allow-origin" not in plain.get("/v1/models", headers={"Origin": "https://a.example"}).headers
    cors = make_client(cors_origins="https://a.example")
    resp = cors.options("/v1/models/digits/predict",
                        headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert resp.headers["access-control-allow-origin"] == "https://a.example"
    resp = cors.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in resp.headers


def test_detection_boxes_in_original_pixels(client: TestClient) -> None:
    resp = client.post("/v1/models/shapes/predict",
                       files={"file": ("a.png", png("RGB", (128, 64), (0, 0, 0)), "image/png")})
    assert resp.status_code == 200, resp.text
    pred = resp.json()["predictions"][0]
    assert pred["width"] == 128 and pred["height"] == 64
    # 128x64 letterboxed into 64x64: scale 0.5, pad_y 16; fake box [8, 8, 40, 40] -> [16, 0, 80, 48]
    best = pred["boxes"][0]
    assert best["label"] == "circle"
    assert best["box"] == pytest.approx([16, 0, 80, 48], abs=0.5)
    assert all(0 <= v <= 128 for d in pred["boxes"] for v in d["box"])


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_MAX_BATCH", "16")
    monkeypatch.setenv("KILN_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("KILN_API_KEY", "topsecret-key")
    s = Settings.from_flags(max_batch=None, port=9000)
    assert s.max_batch == 16 and s.port == 9000
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.api_key_value() == "topsecret-key" and "topsecret" not in repr(s)
    assert Settings.from_flags(max_batch=4).max_batch == 4  # a flag beats the environment
    with pytest.raises(ValueError):
        Settings(max_batch=0)


def test_client_gone_request_is_cancelled_not_run(classify_bundle: Bundle) -> None:
    """A client that disconnects while its request waits: the request never reaches the backend."""
    import asyncio
    import threading

    app = create_app([("digits", classify_bundle)], Settings(max_batch=1, max_delay_ms=0),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    body = b'{"images": ["' + base64.b64encode(png(value=0)) + b'"]}'

    async def call(gone: asyncio.Event) -> list[dict[str, Any]]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/models/digits/predict",
                 "raw_path": b"/v1/models/digits/predict",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            model = app.state.models["digits"]
            while not model.batcher.ready:
                await asyncio.sleep(0.01)
            backend: FakeBackend = model.batcher.backend
            backend.gate = threading.Event()
            backend.calls.clear()
            stay, leave = asyncio.Event(), asyncio.Event()
            busy = asyncio.create_task(call(stay))
            while not backend.calls:
                await asyncio.sleep(0.01)
            left = asyncio.create_task(call(leave))
            deadline = time.monotonic() + 30
            while not model.batcher.qsize():  # the second request waits in the queue
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            leave.set()  # the second client hangs up while its request is queued
            await asyncio.wait_for(left, 30)
            backend.gate.set()
            answer = await asyncio.wait_for(busy, 30)
            assert answer[0]["status"] == 200
            # A request queued after the abandoned one: once it is answered, the worker has been past the
            # abandoned one, which was skipped (run, it would be a call of its own or share this one's).
            after = model.batcher.submit({"images": np.zeros((1, 1, 28, 28), np.float32)})
            await asyncio.wait_for(asyncio.wrap_future(after), 30)
            assert [n for n, _ in backend.calls] == [1, 1]

    asyncio.run(scenario())


@pytest.mark.parametrize("freeze", [False, True])
def test_gc_freeze_once_the_models_have_loaded(classify_bundle: Bundle, freeze: bool) -> None:
    """`kiln serve` (freeze_gc=True) moves what is alive after loading out of the collector's view, so a
    full collection does not stall the event loop for every long-lived object; an embedded app does not."""
    gc.unfreeze()
    app = create_app([("digits", classify_bundle)], Settings(), loader=lambda bundle, _s: FakeBackend(bundle),
                     freeze_gc=freeze)
    try:
        with TestClient(app) as client:
            end = time.monotonic() + 5
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < end
                time.sleep(0.01)
            end = time.monotonic() + 5
            while freeze and gc.get_freeze_count() == 0 and time.monotonic() < end:
                time.sleep(0.01)  # the freeze follows readiness on the event loop
            assert (gc.get_freeze_count() > 1000) is freeze
            assert (
                client.post(
                    "/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")}
                ).status_code
                == 200
            )
    finally:
        gc.unfreeze()  # the test process's objects go back to the collector


def test_repository_index_ready_filter_keeps_only_ready_models(classify_bundle: Bundle,
                                                               detect_bundle: Bundle) -> None:
    failures: list[str] = []

    def loader(bundle: Bundle, _s: Settings) -> FakeBackend:
        if bundle.manifest.task == "detect":
            raise RuntimeError("no artifact for backend onnxruntime")
        return FakeBackend(bundle)

    app = create_app([("digits", classify_bundle), ("shapes", detect_bundle)], Settings(), loader=loader,
                     on_load_error=lambda n, e: failures.append(n))
    with TestClient(app) as client:
        end = time.monotonic() + 5
        while not failures or client.get("/v2/models/digits/ready").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.01)
        every = client.post("/v2/repository/index", json={})
        assert {(m["name"], m["state"]) for m in every.json()} == {
            ("digits", "READY"),
            ("shapes", "UNAVAILABLE"),
        }
        ready = client.post("/v2/repository/index", json={"ready": True})
        assert [(m["name"], m["state"]) for m in ready.json()] == [("digits", "READY")]
        not_only_ready = client.post("/v2/repository/index", json={"ready": False})
        assert {m["name"] for m in not_only_ready.json()} == {"digits", "shapes"}
