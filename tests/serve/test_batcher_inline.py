"""A lone request on an idle, thread-safe, cheap backend runs on the caller's thread (no hand-over to the
worker and back); anything else goes through the queue as before."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from kiln.bundle import Bundle
from kiln.serve.batcher import (
    Batcher,
    InferenceFailed,
)
from tests.polling import eventually

from .batching_helpers import feeds
from .conftest import FakeBackend


def _batcher(bundle: Bundle, *, thread_safe: bool = True, min_batch: int | None = None,
             delay: float = 0.0) -> tuple[Batcher, FakeBackend, list[tuple[int, float]]]:
    backend = FakeBackend(bundle)
    backend.thread_safe = thread_safe
    if min_batch is not None:
        backend.min_batch = min_batch
    backend.delay = delay
    batches: list[tuple[int, float]] = []
    b = Batcher(lambda: backend, name="m", max_batch=8, on_batch=lambda n, s: batches.append((n, s))).start()
    assert b.wait_ready(10)
    backend.calls.clear()
    return b, backend, batches


def _image(value: float, n: int = 1) -> dict[str, np.ndarray]:
    return {"images": np.full((n, 1, 28, 28), value, np.float32)}


def test_lone_request_runs_on_the_callers_thread(classify_bundle: Bundle) -> None:
    b, backend, batches = _batcher(classify_bundle)
    try:
        out = b.run_inline(_image(1.0))
        assert out is not None and out["logits"].shape == (1, 10) and int(out["logits"].argmax()) == 9
        assert backend.calls == [(1, threading.current_thread().name)]
        assert [n for n, _ in batches] == [1]  # counted like a batch of one
    finally:
        b.close()


def test_not_inline_when_the_backend_is_not_thread_safe(classify_bundle: Bundle) -> None:
    b, backend, _ = _batcher(classify_bundle, thread_safe=False)
    try:
        assert b.run_inline(_image(0.5)) is None and backend.calls == []
    finally:
        b.close()


def test_not_inline_when_the_backend_is_slow(classify_bundle: Bundle) -> None:
    b, backend, _ = _batcher(classify_bundle, delay=0.01)  # the warm-up measured 10 ms: not worth a stall
    try:
        assert b.run_inline(_image(0.5)) is None and backend.calls == []
    finally:
        b.close()


def test_not_inline_while_the_worker_runs_a_batch_or_requests_wait(classify_bundle: Bundle) -> None:
    b, backend, _ = _batcher(classify_bundle)
    try:
        backend.gate = threading.Event()  # the worker's next batch blocks inside infer
        first = b.submit(_image(0.1))
        for _ in range(200):
            if backend.calls:
                break
            threading.Event().wait(0.01)
        assert b.run_inline(_image(0.2)) is None  # the worker is busy
        queued = b.submit(_image(0.3))
        assert b.run_inline(_image(0.4)) is None  # and one request waits in the queue
        backend.gate.set()
        assert first.result(10)["logits"].shape == (1, 10) and queued.result(10)["logits"].shape == (1, 10)
    finally:
        b.close()


def test_inline_pads_to_the_backend_minimum_and_drops_the_padding(classify_bundle: Bundle) -> None:
    b, backend, _ = _batcher(classify_bundle, min_batch=4)
    try:
        out = b.run_inline(_image(1.0, n=2))
        assert out is not None and out["logits"].shape == (2, 10)
        assert backend.calls[-1][0] == 4
    finally:
        b.close()


def test_inline_failure_is_the_same_error_as_a_batch(classify_bundle: Bundle) -> None:
    b, backend, _ = _batcher(classify_bundle)
    try:
        backend.fail_next = True
        with pytest.raises(InferenceFailed, match="inference failed") as info:
            b.run_inline(_image(0.5), "req-7")
        assert info.value.request_id == "req-7"
        assert b.run_inline(_image(0.5)) is not None  # and the next one runs
    finally:
        b.close()


def test_too_large_for_one_batch_goes_through_the_queue(classify_bundle: Bundle) -> None:
    b, backend, _ = _batcher(classify_bundle)
    try:
        assert b.run_inline(_image(0.5, n=9)) is None and backend.calls == []
    finally:
        b.close()


def test_not_inline_while_other_requests_are_on_their_way(classify_bundle: Bundle) -> None:
    b, backend, _ = _batcher(classify_bundle)
    try:
        with b.announce(), b.announce():  # this request and another being read
            assert b.run_inline(_image(0.5)) is None
        with b.announce():  # only this one
            assert b.run_inline(_image(0.5)) is not None
    finally:
        b.close()


def inline_batcher(bundle, **kw: object) -> tuple[Batcher, FakeBackend]:  # type: ignore[no-untyped-def]
    backend = FakeBackend(bundle)
    backend.thread_safe = True  # type: ignore[attr-defined]
    b = Batcher(lambda: backend, name="m", max_batch=8, **kw).start()  # type: ignore[arg-type]
    assert b.wait_ready(10)
    backend.calls.clear()
    return b, backend


def test_an_inline_run_reports_to_both_hooks_and_survives_their_failure(classify_bundle, caplog) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple] = []

    def on_batch(n: int, seconds: float) -> None:
        seen.append(("batch", n, 0 <= seconds < 5))

    b, _ = inline_batcher(classify_bundle, on_batch=on_batch)

    def on_run(n: int, seconds: float, waits: list[float], *_: float) -> None:
        seen.append(("run", n, 0 <= seconds < 5, waits))
        raise RuntimeError("metrics down")

    b.on_run = on_run
    try:
        with caplog.at_level(logging.ERROR, logger="kiln.serve.batcher"):
            out = b.run_inline(feeds(3))
        assert out is not None and out["logits"].shape == (3, 10)
        assert seen == [("batch", 3, True), ("run", 3, True, [0.0])]
        assert "metrics hook failed" in caplog.messages
    finally:
        b.close(timeout=5)


def test_a_request_of_exactly_max_batch_runs_inline(classify_bundle) -> None:  # type: ignore[no-untyped-def]
    b, backend = inline_batcher(classify_bundle)
    try:
        assert b.run_inline(feeds(8)) is not None and [n for n, _ in backend.calls] == [8]
    finally:
        b.close(timeout=5)


def test_not_inline_while_busy_or_after_close(classify_bundle) -> None:  # type: ignore[no-untyped-def]
    b, backend = inline_batcher(classify_bundle)
    try:
        backend.gate = threading.Event()
        busy = b.submit(feeds(1))
        assert eventually(lambda: bool(backend.calls))
        queued = b.submit(feeds(1))
        assert b.run_inline(feeds(1)) is None
        backend.gate.set()
        assert busy.result(5) and queued.result(5)
    finally:
        b.close(timeout=5)
    assert b.run_inline(feeds(1)) is None


def test_an_inline_failure_is_logged_with_its_traceback(classify_bundle, caplog) -> None:  # type: ignore[no-untyped-def]
    b, backend = inline_batcher(classify_bundle)
    backend.fail_next = True
    try:
        with caplog.at_level(logging.ERROR,
                             logger="kiln.serve.batcher"), pytest.raises(InferenceFailed) as info:
            b.run_inline(feeds(2))
        assert str(info.value) == "inference failed (RuntimeError); see the server log"
        assert info.value.request_id == ""
        record = next(r for r in caplog.records
                      if r.getMessage() == "model 'm': inference failed for 2 items")
        assert record.exc_info is not None
    finally:
        b.close(timeout=5)
