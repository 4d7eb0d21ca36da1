"""``kiln serve --grpc-port``: ``inference.GRPCInferenceService`` driven by ``tritonclient.grpc`` (and
the raw stub for requests tritonclient will not build), against onnxruntime on the bundle's model.onnx."""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import Bundle
from kiln.serve.settings import Settings

from .conftest import FakeBackend, make_bundle
from .triton_server import Running, onnx_bundles, ort_outputs, serve

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

__all__ = ["onnx_bundles"]  # a fixture, used by name


@pytest.fixture(scope="module")
def server(onnx_bundles: dict[str, Bundle]) -> Iterator[Running]:
    settings = Settings(backend="onnxrt", grpc_port=0, max_delay_ms=1, max_body_bytes=1 << 20)
    with serve(list(onnx_bundles.items()), settings) as running:
        yield running


@pytest.fixture
def client(server: Running) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc)
    yield c
    c.close()


def _x(n: int, shape: list[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _input(x: np.ndarray, name: str = "images", datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _status(call: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    return str(info.value.status()), str(info.value)


def test_health_metadata_config_stats_index(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("shapes", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "kiln" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("shapes", as_json=True)
    assert [o["name"] for o in model["outputs"]] == ["boxes", "scores"] and model["versions"] == ["1"]
    config = client.get_model_config("digits", "1").config
    assert (config.name, config.platform, config.max_batch_size) == ("digits", "onnxruntime_onnx", 16)
    assert list(config.input[0].dims) == [1, 28, 28]
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["state"]) for m in index} == {("digits", "READY"), ("shapes", "READY")}
    client.infer("digits", [_input(_x(2, [1, 28, 28]))])
    stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
    assert any(int(b["batch_size"]) == 2 for b in stats["batch_stats"])


@pytest.mark.parametrize("version", ["", "1"])
def test_infer_matches_onnxruntime(client: grpcclient.InferenceServerClient, onnx_bundles: dict[str, Bundle],
                                   version: str) -> None:
    x = _x(3, [1, 28, 28])
    result = client.infer("digits", [_input(x)], model_version=version, request_id="g-1",
                          outputs=[grpcclient.InferRequestedOutput("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), ort_outputs(onnx_bundles["digits"], x)["logits"],
                               atol=1e-5, rtol=0)
    assert result.get_response().id == "g-1" and result.get_response().model_version == "1"
    d = _x(2, [3, 64, 64], seed=2)
    det = client.infer("shapes", [_input(d)], model_version=version)
    want = ort_outputs(onnx_bundles["shapes"], d)
    for name in ("boxes", "scores"):
        np.testing.assert_allclose(det.as_numpy(name), want[name], atol=1e-5, rtol=0)


def test_async_infer(client: grpcclient.InferenceServerClient, onnx_bundles: dict[str, Bundle]) -> None:
    done: queue.Queue[tuple[object, object]] = queue.Queue()
    xs = [_x(1, [1, 28, 28], seed=s) for s in range(3)]
    for x in xs:
        client.async_infer("digits", [_input(x)], callback=lambda result, error: done.put((result, error)))
    results = [done.get(timeout=30) for _ in xs]
    assert all(error is None for _, error in results)
    got = sorted(r.as_numpy("logits")[0].tolist() for r, _ in results)  # type: ignore[attr-defined]
    want = sorted(ort_outputs(onnx_bundles["digits"], x)["logits"][0].tolist() for x in xs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_errors(client: grpcclient.InferenceServerClient, server: Running) -> None:
    x = _x(1, [1, 28, 28])
    code, text = _status(lambda: client.infer("nope", [_input(x)]))
    assert code == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in text
    assert _status(lambda: client.get_model_metadata("digits", "3"))[0] == "StatusCode.NOT_FOUND"
    for bad, name in [(_input(x, name="pixels"), "pixels"), (_input(_x(1, [1, 28, 27])), "images"),
                      (_input(x.astype(np.float64), datatype="FP64"), "images")]:
        code, text = _status(lambda bad=bad: client.infer("digits", [bad]))
        assert code == "StatusCode.INVALID_ARGUMENT" and f"Input tensor: {name}" in text, text
    code, _ = _status(lambda: client.infer("digits", [_input(_x(400, [1, 28, 28]))]))  # 1.25 MB > 1 MiB limit
    assert code == "StatusCode.RESOURCE_EXHAUSTED"

    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="FP32",
                                                                shape=[1, 1, 28, 28])
        for raw, text in [([x.tobytes(), x.tobytes()], "raw_input_contents holds 2"),
                          ([x.tobytes()[:100]], "images")]:
            request = service_pb2.ModelInferRequest(model_name="digits", inputs=[tensor],
                                                    raw_input_contents=raw)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details()
        typed = service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="FP32",
                                                               shape=[1, 1, 28, 28])
        typed.contents.fp32_contents.extend([0.0] * 784)
        ok = stub.ModelInfer(service_pb2.ModelInferRequest(model_name="digits", inputs=[typed]), timeout=30)
        assert list(ok.outputs[0].shape) == [1, 10] and len(ok.raw_output_contents[0]) == 40


def _fake_models(tmp_path: Path) -> tuple[list[tuple[str, Bundle]], list[FakeBackend],
                                          Callable[..., FakeBackend]]:
    """One fake-backend model and the backends its loader built (to slow them down from the test)."""
    backends: list[FakeBackend] = []

    def loader(bundle: Bundle, settings: Settings) -> FakeBackend:
        backends.append(FakeBackend(bundle))
        return backends[-1]

    return [("digits", make_bundle(tmp_path / "digits"))], backends, loader


def test_api_key(tmp_path: Path) -> None:
    models, _, loader = _fake_models(tmp_path)
    with serve(models, Settings(grpc_port=0, api_key="s3cret"), loader) as running:
        c = grpcclient.InferenceServerClient(running.grpc)
        assert c.is_server_live() and c.is_server_ready()  # server health stays open
        code, text = _status(lambda: c.is_model_ready("digits"))  # per-model readiness names a model
        assert code == "StatusCode.UNAUTHENTICATED" and "digits" not in text
        assert c.is_model_ready("digits", headers={"authorization": "Bearer s3cret"})
        x = np.zeros((1, 1, 28, 28), np.float32)
        code, text = _status(lambda: c.infer("digits", [_input(x)]))
        assert code == "StatusCode.UNAUTHENTICATED" and "missing API key" in text
        code, _ = _status(lambda: c.get_model_config("digits", headers={"authorization": "Bearer wrong"}))
        assert code == "StatusCode.UNAUTHENTICATED"
        result = c.infer("digits", [_input(x)], headers={"authorization": "Bearer s3cret"})
        assert result.as_numpy("logits").shape == (1, 10)
        c.close()


def test_client_cancel_logs_nothing_and_frees_the_worker(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    models, backends, loader = _fake_models(tmp_path)
    with serve(models, Settings(grpc_port=0), loader) as running:
        c = grpcclient.InferenceServerClient(running.grpc)
        x = np.zeros((1, 1, 28, 28), np.float32)
        backends[0].delay = 0.5
        with caplog.at_level(logging.WARNING):
            code, _ = _status(lambda: c.infer("digits", [_input(x)], client_timeout=0.1))
            assert code == "StatusCode.DEADLINE_EXCEEDED"
            backends[0].delay = 0.0
            assert c.infer("digits", [_input(x)], client_timeout=10).as_numpy("logits").shape == (1, 10)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        c.close()
