"""The server's OpenAPI description generates a working client: ``openapi-python-client`` (a generator
nobody here wrote) writes a package from /openapi.json of a live server, which imports and calls native /v1
predict, KServe V1 :predict and v2 infer against that server."""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
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
from kiln.serve.settings import Settings

from .triton_server import Running, onnx_bundles, ort_outputs, serve

pytest.importorskip("openapi_python_client")

__all__ = ["onnx_bundles"]  # a fixture, used by name


@pytest.fixture(scope="module")
def server(onnx_bundles: dict[str, Bundle]) -> Iterator[Running]:
    with serve([("digits", onnx_bundles["digits"])], Settings(backend="onnxrt", max_delay_ms=1)) as running:
        yield running


@pytest.fixture(scope="module")
def generated(server: Running, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The client package generated from the live server's /openapi.json, imported."""
    root = tmp_path_factory.mktemp("openapi-client")
    spec = root / "openapi.json"
    spec.write_text(httpx.get(f"http://{server.http}/openapi.json", timeout=30).text)
    out = root / "client"
    cmd = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec), "--output-path",
           str(out),
           "--meta", "none"]
    # The generator formats what it writes with ruff, found on PATH: this environment's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr  # no operation was skipped
    sys.path.insert(0, str(root))
    try:
        package = importlib.import_module(out.name)
        yield package
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == out.name or m.startswith(out.name + ".")]:
            del sys.modules[name]


def _operation(package: Any, tag: str, name: str) -> Any:
    """The generated module of an operation (named after FastAPI's operation id), under its tag."""
    return importlib.import_module(f"{package.__name__}.api.{tag}.{name}")


def _model(models: Any, operation: str, schema: str) -> Any:
    """The generated class of a request body declared inline: named after its operation and its schema."""
    (cls,) = [c for n, c in vars(models).items() if n.startswith(operation) and n.endswith(schema)]
    return cls


def _every_module_imports(package: Any) -> None:
    for path in sorted(Path(package.__file__).parent.rglob("*.py")):
        rel = path.relative_to(Path(package.__file__).parent.parent).with_suffix("")
        importlib.import_module(".".join(p for p in rel.parts if p != "__init__"))


def test_generated_client_calls_v1_kserve_v1_and_v2(generated: Any, server: Running,
                                                    onnx_bundles: dict[str, Bundle]) -> None:
    _every_module_imports(generated)
    client = generated.Client(base_url=f"http://{server.http}", timeout=httpx.Timeout(30))
    models = importlib.import_module(f"{generated.__name__}.models")

    buf = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    predict = _operation(generated, "v1", "predict_v1_models_name_predict_post")
    answer = predict.sync_detailed(name="digits", client=client,
                                   body=_model(models, "PredictV1", "PredictRequest")(images=[png]))
    assert answer.status_code == 200, answer.content
    assert json.loads(answer.content)["predictions"][0]["width"] == 28

    kserve = _operation(generated, "kserve_v1", "kserve_predict_v1_models_name_predict_post")
    body = _model(models, "KservePredict", "V1PredictRequest").from_dict({"instances": [{"b64": png}]})
    answer = kserve.sync_detailed(name="digits", client=client, body=body)
    assert answer.status_code == 200, answer.content
    assert len(json.loads(answer.content)["predictions"]) == 1

    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    infer = _operation(generated, "v2", "v2_infer_v2_models_name_infer_post")
    body = _model(models, "V2InferV2ModelsNameInferPost", "InferenceRequest").from_dict({"inputs": [
        {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})
    answer = infer.sync_detailed(name="digits", client=client, body=body)
    assert answer.status_code == 200, answer.content
    parsed = answer.parsed
    assert parsed is not None and parsed.outputs[0].name == "logits"
    logits = np.asarray(parsed.outputs[0].data, np.float32).reshape(parsed.outputs[0].shape)
    np.testing.assert_allclose(logits, ort_outputs(onnx_bundles["digits"], x)["logits"], atol=1e-5)


def test_openapi_declares_the_v2_binary_header(server: Running) -> None:
    spec = httpx.get(f"http://{server.http}/openapi.json", timeout=30).json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert list(infer["requestBody"]["content"]) == ["application/json"]
    header = [p for p in infer["parameters"] if p["in"] == "header"]
    assert [p["name"] for p in header] == ["Inference-Header-Content-Length"]
    assert "Inference-Header-Content-Length" in infer["responses"]["200"]["headers"]
