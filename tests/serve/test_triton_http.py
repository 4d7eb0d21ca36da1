"""The KServe v2 REST API driven by Triton's own client (``tritonclient.http``): health, metadata,
configuration, statistics, repository index, inference in JSON and binary against onnxruntime, and
the bad-input answers of the binary data extension."""

from __future__ import annotations

import asyncio
import io
import json
import struct
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.bundle import Bundle
from kiln.processing import preprocess
from kiln.serve.settings import Settings

from .triton_server import Running, onnx_bundles, ort_outputs, serve

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

__all__ = ["onnx_bundles"]  # a fixture, used by name


@pytest.fixture(scope="module")
def server(onnx_bundles: dict[str, Bundle]) -> Iterator[Running]:
    with serve(list(onnx_bundles.items()),
               Settings(backend="onnxrt", grpc_port=0, max_delay_ms=1)) as running:
        yield running


@pytest.fixture
def client(server: Running) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.http)
    yield c
    c.close()


def _images(n: int, shape: list[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _infer(client: httpclient.InferenceServerClient, model: str, x: np.ndarray, binary: bool,
           outputs: list[str], **kw: object) -> httpclient.InferResult:
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return client.infer(model, [inp], outputs=wanted, **kw)


def test_health_metadata_config_index(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "2")
    meta = client.get_server_metadata()
    assert meta["name"] == "kiln"
    assert {"binary_tensor_data", "model_configuration", "statistics", "model_repository"} <= set(
        meta["extensions"]
    )
    model = client.get_model_metadata("digits", "1")
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    config = client.get_model_config("shapes")
    assert config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [3, 64, 64] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [o["name"] for o in config["output"]] == ["boxes", "scores"]
    assert client.get_model_config("digits", "1")["name"] == "digits"
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("digits", "1", "READY"),
        ("shapes", "1", "READY"),
    }


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("version", ["", "1"])
def test_classify_matches_onnxruntime(client: httpclient.InferenceServerClient,
                                      onnx_bundles: dict[str, Bundle],
                                      binary: bool, version: str) -> None:
    x = _images(3, [1, 28, 28])
    result = _infer(client, "digits", x, binary, ["logits"], model_version=version, request_id="r-1")
    got = result.as_numpy("logits")
    assert got.shape == (3, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, ort_outputs(onnx_bundles["digits"], x)["logits"], atol=1e-5, rtol=0)
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "r-1"


@pytest.mark.parametrize("binary", [True, False])
def test_detect_matches_onnxruntime(client: httpclient.InferenceServerClient, onnx_bundles: dict[str, Bundle],
                                    binary: bool) -> None:
    x = _images(2, [3, 64, 64], seed=1)
    result = _infer(client, "shapes", x, binary, ["scores", "boxes"])
    want = ort_outputs(onnx_bundles["shapes"], x)
    for name in ("boxes", "scores"):
        np.testing.assert_allclose(result.as_numpy(name), want[name], atol=1e-5, rtol=0)
    # no outputs named: tritonclient asks for every output as binary data
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    every = client.infer("shapes", [inp])
    np.testing.assert_allclose(every.as_numpy("scores"), want["scores"], atol=1e-5, rtol=0)


def test_async_infer(client: httpclient.InferenceServerClient, onnx_bundles: dict[str, Bundle]) -> None:
    xs = [_images(1, [1, 28, 28], seed=s) for s in range(4)]
    pending = []
    for x in xs:
        inp = httpclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        pending.append(client.async_infer("digits", [inp],
                                          outputs=[httpclient.InferRequestedOutput("logits")]))
    for x, p in zip(xs, pending, strict=True):
        np.testing.assert_allclose(p.get_result().as_numpy("logits"),
                                   ort_outputs(onnx_bundles["digits"], x)["logits"],
                                   atol=1e-5, rtol=0)


def test_aio_client(server: Running, onnx_bundles: dict[str, Bundle]) -> None:
    import tritonclient.http.aio as aioclient

    async def run() -> np.ndarray:
        async with aioclient.InferenceServerClient(server.http) as c:
            inp = aioclient.InferInput("images", [1, 1, 28, 28], "FP32")
            inp.set_data_from_numpy(_images(1, [1, 28, 28]))
            return (await c.infer("digits", [inp])).as_numpy("logits")

    got = asyncio.run(run())
    np.testing.assert_allclose(got, ort_outputs(onnx_bundles["digits"], _images(1, [1, 28, 28]))["logits"],
                               atol=1e-5)


def test_bytes_input_of_encoded_images(client: httpclient.InferenceServerClient,
                                       onnx_bundles: dict[str, Bundle]) -> None:
    imgs = [Image.new("L", (40, 30), v) for v in (0, 200)]
    blobs = []
    for img in imgs:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    inp = httpclient.InferInput("images", [2], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    got = client.infer("digits", [inp]).as_numpy("logits")
    x, _ = preprocess(imgs, onnx_bundles["digits"].manifest.preprocess)
    np.testing.assert_allclose(got, ort_outputs(onnx_bundles["digits"], x)["logits"], atol=1e-5, rtol=0)


def test_statistics_count_requests_and_batches(client: httpclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("digits")["model_stats"][0]
    _infer(client, "digits", _images(2, [1, 28, 28]), True, ["logits"])
    with pytest.raises(InferenceServerException):
        _infer(client, "digits", _images(2, [1, 27, 28]), True, ["logits"])
    stats = client.get_inference_statistics("digits", "1")["model_stats"][0]
    assert (stats["name"], stats["version"]) == ("digits", "1")
    inf = stats["inference_stats"]
    assert inf["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert inf["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    assert inf["success"]["ns"] > 0 and inf["queue"]["count"] > 0 and inf["compute_infer"]["ns"] > 0
    assert stats["inference_count"] >= before["inference_count"] + 2
    assert any(b["batch_size"] == 2 and b["compute_infer"]["count"] >= 1 for b in stats["batch_stats"])
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} == {"digits", "shapes"}


def test_request_of_exactly_the_image_limit_is_served(client: httpclient.InferenceServerClient) -> None:
    limit = Settings().max_images_per_request  # the server runs with the default limit
    got = _infer(client, "digits", _images(limit, [1, 28, 28]), True, ["logits"]).as_numpy("logits")
    assert got.shape == (limit, 10)
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "digits", _images(limit + 1, [1, 28, 28]), True, ["logits"])
    assert f"received batch {limit + 1} | expected at most {limit} items" in str(info.value)


def test_statistics_count_requests_not_batches(classify_bundle: Bundle) -> None:
    """Four requests of two images run as one batch of eight: compute and queue count four requests,
    the execution count one batch, the inference count eight images."""
    from kiln.serve.batcher import Batcher
    from kiln.serve.triton_ext import ModelStats, message_to_json

    from .conftest import FakeBackend

    stats = ModelStats()
    batcher = Batcher(lambda: FakeBackend(classify_bundle), name="digits", max_batch=8,
                      max_delay=30.0).start()
    try:
        assert batcher.wait_ready(5)
        batcher.on_run = stats.record_run
        futures = [batcher.submit({"images": np.zeros((2, 1, 28, 28), np.float32)}) for _ in range(4)]
        for f in futures:
            assert f.result(10)["logits"].shape == (2, 10)  # the batch closed when full, not after 30 s
    finally:
        batcher.close(drain=False, timeout=5)
    got = message_to_json(stats.message("digits"))
    assert got["inference_stats"]["compute_infer"]["count"] == 4
    assert got["inference_stats"]["queue"]["count"] == 4
    assert (got["execution_count"], got["inference_count"]) == (1, 8)
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in got["batch_stats"]] == [(8, 1)]


def test_errors_are_protocol_strings(client: httpclient.InferenceServerClient) -> None:
    cases = [
        (lambda: client.get_model_metadata("nope"), "unknown model 'nope'"),
        (lambda: client.get_model_metadata("digits", "7"), "no version '7'"),
        (lambda: client.get_model_config("digits", "7"), "no version '7'"),
        (lambda: _infer(client, "digits", _images(1, [1, 28, 28]), False, ["logits"], model_version="2"),
         "no version"),
        (lambda: _infer(client, "digits", _images(1, [3, 28, 28]), True, ["logits"]), "Input tensor: images"),
        (lambda: _infer(client, "digits", _images(1, [1, 28, 28]), True, ["nope"]), "Output tensor: nope"),
    ]
    for call, text in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert text in str(info.value), str(info.value)
        assert isinstance(info.value.message(), str)


def _raw(server: Running, body: bytes, header: str | None,
         path: str = "/v2/models/digits/infer") -> httpx.Response:
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    return httpx.post(f"http://{server.http}{path}", content=body, headers=headers, timeout=30)


def _header(datatype: str = "FP32", shape: list[int] | None = None, size: int | None = 3136) -> bytes:
    params = {} if size is None else {"parameters": {"binary_data_size": size}}
    return json.dumps({"inputs": [{"name": "images", "shape": shape or [1, 1, 28, 28], "datatype": datatype,
                                   **params}]}).encode()


def test_binary_extension_bad_inputs(server: Running) -> None:
    x = np.zeros((1, 1, 28, 28), np.float32).tobytes()
    head = _header()
    cases = [
        (_header(size=3000) + x[:3000], str(len(_header(size=3000))), "images"),  # size disagrees with shape
        (head + x, str(len(head) + len(x) + 1), "past the end"),  # header length past the body
        (head + x, "-5", "Inference-Header-Content-Length"),  # negative
        (head + x, "12abc", "Inference-Header-Content-Length"),  # garbage
        (head, None, "images"),  # binary_data_size but no binary part
        (head + x[:100], str(len(head)), "images"),  # binary part shorter than binary_data_size
        (head + x + b"extra", str(len(head)), "binary data"),  # bytes nobody claims
        (_header("BYTES", [1], 6) + struct.pack("<I", 9) + b"ab", str(len(_header("BYTES", [1], 6))),
         "images"),
        (_header("BYTES", [2], 6) + struct.pack("<I", 0) + b"ab", str(len(_header("BYTES", [2], 6))),
         "images"),
        (_header(size=None), None, "images"),  # neither data nor binary_data_size
    ]
    for body, header, text in cases:
        resp = _raw(server, body, header)
        assert resp.status_code == 400, (header, resp.text)
        error = resp.json()
        assert set(error) == {"error"} and isinstance(error["error"], str) and text in error["error"], error


def test_json_body_with_any_content_type(server: Running) -> None:
    body = {"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    for ctype in (None, "application/json", "application/json; charset=utf-8", "text/plain",
                  "application/octet-stream"):
        headers = {} if ctype is None else {"Content-Type": ctype}
        resp = httpx.post(f"http://{server.http}/v2/models/digits/versions/1/infer", content=json.dumps(body),
                          headers=headers, timeout=30)
        assert resp.status_code == 200, (ctype, resp.text)
        assert resp.json()["outputs"][0]["shape"] == [1, 10]


def test_error_shapes_by_protocol(server: Running) -> None:
    base = f"http://{server.http}"
    assert httpx.get(f"{base}/v2/models/nope").json() == {"error": "unknown model 'nope'; served: digits, "
                                                                   "shapes"}
    assert httpx.get(f"{base}/v2/models/digits/versions/2/ready").json()["error"].startswith("model 'digits' "
                                                                                             "has no")
    assert httpx.get(f"{base}/v2/models/digits/versions/2/stats").status_code == 404
    bad = httpx.post(f"{base}/v2/models/digits/infer", content=b'{"inputs": []}')
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
    nan = httpx.post(f"{base}/v2/models/digits/infer",
                     content=b'{"inputs": [{"name": "images", "shape": [1], '
                                                              b'"datatype": "FP32", "data": [NaN]}]}')
    assert nan.status_code == 400 and isinstance(nan.json()["error"], str)
    v1 = httpx.get(f"{base}/v1/models/nope").json()
    assert v1["error"]["code"] == "model_not_found" and "request_id" in v1["error"]


def test_api_key_on_v2(onnx_bundles: dict[str, Bundle]) -> None:
    settings = Settings(backend="onnxrt", api_key="s3cret")
    with serve([("digits", onnx_bundles["digits"])], settings) as running:
        c = httpclient.InferenceServerClient(running.http)
        assert c.is_server_live()  # health stays open
        with pytest.raises(InferenceServerException) as info:
            c.get_model_metadata("digits")
        assert "API key" in str(info.value)
        authed = c.get_model_metadata("digits", headers={"Authorization": "Bearer s3cret"})
        assert authed["name"] == "digits"
        c.close()
