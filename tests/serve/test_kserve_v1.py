"""KServe V1 (``POST /v1/models/NAME:predict``, ``instances`` in, ``predictions`` out) driven by KServe's own
REST client (``kserve.InferenceRESTClient`` with protocol v1) and by curl, through the server ``kiln serve``
runs, beside kiln's native /v1 route on the same path prefix."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.bundle import Bundle
from kiln.processing import preprocess
from kiln.serve.settings import Settings

from .triton_server import Running, onnx_bundles, ort_outputs, serve

__all__ = ["onnx_bundles"]  # a fixture, used by name

# KServe's SDK registers its own copy of the Open Inference Protocol's protobufs ("inference.*"), which
# cannot share a process with tritonclient's (the server's): its client runs in a process of its own.
_CLIENT = """
import asyncio, json, sys
import httpx, kserve

async def main(url, calls):
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v1", timeout=30))
    out = []
    try:
        for call in calls:
            try:
                if call["op"] == "ready":
                    out.append(await client.is_model_ready(url, call["model"]))
                else:
                    out.append(await client.infer(url, call["body"], model_name=call["model"],
                                                  headers=call.get("headers")))
            except httpx.HTTPStatusError as exc:
                out.append({"status": exc.response.status_code, "body": exc.response.json(),
                            "message": str(exc)})
    finally:
        await client.close()
    return out

