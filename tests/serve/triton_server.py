"""Shared by the Triton/KServe client tests: real ONNX bundles (a lenet5 classifier and a kiln-det-s
detector, seeded and exported, untrained: the comparison is server against onnxruntime, not accuracy)
and an in-process ``kiln serve`` server: the app, protocol class, connection limits and drain that
``kiln serve`` builds (``kiln.serve.http_server.build_server``), on a socket bound to port 0 before it
starts (no race for a free port), with gRPC on the port grpcio picks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec


def _export(bundle: Bundle, model: Any, batch: BatchRange) -> Bundle:
    import torch

    from kiln.export.torch2onnx import torch2onnx

    torch.save(model.state_dict(), bundle.root / "model.pt")
    bundle.add_artifact("model.pt", "torch")
    bundle.save()
    torch2onnx(bundle, bundle.root / "model.onnx", batch=batch, simplify=False)
    bundle.add_artifact("model.onnx", "onnx")
    bundle.save()
    return bundle


def classifier(root: Path) -> Bundle:
    import torch

    from kiln.models import build_model

    arch = Architecture(name="lenet5", args={"num_classes": 10, "in_channels": 1})
    torch.manual_seed(0)
    root.mkdir(parents=True)
    batch = BatchRange(min=1, opt=8, max=16)
    bundle = Bundle(root, Manifest(
        kiln_version="0.1.0", task="classify", classes=[str(i) for i in range(10)],
        input=InputSpec(name="images", shape=[1, 28, 28], batch=batch),
        outputs=[TensorSpec(name="logits", shape=[10])],
        preprocess=Preprocess(mode="resize", size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
        postprocess={"top_k": 3}, architecture=arch,
    ))
    return _export(bundle, build_model(arch).eval(), batch)


def detector(root: Path) -> Bundle:
    import torch

    from kiln.models import build_model

    arch = Architecture(name="kiln-det-s", args={"num_classes": 2, "in_channels": 3, "image_size": 64})
    torch.manual_seed(0)
    model = build_model(arch).eval()
    root.mkdir(parents=True)
    a = model.num_locations
    batch = BatchRange(min=1, opt=4, max=8)
    bundle = Bundle(root, Manifest(
        kiln_version="0.1.0", task="detect", classes=["circle", "square"],
        input=InputSpec(name="images", shape=[3, 64, 64], batch=batch),
        outputs=[TensorSpec(name="boxes", shape=[a, 4]), TensorSpec(name="scores", shape=[a, 2])],
        preprocess=Preprocess(mode="letterbox", size=(64, 64), channels="RGB", mean=[0.5] * 3,
                              std=[0.25] * 3),
        postprocess={"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": 5}, architecture=arch,
    ))
    return _export(bundle, model, batch)


@pytest.fixture(scope="session")
def onnx_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    """``digits`` (classify) and ``shapes`` (detect), each with model.onnx; built once per session."""
    pytest.importorskip("torch")
    root = tmp_path_factory.getbasetemp() / "triton-bundles"
    if (root / "shapes" / "kiln.json").exists():  # the other client test module built them already
        return {"digits": Bundle.load(root / "digits"), "shapes": Bundle.load(root / "shapes")}
    return {"digits": classifier(root / "digits"), "shapes": detector(root / "shapes")}


def ort_outputs(bundle: Bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle's model.onnx run by onnxruntime directly: the reference for the server's answers."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle.root / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {bundle.manifest.input.name: x}), strict=True))


@dataclass
class Running:
    app: Any
    http: str  # host:port, as tritonclient.http takes it
    grpc: str


@contextlib.contextmanager
def serve(models: Sequence[tuple[str, Bundle]], settings: Any, loader: Any = None) -> Iterator[Running]:
    """``create_app`` served by ``build_server`` (as ``kiln serve`` runs it) in a thread, HTTP on a socket
    bound here and gRPC on a port grpcio binds; yields once every model is ready and stops the server
    (lifespan shutdown) afterwards."""
    from kiln.serve.app import create_app
    from kiln.serve.http_server import build_server

    app = create_app(models, settings, loader=loader)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = build_server(app, app.state.registry, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 60
        while not (server.started and app.state.registry.not_ready_reason() is None):
            assert thread.is_alive() and time.monotonic() < end, "the server did not start"
            time.sleep(0.05)
        port = sock.getsockname()[1]
        yield Running(app, f"127.0.0.1:{port}", f"127.0.0.1:{getattr(app.state, 'grpc_port', 0)}")
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
