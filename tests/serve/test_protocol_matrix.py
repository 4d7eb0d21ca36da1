"""Every corpus image (24x24 to 4000x3000, 1 KB to 15 MB, PNG/JPEG/WebP, EXIF-rotated, RGBA, 16-bit...)
through every protocol of ``kiln serve``'s real server stack (``build_server``: the app, protocol
class, middleware and settings the command runs, gRPC started by the app) with clients nobody here
wrote: httpx and curl on /v1, tritonclient.http on /v2 (JSON and binary tensors, BYTES of encoded
images), tritonclient.grpc (tensors and BYTES). Each answers 200 with the right answer: the test
backend's class is the image's mean brightness, computed here by the one decode every stage uses."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kiln import processing
from kiln.bundle import Bundle
from kiln.serve.settings import Settings
from tests.corpus import LARGEST, SPECS, CorpusImage

from .conftest import FakeBackend, make_bundle
from .triton_server import Running, serve

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

NAMES = list(SPECS)
# The 15 MB PNG (20 MB as base64) costs a second or two per call: it goes through the protocols that
# carry it as raw bytes (multipart with httpx and curl, /v2 binary BYTES, gRPC BYTES), not through all.
SMALLER = [n for n in NAMES if n != LARGEST]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("matrix") / "digits")


@pytest.fixture(scope="module")
def server(bundle: Bundle) -> Iterator[Running]:
    settings = Settings(grpc_port=0, max_delay_ms=1)
    with serve([("digits", bundle)], settings, loader=lambda b, _s: FakeBackend(b)) as running:
        yield running


@pytest.fixture(scope="module")
def images(corpus: list[CorpusImage]) -> dict[str, CorpusImage]:
    return {c.name: c for c in corpus}


_INPUTS: dict[tuple[str, str], np.ndarray] = {}


def model_input(bundle: Bundle, item: CorpusImage) -> np.ndarray:
    """``[1, 1, 28, 28]``: the image as the server makes it (kiln.processing's one decode), once per file."""
    key = (str(bundle.root), item.name)
    if key not in _INPUTS:
        spec = bundle.manifest.preprocess
        _INPUTS[key], _ = processing.preprocess([processing.decode_image(item.data, spec=spec)], spec)
    return _INPUTS[key]


def right_class(bundle: Bundle, item: CorpusImage) -> int:
    """What FakeBackend answers: the mean brightness in tenths."""
    brightness = float(model_input(bundle, item).mean()) * 0.5 + 0.5
    return int(np.floor(min(max(brightness, 0.0), 0.999) * 10))


def v1_label(resp: httpx.Response) -> int:
    assert resp.status_code == 200, resp.text[:300]
    return int(resp.json()["predictions"][0]["top_k"][0]["label"])


# ---- native /v1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_v1_multipart_httpx(server: Running, bundle: Bundle, images: dict[str, CorpusImage],
                            name: str) -> None:
    item = images[name]
    with httpx.Client(base_url=f"http://{server.http}", timeout=60) as client:
        resp = client.post("/v1/models/digits/predict", files={"file": (name, item.data, item.mime)})
    assert v1_label(resp) == right_class(bundle, item)
    pred = resp.json()["predictions"][0]
    assert (pred["width"], pred["height"]) == item.size  # as displayed, in the file's pixels


@pytest.mark.parametrize("name", NAMES)
def test_v1_multipart_curl(server: Running, bundle: Bundle, images: dict[str, CorpusImage],
                           name: str) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    item = images[name]
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-F", f"file=@{item.path};type={item.mime}",
         f"http://{server.http}/v1/models/digits/predict"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200", (out.stdout[:300], out.stderr)
    assert int(json.loads(body)["predictions"][0]["top_k"][0]["label"]) == right_class(bundle, item)


@pytest.mark.parametrize("name", SMALLER)
def test_v1_json_base64_httpx(server: Running, bundle: Bundle, images: dict[str, CorpusImage],
                              name: str) -> None:
    item = images[name]
    with httpx.Client(base_url=f"http://{server.http}", timeout=60) as client:
        resp = client.post("/v1/models/digits/predict",
                           json={"images": [base64.b64encode(item.data).decode()]})
    assert v1_label(resp) == right_class(bundle, item)


# ---- KServe v2 over HTTP (tritonclient.http) ------------------------------------------------------


def _http_infer(server: Running, inp: Any, binary_out: bool) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.http, network_timeout=60.0, connection_timeout=60.0)
    try:
        out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
        result = client.infer("digits", [inp], outputs=[out])
        return result.as_numpy("logits")
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", SMALLER)
def test_v2_tensor(server: Running, bundle: Bundle, images: dict[str, CorpusImage], name: str,
                   binary: bool) -> None:
    item = images[name]
    x = model_input(bundle, item)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    assert int(_http_infer(server, inp, binary).argmax()) == right_class(bundle, item)


@pytest.mark.parametrize("name", NAMES)
def test_v2_bytes_encoded_image(server: Running, bundle: Bundle, images: dict[str, CorpusImage],
                                name: str) -> None:
    item = images[name]
    inp = httpclient.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([item.data], dtype=np.object_), binary_data=True)
    assert int(_http_infer(server, inp, True).argmax()) == right_class(bundle, item)


# ---- KServe v2 over gRPC (tritonclient.grpc) ------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_client(server: Running) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(server.grpc)
    yield client
    client.close()


@pytest.mark.parametrize("name", SMALLER)
def test_grpc_tensor(grpc_client: Any, bundle: Bundle, images: dict[str, CorpusImage], name: str) -> None:
    item = images[name]
    x = model_input(bundle, item)
    inp = grpcclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = grpc_client.infer("digits", [inp], client_timeout=60)
    assert int(result.as_numpy("logits").argmax()) == right_class(bundle, item)


@pytest.mark.parametrize("name", NAMES)
def test_grpc_bytes_encoded_image(grpc_client: Any, bundle: Bundle, images: dict[str, CorpusImage],
                                  name: str) -> None:
    item = images[name]
    inp = grpcclient.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([item.data], dtype=np.object_))
    result = grpc_client.infer("digits", [inp], client_timeout=60)
    assert int(result.as_numpy("logits").argmax()) == right_class(bundle, item)


def test_corpus_spans_what_users_send(images: dict[str, CorpusImage]) -> None:
    sizes = [c.nbytes for c in images.values()]
    assert min(sizes) < 2_000 and 14_000_000 < max(sizes) < 16_500_000
    assert min(c.size[0] * c.size[1] for c in images.values()) == 24 * 24
    assert max(c.size for c in images.values()) == (4000, 3000)
    assert {Path(c.name).suffix for c in images.values()} == {".png", ".jpg", ".webp"}
