"""`kiln serve` in a subprocess: real bundles (ONNX classifier, PyTorch detector), HTTP, metrics, SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec

from .conftest import kiln_serve, wait_ready

torch = pytest.importorskip("torch")


def _classifier(root: Path) -> Bundle:
    from kiln.export.torch2onnx import torch2onnx
    from kiln.models import build_model

    arch = Architecture(name="lenet5", args={"num_classes": 10, "in_channels": 1})
    torch.manual_seed(0)
    root.mkdir(parents=True)
    torch.save(build_model(arch).state_dict(), root / "model.pt")
    bundle = Bundle(root, Manifest(
        kiln_version="0.1.0", task="classify", classes=[str(i) for i in range(10)],
        input=InputSpec(name="images", shape=[1, 28, 28], batch=BatchRange(min=1, opt=8, max=32)),
        outputs=[TensorSpec(name="logits", shape=[10])],
        preprocess=Preprocess(mode="resize", size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
        postprocess={"top_k": 3}, architecture=arch,
    ))
    bundle.add_artifact("model.pt", "torch")
    bundle.save()
    torch2onnx(bundle, root / "model.onnx", batch=BatchRange(min=1, opt=8, max=32), simplify=False)
    bundle.add_artifact("model.onnx", "onnx")
    bundle.save()
    return bundle


def _detector(root: Path) -> Bundle:
    from kiln.models import build_model

    arch = Architecture(name="kiln-det-s", args={"num_classes": 2, "in_channels": 3, "image_size": 64})
    torch.manual_seed(0)
    model = build_model(arch).eval()
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / "model.pt")
    a = model.num_locations
    bundle = Bundle(root, Manifest(
        kiln_version="0.1.0", task="detect", classes=["circle", "square"],
        input=InputSpec(name="images", shape=[3, 64, 64], batch=BatchRange(min=1, opt=4, max=8)),
        outputs=[TensorSpec(name="boxes", shape=[a, 4]), TensorSpec(name="scores", shape=[a, 2])],
        preprocess=Preprocess(mode="letterbox", size=(64, 64), channels="RGB", mean=[0.5] * 3,
                              std=[0.25] * 3),
        # an untrained detector scores around 0.5: a low threshold makes sure boxes come back
        postprocess={"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": 5}, architecture=arch,
    ))
    bundle.add_artifact("model.pt", "torch")
    bundle.save()
    return bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    return _classifier(root / "digits").root, _detector(root / "shapes").root


@pytest.fixture
def server(bundles: tuple[Path, Path]) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_MAX_DELAY_MS": "2"}
    cmd = [sys.executable, "-m", "kiln.cli", "serve", str(bundles[0]), str(bundles[1]), "--name", "digits",
           "--name", "shapes", "--port", "0"]
    with kiln_serve(cmd, env) as running:
        yield running


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_serve_end_to_end(server: tuple[subprocess.Popen[str], str, list[str]]) -> None:
    proc, url, lines = server
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, proc, lines, 60)  # the socket is bound before uvicorn starts listening on it

        info = client.get("/v1/models/digits").json()
        assert (info["backend"], info["precision"]) == ("onnxrt", "fp32")
        assert client.get("/v1/models/shapes").json()["backend"] == "torch"

        digit = _png(Image.new("L", (64, 64), 0).rotate(0))
        resp = client.post("/v1/models/digits/predict", files=[("file", ("a.png", digit, "image/png"))] * 2)
        assert resp.status_code == 200, resp.text
        preds = resp.json()["predictions"]
        assert len(preds) == 2 and len(preds[0]["top_k"]) == 3
        assert preds[0]["top_k"] == preds[1]["top_k"]
        resp = client.post("/v1/models/digits/predict", json={"images": [base64.b64encode(digit).decode()]})
        assert resp.json()["predictions"][0]["top_k"] == preds[0]["top_k"]

        photo = _png(Image.effect_noise((160, 96), 60).convert("RGB"))
        resp = client.post("/v1/models/shapes/predict", files={"file": ("p.png", photo, "image/png")})
        assert resp.status_code == 200, resp.text
        det = resp.json()["predictions"][0]
        assert (det["width"], det["height"]) == (160, 96)
        assert 0 < len(det["boxes"]) <= 5
        for d in det["boxes"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 96
            assert d["label"] in ("circle", "square")

        v2 = client.post("/v2/models/digits/infer", json={"inputs": [
            {"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]})
        assert v2.status_code == 200 and v2.json()["outputs"][0]["shape"] == [1, 10]

        metrics = client.get("/metrics").text
        assert ('kiln_request_duration_seconds_count{model="digits",route="/v1/models/{name}/predict",'
                'status="200"} 2.0' in metrics)
        assert 'kiln_backend_info{backend="onnxrt",device="cpu"' in metrics
        assert re.search(r'kiln_batch_size_sum\{model="shapes"\} [1-9]', metrics)

        # SIGTERM while requests are in flight: each one that was accepted is answered, then exit 0
        statuses: list[int | str] = []

        def send() -> None:
            try:
                statuses.append(client.post("/v1/models/shapes/predict",
                                            files={"file": ("p.png", photo, "image/png")}).status_code)
            except httpx.TransportError as exc:  # sent after the listener closed
                statuses.append(type(exc).__name__)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        # Signal once the server has answered one of them (however loaded the machine, at least one
        # was accepted), while the others are still in flight or queued.
        end = time.monotonic() + 30
        while not statuses and time.monotonic() < end:
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
    assert proc.wait(30) == 0, "".join(lines)
    assert not [s for s in statuses if isinstance(s, int) and s >= 500], statuses
    assert any(s == 200 for s in statuses), statuses
    assert any("worker stopped" in line for line in lines)


def test_bad_bundle_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kiln serve: error: bundle folder not found: {tmp_path / 'nope'}"]
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "kiln.json is missing" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "empty"), "--name", "a", "--name", "b"]) == 2
    assert "one per bundle" in capsys.readouterr().err


def test_photo_uploads_with_curl_are_answered(server: tuple[subprocess.Popen[str], str, list[str]],
                                              tmp_path: Path) -> None:
    """curl -F file=@photo as a user sends it: scikit-learn's sample photos (427x640) as a PNG of several
    hundred KB and a JPEG, both far over the 64 KiB head limit, through kiln serve's own server."""
    from sklearn.datasets import load_sample_images

    proc, url, lines = server
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, proc, lines, 60)
    china = Image.fromarray(load_sample_images().images[0])
    files = {"photo.png": tmp_path / "photo.png", "photo.jpg": tmp_path / "photo.jpg"}
    china.save(files["photo.png"])
    china.save(files["photo.jpg"], quality=95)
    assert all(p.stat().st_size > 100_000 for p in files.values())
    for model in ("digits", "shapes"):
        for path in files.values():
            out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-F", f"file=@{path}",
                                  f"{url}/v1/models/{model}/predict"], capture_output=True, text=True,
                                  timeout=60)
            body, _, code = out.stdout.rpartition("\n")
            assert code == "200", (path.name, model, out.stdout[-500:], out.stderr)
            pred = json.loads(body)["predictions"][0]
            assert (pred["width"], pred["height"]) == (640, 427)
