"""`kiln serve --workers 2` in a subprocess: both workers answer on one port, /readyz and /metrics speak
for all of them, and SIGTERM of the parent drains every worker and exits 0."""

from __future__ import annotations

import base64
import io
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
import numpy as np
import pytest
from PIL import Image

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from tests.polling import eventually

from .conftest import kiln_serve, wait_ready

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _linear_bundle(root: Path) -> Bundle:
    """A 784 -> 10 linear classifier as ONNX (no torch needed): enough to run real ONNX Runtime workers."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w")],
    )
    root.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, root / "model.onnx")
    bundle = Bundle(root, Manifest(
        kiln_version="0.1.0", task="classify", classes=[str(i) for i in range(10)],
        input=InputSpec(name="images", shape=[1, 28, 28], batch=BatchRange(min=1, opt=8, max=32)),
        outputs=[TensorSpec(name="logits", shape=[10])],
        preprocess=Preprocess(mode="resize", size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
        postprocess={"top_k": 3}, architecture=Architecture(name="lenet5", args={"num_classes": 10}),
    ))
    bundle.add_artifact("model.onnx", "onnx")
    bundle.save()
    return bundle


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    bundle = _linear_bundle(tmp_path / "digits")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "kiln.cli", "serve", str(bundle.root), "--name", "digits", "--port", "0",
           "--backend", "onnxrt", "--workers", "2", "--drain-s", "1"]
    with kiln_serve(cmd, env) as running:
        yield running


def _body() -> dict[str, list[str]]:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 200).save(buf, format="PNG")
    return {"images": [base64.b64encode(buf.getvalue()).decode()]}


def post_until(url: str, statuses: list[int | str], stop: threading.Event, stop_on_error: bool) -> None:
    """Post a digit prediction on a new connection each time until ``stop``; record each status, or the
    name of the transport error (ending there if ``stop_on_error``)."""
    with httpx.Client(base_url=url, timeout=30, headers={"Connection": "close"}) as c:
        while not stop.is_set():
            try:
                statuses.append(c.post("/v1/models/digits/predict", json=_body()).status_code)
            except httpx.TransportError as exc:
                statuses.append(type(exc).__name__)
                if stop_on_error:
                    return


def test_two_workers_share_the_port_metrics_and_shutdown(server: tuple[subprocess.Popen[str], str,
                                                                       list[str]]) -> None:
    proc, url, lines = server
    end = time.monotonic() + 90  # the whole test's deadline
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, proc, lines, 90)  # ready only once both workers have loaded their model

    # Each new connection is accepted by whichever worker gets to it first: both answer in time.
    pids: set[str] = set()
    sent = 0
    while len(pids) < 2:
        assert time.monotonic() < end, f"only workers {pids} answered:\n" + "".join(lines)
        with httpx.Client(base_url=url, timeout=30) as fresh:
            resp = fresh.post("/v1/models/digits/predict", json=_body())
        assert resp.status_code == 200, resp.text
        sent += 1
        pids.add(resp.headers["x-kiln-worker"])
    assert str(proc.pid) not in pids  # the parent serves nothing

    with httpx.Client(base_url=url, timeout=30) as client:
        metrics = client.get("/metrics").text
        pattern = (r'kiln_request_duration_seconds_count\{model="digits",route="/v1/models/\{name\}/predict",'
                   r'status="200"\} (\S+)')
        m = re.search(pattern, metrics)
        assert m is not None and float(m.group(1)) == sent, metrics  # summed over both workers
        assert 'kiln_backend_info{backend="onnxrt",device="cpu"' in metrics
        assert re.search(r'kiln_batch_size_count\{model="digits"\} [1-9]', metrics)

    statuses: list[int | str] = []
    stop = threading.Event()
    # A transport error ends a client: it was sent after the listeners closed.
    threads = [threading.Thread(target=post_until, args=(url, statuses, stop, True)) for _ in range(4)]
    for t in threads:
        t.start()
    while len(statuses) < 4 and time.monotonic() < end:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    with httpx.Client(base_url=url, timeout=30) as client:  # draining: still serving, not ready
        assert eventually(lambda: client.get("/readyz").status_code == 503, timeout=30, interval=0.05)
    assert proc.wait(60) == 0, "".join(lines)
    stop.set()
    for t in threads:
        t.join(30)
    assert not [s for s in statuses if isinstance(s, int) and s != 200], statuses
    assert statuses.count(200) >= 4, statuses
    assert sum("worker stopped" in line for line in lines) == 2, "".join(lines)