print(json.dumps(asyncio.run(main(sys.argv[1], json.load(sys.stdin)))))
"""


@pytest.fixture(scope="module")
def server(onnx_bundles: dict[str, Bundle]) -> Iterator[Running]:
    with serve(list(onnx_bundles.items()), Settings(backend="onnxrt", max_delay_ms=1)) as running:
        yield running


def _kserve(running: Running, *calls: dict[str, Any]) -> list[Any]:
    """Each call (``{"op": "infer", "model", "body"[, "headers"]}`` or ``{"op": "ready", "model"}``) made
    in turn by KServe's V1 REST client; an HTTP error is ``{"status", "body", "message"}``."""
    if importlib.util.find_spec("kserve") is None:  # not imported here: see _CLIENT
        pytest.skip("KServe's SDK is not installed (pip install kserve)")
    done = subprocess.run([sys.executable, "-c", _CLIENT, f"http://{running.http}"], input=json.dumps(calls),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _photo(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_kserve_client_tensor_instances_match_onnxruntime(server: Running,
                                                          onnx_bundles: dict[str, Bundle]) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    ready, answer = _kserve(server, {"op": "ready", "model": "digits"},
                            {"op": "infer", "model": "digits", "body": {"instances": x.tolist()}})
    assert ready is True
    logits = ort_outputs(onnx_bundles["digits"], x)["logits"]
    got = [[t["index"] for t in p["top_k"]] for p in answer["predictions"]]
    assert got == np.argsort(-logits, axis=1)[:, :3].tolist()  # kiln.json top_k: 3
    assert [(p["width"], p["height"]) for p in answer["predictions"]] == [(28, 28)] * 3


def test_kserve_client_b64_images_answer_what_native_predict_answers(server: Running) -> None:
    """A detector: encoded images in KServe V1's ``{"b64": ...}`` give /v1's boxes in original pixels."""
    blobs = [_png(_photo((160, 120))), _png(_photo((90, 200)))]
    url = f"http://{server.http}"
    instances = [{"b64": base64.b64encode(blobs[0]).decode()},
                 {"image_bytes": {"b64": base64.b64encode(blobs[1]).decode()}}]
    (answer,) = _kserve(server, {"op": "infer", "model": "shapes", "body": {"instances": instances}})
    native = httpx.post(f"{url}/v1/models/shapes/predict", timeout=30,
                        files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]).json()
    assert answer["predictions"] == native["predictions"]
    assert [(p["width"], p["height"]) for p in answer["predictions"]] == [(160, 120), (90, 200)]
    assert sum(len(p["boxes"]) for p in answer["predictions"]) > 0


def test_kserve_client_digits_b64_matches_preprocessed_tensor(server: Running,
                                                              onnx_bundles: dict[str, Bundle]) -> None:
    img = Image.new("L", (40, 30), 200)
    x, _ = preprocess([img], onnx_bundles["digits"].manifest.preprocess)
    by_image, by_tensor = _kserve(
        server,
        {"op": "infer", "model": "digits",
         "body": {"instances": [{"b64": base64.b64encode(_png(img)).decode()}]}},
        {"op": "infer", "model": "digits", "body": {"instances": x.tolist()}})
    labels = [[t["label"] for t in p["top_k"]] for p in by_image["predictions"]]
    assert labels == [[t["label"] for t in p["top_k"]] for p in by_tensor["predictions"]]


@pytest.mark.parametrize(("body", "message"), [
    ({"instances": [[[0.0] * 28] * 27]}, "expected [1, 28, 28]"),
    ({"instances": [[[[0.0] * 27 + [None]] * 28]]}, "received null at index 27"),
    ({"instances": [[[[0.0] * 28] * 27 + [[0.0] * 27]]]}, "received 783 values"),
    ({"instances": [{"b64": "not base64!"}]}, "not valid base64"),
    ({"instances": [{"b64": base64.b64encode(b"no image").decode()}]}, "image"),
    ({"instances": [{"url": "http://x"}]}, '"b64"'),
    ({"instances": [[[[0.0] * 28] * 28], {"b64": "AAAA"}]}, "one kind per request"),
    ({"instances": []}, "instances"),
    ({"inputs": [1]}, "instances"),
])
def test_kserve_client_bad_instances_are_400_in_v1_shape(server: Running, body: dict[str, Any],
                                                         message: str) -> None:
    (answer,) = _kserve(server, {"op": "infer", "model": "digits", "body": body})
    assert answer["status"] == 400
    error = answer["body"]["error"]
    assert isinstance(error, str) and message in error and error in answer["message"], error


def test_curl_predict_and_errors(server: Running, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"instances": [{"b64": base64.b64encode(_png(_photo((160, 120)))).decode()}]}))

    def curl(*args: str) -> tuple[int, Any]:
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                             timeout=60,
                             check=True).stdout
        text, code = out.rsplit("\n", 1)
        return int(code), json.loads(text)

    code, answer = curl("-X", "POST", "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
                        f"http://{server.http}/v1/models/shapes:predict")
    assert code == 200 and answer["predictions"][0]["width"] == 160
    code, answer = curl("-X", "POST", "--data-binary", f"@{body}",
                        f"http://{server.http}/v1/models/nope:predict")
    assert code == 404 and isinstance(answer["error"], str) and "nope" in answer["error"]
    code, answer = curl(f"http://{server.http}/v1/models/shapes")  # V1 readiness: kiln's model route
    assert code == 200 and answer["name"] == "shapes" and answer["ready"] is True
    metrics = httpx.get(f"http://{server.http}/metrics").text
    assert 'route="/v1/models/{name}:predict"' in metrics and 'model="shapes"' in metrics


def test_api_key_on_kserve_v1(onnx_bundles: dict[str, Bundle]) -> None:
    with serve([("digits", onnx_bundles["digits"])], Settings(backend="onnxrt", api_key="s3cret")) as running:
        instances = {"instances": np.zeros((1, 1, 28, 28)).tolist()}
        denied, answer = _kserve(running, {"op": "infer", "model": "digits", "body": instances},
                                 {"op": "infer", "model": "digits", "body": instances,
                                  "headers": {"Authorization": "Bearer s3cret"}})
        assert denied["status"] == 401 and "API key" in denied["body"]["error"]
        assert len(answer["predictions"]) == 1


def test_more_instances_than_the_limit_are_refused(onnx_bundles: dict[str, Bundle]) -> None:
    with serve([("digits", onnx_bundles["digits"])],
               Settings(backend="onnxrt", max_images_per_request=2)) as running:
        r = httpx.post(f"http://{running.http}/v1/models/digits:predict", timeout=30,
                       json={"instances": np.zeros((3, 1, 28, 28)).tolist()})
        assert r.status_code == 400 and "at most 2" in r.json()["error"]
