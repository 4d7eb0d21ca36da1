"""Protocol details through the server ``kiln serve`` runs (HTTP and gRPC in one process):
tritonclient's ``class_count`` is answered the same way on both protocols; methods kiln does not
implement answer UNIMPLEMENTED without an error log; paths match exactly; with an API key, no answer
names a served model to a caller without it; /metrics records the status the client received."""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from kiln.serve.registry import Registry
from kiln.serve.settings import Settings
from tests.polling import eventually

from .conftest import FakeBackend, make_bundle
from .live_server import Live, raw_request, serve_fixture, status_of  # noqa: F401 (a fixture)
from .test_limits_before_work import grpc_server

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "s3cret"
CLASS_COUNT_REFUSAL = ("Output tensor: logits | parameter 'classification' (class_count) | not supported: "
                       "ask for "
                       "the tensor, or use /v1/models/{model}/predict for labels")


def zeros(module: object) -> object:
    inp = module.InferInput("images", [1, 1, 28, 28], "FP32")  # type: ignore[attr-defined]
    inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    return inp


def test_class_count_is_refused_alike_over_grpc_and_http(serve: Callable[..., Live]) -> None:
    live, target = grpc_server(serve)
    g = grpcclient.InferenceServerClient(target)
    h = httpclient.InferenceServerClient(f"{live.host}:{live.port}")
    with pytest.raises(InferenceServerException) as over_grpc:
        g.infer("digits", [zeros(grpcclient)],
                outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    assert over_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as over_http:
        h.infer("digits", [zeros(httpclient)],
                outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
    assert over_http.value.status() == "400"
    assert over_grpc.value.message() == over_http.value.message() == CLASS_COUNT_REFUSAL
    # without class_count both answer the tensor
    logits = g.infer("digits", [zeros(grpcclient)], outputs=[grpcclient.InferRequestedOutput("logits")])
    assert logits.as_numpy("logits").shape == (1, 10)


def test_unimplemented_methods_answer_unimplemented_quietly(serve: Callable[..., Live]) -> None:
    live, target = grpc_server(serve)
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for call, request in [(stub.RepositoryModelLoad,
                               service_pb2.RepositoryModelLoadRequest(model_name="digits")),
                              (stub.SystemSharedMemoryStatus, service_pb2.SystemSharedMemoryStatusRequest()),
                              (stub.CudaSharedMemoryRegister, service_pb2.CudaSharedMemoryRegisterRequest()),
                              (stub.LogSettings, service_pb2.LogSettingsRequest())]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert grpcclient.InferenceServerClient(target).is_server_live()
    assert "ERROR" not in live.log() and "Traceback" not in live.log(), live.log()


def brightness(level: float) -> object:
    inp = grpcclient.InferInput("images", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(np.full((1, 1, 28, 28), level, np.float32))
    return inp


def test_stream_infer_answers_each_request_by_id_with_the_unary_limits(serve: Callable[..., Live]) -> None:
    live, target = grpc_server_with_key(serve)
    client = grpcclient.InferenceServerClient(target)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)),
                        headers={"authorization": f"Bearer {KEY}"})
    levels = {"dark": -0.9, "mid": 0.5, "bright": 0.9}  # classes 0, 7, 9 for the test backend
    for rid, level in levels.items():
        client.async_stream_infer("digits", [brightness(level)], request_id=rid)
    flood = grpcclient.InferInput("images", [5000, 1, 28, 28], "FP32")
    flood.set_data_from_numpy(np.zeros((5000, 1, 28, 28), np.float32))  # 15 MB: refused from its shape
    client.async_stream_infer("digits", [flood], request_id="flood")
    client.async_stream_infer("digits", [brightness(0.5)], request_id="after")  # the stream goes on
    results, errors = {}, []
    for _ in range(5):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = int(result.as_numpy("logits").argmax())  # type: ignore[attr-defined]
    client.stop_stream()
    assert results == {"dark": 0, "mid": 7, "bright": 9, "after": 7}
    assert [e.message() for e in errors] == [  # type: ignore[attr-defined]
        "Input tensor: images | received batch 5000 | expected at most 64 items"]
    # without the key the stream is refused
    stranger = grpcclient.InferenceServerClient(target)
    stranger.start_stream(callback=lambda result, error: answers.put((result, error)))
    # The refusal may close the stream before this request is written: the callback gets it either way.
    with contextlib.suppress(InferenceServerException):
        stranger.async_stream_infer("digits", [brightness(0.0)])
    _, error = answers.get(timeout=30)
    stranger.stop_stream()
    assert isinstance(error, InferenceServerException) and "missing API key" in str(error)
    assert "ERROR" not in live.log() and "Traceback" not in live.log(), live.log()


