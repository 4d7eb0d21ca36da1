"""Element counts, byte sizes and nesting depth are checked against the declared shape and the settings
before anything is materialised, through the server ``kiln serve`` runs (its protocol class, middleware
and settings, in a real process, gRPC included): a flood of values or of empty BYTES elements is
refused at once with a 4xx naming the tensor, the process's peak memory does not grow by what the flood
would have built, and a concurrent /healthz keeps answering.

Each flood used to be converted value by value into Python objects first: 5M JSON values (about 160 MB
of floats and list), 5M empty BYTES elements (a 40 MB list and object array, seconds of a frozen event
loop), 5M ``fp32_contents`` values."""

from __future__ import annotations

import json
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from tests.polling import eventually

from .live_server import Live, serve_fixture  # noqa: F401 (a fixture)

grpc = pytest.importorskip("grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

MB = 1 << 20
# The test model's input: [N, 1, 28, 28] FP32, at most 64 items (max_images_per_request).
SHAPE = [1, 1, 28, 28]
# What the floods below would build as Python objects is well above this; what a refusal before the
# work costs (the body itself, read once, and its copies in the stack) stays below it.
PEAK_GROWTH_LIMIT = 100 * MB
# /healthz answers within milliseconds on an idle loop; the floods stalled it for seconds. The bound is
# loose so that a loaded machine does not fail it; the measured figure is printed.
HEALTHZ_LIMIT_S = 1.0


@dataclass
class Probe:
    """/healthz latencies measured from a thread while an attack runs."""

    url: str
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                assert c.get(self.url + "/healthz").status_code == 200
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)


@contextmanager
def watched(live: Live, peak_limit: int = PEAK_GROWTH_LIMIT) -> Iterator[Probe]:
    """Polls /healthz during the block; afterwards checks the worst latency and the peak memory growth."""
    probe = Probe(live.url)
    peak = live.status("VmHWM")
    thread = threading.Thread(target=probe.run, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not probe.latencies:  # the prober is connected and measuring before the attack starts
        assert time.monotonic() < end
        time.sleep(0.01)
    try:
        yield probe
    finally:
        probed = len(probe.latencies)
        # one more probe after the answer
        assert eventually(lambda: len(probe.latencies) > probed, timeout=30)
        probe.stop.set()
        thread.join(30)
    growth = live.status("VmHWM") - peak
    worst = max(probe.latencies)
    print(f"/healthz worst {worst * 1000:.1f} ms over {len(probe.latencies)} probes; peak RSS "
          f"+{growth / MB:.1f} MB")
    assert worst < HEALTHZ_LIMIT_S, probe.latencies
    assert growth < peak_limit, f"peak RSS grew by {growth / MB:.0f} MB"
    assert "Traceback" not in live.log(), live.log()


def v2_json(data_text: str, shape: list[int] = SHAPE, datatype: str = "FP32") -> bytes:
    return (f'{{"inputs": [{{"name": "images", "shape": {json.dumps(shape)}, "datatype": "{datatype}", '
            f'"data": [{data_text}]}}]}}').encode()


def test_json_flood_is_refused_before_parsing(serve: Callable[..., Live]) -> None:
    live = serve()
    body = v2_json(",".join(["0.5"] * 5_000_000))  # 20 MB: 5M values for a 784-value input
    with watched(live):
        resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert set(resp.json()) == {"error"} and "values" in resp.json()["error"]


def test_json_data_longer_than_its_shape_is_refused_before_conversion(serve: Callable[..., Live]) -> None:
    live = serve()
    # 40,000 values fit the request limit (64 items of 784) but not the declared shape [1, 1, 28, 28]
    resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=v2_json(",".join(["0.5"] * 40_000)))
    assert resp.status_code == 400
    assert (
        resp.json()["error"]
        == "Input tensor: images | received more than 784 values | expected 784 for shape [1, 1, 28, 28]"
    )
    good = httpx.post(f"{live.url}/v2/models/digits/infer", content=v2_json(",".join(["0.5"] * 784)))
    assert good.status_code == 200, good.text


