"""Request bodies sent with ``Content-Encoding: gzip`` or ``deflate`` (tritonclient's
``request_compression_algorithm``) are decoded within the body limit, which applies to the decoded size
too: a zip bomb is refused with 413 after inflating at most the limit, a corrupt or truncated body is
400, any other encoding 415 naming the supported ones; through the server ``kiln serve`` runs."""

from __future__ import annotations

import gzip
import io
import time
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from .live_server import Live, start_live, stop_live

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MB = 1 << 20


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One server for the module: every test here sends requests it answers without keeping state."""
    running = start_live(tmp_path_factory.mktemp("compression"), KILN_MAX_BODY_BYTES=str(2 * MB))
    yield running
    stop_live(running)


@pytest.fixture
def client(live: Live) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(f"{live.host}:{live.port}")
    yield c
    c.close()


def brightness(level: float, n: int = 1) -> np.ndarray:
    """Inputs the test backend classifies by mean brightness: (level + 1) / 2 in tenths."""
    return np.full((n, 1, 28, 28), level, np.float32)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_compressed_requests_are_answered(client: httpclient.InferenceServerClient,
                                                       algorithm: str,
                                                       binary: bool) -> None:
    x = np.concatenate([brightness(-0.9), brightness(0.5), brightness(0.9)])  # classes 0, 7 and 9
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("digits", [inp], request_compression_algorithm=algorithm)
    assert result.as_numpy("logits").argmax(axis=1).tolist() == [0, 7, 9]


def test_compressed_multipart_upload_is_answered(live: Live) -> None:
    buf = io.BytesIO()
    Image.new("L", (640, 480), 250).save(buf, format="PNG")
    boundary = "kilngzip"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    resp = httpx.post(f"{live.url}/v1/models/digits/predict", content=gzip.compress(body),
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                               "Content-Encoding": "gzip"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["top_k"][0]["label"] == "9"


def test_zip_bomb_is_413_after_inflating_at_most_the_limit(live: Live,
                                                           client: httpclient.InferenceServerClient) -> None:
    bomb = zlib.compress(bytes(1 << 30), 9)  # 1 GiB of zeros in about 1 MB... of a 2 MiB limit
    assert len(bomb) < 2 * MB
    peak = live.status("VmHWM")
    t0 = time.perf_counter()
    resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=bomb,
                      headers={"Content-Encoding": "deflate"},
                      timeout=60)
    elapsed = time.perf_counter() - t0
    assert resp.status_code == 413, resp.text
    assert resp.json() == {"error": f"request body decoded from deflate is over the limit of {2 * MB} bytes"}
    growth = live.status("VmHWM") - peak
    print(f"zip bomb refused in {elapsed * 1000:.0f} ms, peak RSS +{growth / MB:.1f} MB")
    assert growth < 64 * MB  # a gigabyte was never inflated
    # tritonclient reports it as a message, the server keeps serving
    big = httpclient.InferInput("images", [1], "BYTES")
    big.set_data_from_numpy(np.array([bytes(3 * MB)], dtype=object))  # 3 MB that gzip makes 3 KB
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [big], request_compression_algorithm="gzip")
    assert info.value.status() == "413" and "decoded from gzip" in info.value.message()
    assert client.is_server_live()


@pytest.mark.parametrize("body,needle", [
    (b"not gzip at all", "corrupt"),
    (gzip.compress(b'{"inputs": []}')[:-6], "ends before its compressed data does"),
    (gzip.compress(b"{}") + b"trailing", "data follows the end"),
])
def test_corrupt_compressed_body_is_400(live: Live, body: bytes, needle: str) -> None:
    resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=body,
                      headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 400 and needle in resp.json()["error"], resp.text
    assert "Traceback" not in live.log()


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_other_encodings_are_415_naming_the_supported_ones(live: Live, encoding: str) -> None:
    resp = httpx.post(f"{live.url}/v1/models/digits/predict", content=b"x",
                      headers={"Content-Encoding": encoding})
    assert resp.status_code == 415
    assert "send gzip, deflate or identity" in resp.json()["error"]["message"]
