"""Triton's statistics extension shows queueing: 16 concurrent tritonclient requests against a backend held
busy report queue time and each compute stage (input, infer, output) for every request, over REST and gRPC,
as perf tooling (perf_analyzer, Model Analyzer) reads them."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from kiln.bundle import Bundle
from kiln.serve.settings import Settings

from .conftest import FakeBackend
from .triton_server import serve

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

CONCURRENCY = 16


def _until(condition: Any, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_statistics_show_queue_and_compute_stages_under_concurrency(classify_bundle: Bundle) -> None:
    backends: list[FakeBackend] = []

    def loader(bundle: Bundle, _settings: Settings) -> FakeBackend:
        backends.append(FakeBackend(bundle, max_batch=4))
        return backends[-1]

    with serve([("digits", classify_bundle)], Settings(grpc_port=0, max_delay_ms=1), loader) as running:
        backend = backends[0]
        gate = backend.gate = threading.Event()  # the first batch holds the backend until the rest are queued
        calls = len(backend.calls)
        client = httpclient.InferenceServerClient(running.http, concurrency=CONCURRENCY)
        try:
            x = np.zeros((1, 1, 28, 28), np.float32)
            pending = []
            for _ in range(CONCURRENCY):
                inp = httpclient.InferInput("images", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=True)
                pending.append(client.async_infer("digits", [inp]))
            batcher = running.app.state.models["digits"].batcher
            held = lambda: sum(n for n, _ in backend.calls[calls:])  # noqa: E731 - the held batch's requests
            _until(lambda: held() > 0 and batcher._queue.qsize() == CONCURRENCY - held())
            gate.set()
            for p in pending:
                assert p.get_result(timeout=30).as_numpy("logits").shape == (1, 10)
            rest = client.get_inference_statistics("digits")["model_stats"][0]
        finally:
            client.close()
        g = grpcclient.InferenceServerClient(running.grpc)
        over_grpc = g.get_inference_statistics("digits", as_json=True)["model_stats"][0]
        g.close()

    stats = rest["inference_stats"]
    assert stats["success"]["count"] == CONCURRENCY
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[stage]["count"] == CONCURRENCY, stage
        assert stats[stage]["ns"] > 0, stage
    # the 15 requests that waited for the held batch: at least the held batch's backend time in the queue
    assert stats["queue"]["ns"] > stats["compute_infer"]["ns"] / CONCURRENCY
    assert rest["execution_count"] > 1 and all(b["batch_size"] <= 4 for b in rest["batch_stats"])
    assert all(
        int(b[s]["ns"]) > 0
        for b in rest["batch_stats"]
        for s in ("compute_input", "compute_infer", "compute_output")
    )
    assert int(over_grpc["inference_stats"]["queue"]["ns"]) == stats["queue"]["ns"]