@pytest.mark.parametrize("path",
                         ["/v1/models/digits/predict%0a", "/v1/models/digits/predict%0A", "/healthz%0a",
                                  "/v2/models/digits/infer%0a", "/v1/models%0d"])
def test_paths_match_exactly(serve: Callable[..., Live], path: str) -> None:
    live = serve()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    answer, _ = raw_request(live, head.encode())
    assert status_of(answer) == 404, answer
    assert status_of(raw_request(live, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0]) == 200


def test_no_model_name_without_the_key(serve: Callable[..., Live]) -> None:
    live, target = grpc_server_with_key(serve)
    stranger = httpx.get(f"{live.url}/readyz")
    assert stranger.status_code == 200 and "digits" not in stranger.text
    member = httpx.get(f"{live.url}/readyz", headers={"Authorization": f"Bearer {KEY}"})
    assert member.json()["models"] == {"digits": "ready"}
    for path in ("/v2/models/digits/ready", "/v2/models/nope/ready", "/v2/models/digits/versions/1/ready"):
        resp = httpx.get(live.url + path)
        assert resp.status_code == 401 and "digits" not in resp.text, (path, resp.text)
    assert (
        httpx.get(
            f"{live.url}/v2/models/digits/ready", headers={"Authorization": f"Bearer {KEY}"}
        ).status_code
        == 200
    )
    client = grpcclient.InferenceServerClient(target)
    assert client.is_server_ready()
    for name in ("digits", "nope"):
        with pytest.raises(InferenceServerException) as info:
            client.is_model_ready(name)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED" and "digits" not in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("nope", headers={"authorization": f"Bearer {KEY}"})
    assert "served: digits" in info.value.message()  # a key holder learns what is served


def grpc_server_with_key(serve: Callable[..., Live]) -> tuple[Live, str]:
    return grpc_server(lambda **env: serve(KILN_API_KEY=KEY, **env))


def test_readiness_reasons_without_names(tmp_path: Path) -> None:
    registry = Registry.build([("digits", make_bundle(tmp_path / "d"))], Settings(),
                              lambda b, _s: FakeBackend(b))
    assert registry.not_ready_reason() == "loading: digits"
    assert registry.not_ready_reason(names=False) == "1 model(s) loading"


def test_metrics_record_the_gate_refusals_as_sent(serve: Callable[..., Live]) -> None:
    live = serve(KILN_API_KEY=KEY, KILN_MAX_BODY_BYTES="1000")
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{live.url}/v2/models/digits/infer", content=b"{}").status_code == 401
    assert (
        httpx.post(f"{live.url}/v2/models/digits/infer", content=b"x" * 2000, headers=auth).status_code == 413
    )
    assert httpx.post(f"{live.url}/v2/models/digits/infer", content=b"x",
                      headers={**auth, "Content-Encoding": "br"}
                      ).status_code == 415
    metrics = ""

    def counts() -> dict[str, float]:  # recorded once each answer is sent: polled, not waited for
        nonlocal metrics
        metrics = httpx.get(f"{live.url}/metrics", headers=auth).text
        return {
            line.split("status=")[1].split('"')[1]: float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("kiln_request_duration_seconds_count")
            and "readyz" not in line
            and "metrics" not in line
        }

    assert eventually(lambda: counts() == {"401": 1.0, "413": 1.0, "415": 1.0}, timeout=30,
                      interval=0.05), metrics