@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/v2/repository/index"])
@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_deeply_nested_json_is_400_in_the_v2_shape(serve: Callable[..., Live], path: str, depth: int) -> None:
    live = serve()
    resp = httpx.post(live.url + path, content=b"[" * depth + b"]" * depth)
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"error": "the JSON request is nested more than 32 levels deep"}
    nested = v2_json("[" * 40 + "0.5" + "]" * 40)  # within an otherwise valid request
    resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=nested)
    assert resp.status_code == 400 and "nested" in resp.json()["error"], resp.text
    assert "Traceback" not in live.log() and "ERROR" not in live.log(), live.log()


def empty_bytes_elements(total: int) -> bytes:
    """``total`` bytes of 4-byte zero length prefixes: total / 4 empty BYTES elements."""
    return bytes(total)


def test_binary_bytes_flood_is_refused_at_the_first_extra_element(serve: Callable[..., Live]) -> None:
    live = serve()
    raw = empty_bytes_elements(20_000_000)  # shape [1]: one element declared, 5M sent
    header = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    with watched(live):
        resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=header + raw, timeout=60,
                          headers={"Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"error": "Input tensor: images | received more than 1 BYTES elements | expected 1 "
                                    "for shape [1]"}


def grpc_server(serve: Callable[..., Live]) -> tuple[Live, str]:
    live = serve(KILN_GRPC_PORT="0")
    end = time.monotonic() + 30
    while not (m := re.search(r"serving gRPC \(KServe v2\) on ([\d.]+:\d+)", live.log())):
        assert time.monotonic() < end, live.log()
        time.sleep(0.05)
    return live, m.group(1)


def grpc_infer(target: str, request: service_pb2.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * MB)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_grpc_raw_bytes_flood_is_refused_at_the_first_extra_element(serve: Callable[..., Live]) -> None:
    live, target = grpc_server(serve)
    request = service_pb2.ModelInferRequest(model_name="digits", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])])
    request.raw_input_contents.append(empty_bytes_elements(20_000_000))
    # grpcio holds a 20 MB message while it is received; what must not happen is memory kept per refused
    # request, adding up over ten of them, or kept by the allocator once they are answered.
    resident = live.status("VmRSS")
    with watched(live, peak_limit=160 * MB):
        for _ in range(10):
            code, details = grpc_infer(target, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    kept = live.status("VmRSS") - resident
    print(f"resident set after the floods: +{kept / MB:.1f} MB")
    assert kept < 60 * MB, f"{kept / MB:.0f} MB kept after the refused requests"
    assert details == "Input tensor: images | received more than 1 BYTES elements | expected 1 for shape [1]"


def test_grpc_typed_contents_flood_is_refused_before_conversion(serve: Callable[..., Live]) -> None:
    live, target = grpc_server(serve)
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=SHAPE)
    tensor.contents.fp32_contents.extend(np.full(5_000_000, 0.5, np.float32))  # 5M values for 784
    request = service_pb2.ModelInferRequest(model_name="digits", inputs=[tensor])
    with watched(live):
        code, details = grpc_infer(target, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert (
        details
        == "Input tensor: images | received more than 784 values | expected 784 for shape [1, 1, 28, 28]"
    )
    # the same request with the declared number of values is answered
    good = service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=SHAPE)
    good.contents.fp32_contents.extend(np.full(784, 0.5, np.float32))
    assert (
        grpc_infer(target, service_pb2.ModelInferRequest(model_name="digits", inputs=[good]))[0]
        == grpc.StatusCode.OK
    )


def test_bytes_elements_are_read_up_to_the_declared_count() -> None:
    from kiln.errors import InputError
    from kiln.serve.v2_tensors import deserialize_bytes

    two = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0)
    assert deserialize_bytes("x", two, 2, [2]).tolist() == [b"abc", b""]
    with pytest.raises(InputError, match=r"received 2 BYTES elements \| expected 3"):
        deserialize_bytes("x", two, 3, [3])
    with pytest.raises(InputError, match="received more than 1 BYTES elements"):
        deserialize_bytes("x", two, 1, [1])
