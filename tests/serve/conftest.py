"""Fixtures for the serving tests: synthetic bundles and a numpy backend that needs no model file."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kiln.bundle import Architecture, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.runtime.base import BaseBackend
from kiln.serve.batcher import Batcher

DIGITS = [str(i) for i in range(10)]


def make_bundle(root: Path, task: str = "classify", batch_max: int = 32) -> Bundle:
    """A bundle folder with a digits-like manifest and no artifacts (tests load it with FakeBackend)."""
    root.mkdir(parents=True, exist_ok=True)
    if task == "classify":
        manifest = Manifest(
            kiln_version="0.1.0",
            task="classify",
            classes=DIGITS,
            input=InputSpec(name="images", shape=[1, 28, 28], batch={"min": 1, "opt": 8, "max": batch_max}),
            outputs=[TensorSpec(name="logits", shape=[10])],
            preprocess=Preprocess(mode="resize", size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
            postprocess={"top_k": 3},
            architecture=Architecture(name="lenet5", args={"num_classes": 10, "in_channels": 1}),
        )
    else:
        manifest = Manifest(
            kiln_version="0.1.0",
            task="detect",
            classes=["circle", "square"],
            input=InputSpec(name="images", shape=[3, 64, 64], batch={"min": 1, "opt": 4, "max": batch_max}),
            outputs=[TensorSpec(name="boxes", shape=[4, 4]), TensorSpec(name="scores", shape=[4, 2])],
            preprocess=Preprocess(mode="letterbox", size=(64, 64), channels="RGB", mean=[0, 0, 0],
                                  std=[1, 1, 1]),
            postprocess={"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 10},
            architecture=Architecture(name="kiln-det-s", args={"num_classes": 2}),
        )
    bundle = Bundle(root, manifest)
    bundle.save()
    return bundle


class FakeBackend(BaseBackend):
    """Classify: the class is the image's mean brightness in tenths (a black image is '0', white '9').

    ``fail_next`` makes the next ``infer`` raise; ``delay`` sleeps in ``infer``; ``calls`` records the
    batch sizes and the thread that ran each call.
    """

    def __init__(self, bundle: Bundle, max_batch: int | None = None) -> None:
        m = bundle.manifest
        self.name = "fake"
        self.precision = "fp32"
        self.device = "cpu"
        self.inputs = [TensorSpec(name=m.input.name, shape=m.input.shape, dtype=m.input.dtype)]
        self.outputs = list(m.outputs)
        self.min_batch = m.input.batch.min
        self.max_batch = max_batch or m.input.batch.max
        self.task = m.task
        self.fail_next = False
        self.delay = 0.0
        self.calls: list[tuple[int, str]] = []
        self.closed_on: str | None = None
        self.gate: threading.Event | None = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["images"]
        self.calls.append((x.shape[0], threading.current_thread().name))
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated backend failure")
        n = x.shape[0]
        if self.task == "classify":
            brightness = (x.reshape(n, -1).mean(axis=1) * 0.5 + 0.5).clip(0, 0.999)  # undo mean/std 0.5
            target = np.floor(brightness * 10).astype(int)
            logits = np.full((n, 10), -5.0, dtype=np.float32)
            logits[np.arange(n), target] = 5.0
            return {"logits": logits}
        boxes = np.tile(np.array([[8, 8, 40, 40], [10, 10, 42, 42], [30, 30, 60, 60], [0, 0, 2, 2]],
                                 np.float32), (n, 1, 1))
        scores = np.tile(np.array([[0.9, 0.1], [0.8, 0.05], [0.1, 0.7], [0.01, 0.02]], np.float32), (n, 1, 1))
        return {"boxes": boxes, "scores": scores}

    def _close(self) -> None:
        self.closed_on = threading.current_thread().name


def png(mode: str = "L", size: tuple[int, int] = (28, 28), value: int | tuple[int, ...] = 255,
        fmt: str = "PNG") -> bytes:
    img = Image.new(mode, size, value)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def classify_bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "digits")


@pytest.fixture
def detect_bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "shapes", task="detect")


@pytest.fixture
def start_batcher(classify_bundle: Bundle) -> Iterator[Callable[..., tuple[Batcher, FakeBackend]]]:
    """``start_batcher(backend_max=None, **batcher_settings)``: a started "digits" batcher over one
    ``FakeBackend`` (its ``max_batch`` is ``backend_max``), ready; closed without draining afterwards."""
    batchers: list[Batcher] = []

    def start(backend_max: int | None = None, **kw: Any) -> tuple[Batcher, FakeBackend]:
        backend = FakeBackend(classify_bundle, max_batch=backend_max)
        b = Batcher(lambda: backend, name="digits", **kw).start()
        assert b.wait_ready(5)
        batchers.append(b)
        return b, backend

    yield start
    for b in batchers:
        b.close(drain=False, timeout=5)


@contextlib.contextmanager
def kiln_serve(cmd: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """``kiln serve`` in a subprocess on the port it picked (``--port 0``): (process, base URL, stderr
    lines so far). Killed at the end if still running."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    url: list[str] = []
    found = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving .* on (http://\S+)", line)
            if m:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(60):
        proc.kill()
        pytest.fail("kiln serve did not start:\n" + "".join(lines))
    try:
        yield proc, url[0], lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_ready(client: Any, proc: subprocess.Popen[str], lines: list[str], timeout: float) -> None:
    """Poll ``/readyz`` through ``client`` (an httpx.Client on the server) until 200; fail with the
    server's log if it exits or ``timeout`` seconds pass."""
    import httpx

    end = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "".join(lines)
        assert time.monotonic() < end, "".join(lines)
        time.sleep(0.1)
