"""The batcher's life (serve/batcher.py): settings checked at their edges, one start, the backend loaded
and warmed up on the worker thread (smallest, largest, then smallest batch), a failed load or warm-up
reported with what was queued failed, ready logged with the backend, close draining or failing what is
queued, and a worker thread that never keeps the process alive."""

from __future__ import annotations

import logging
import threading

import pytest

from kiln.serve.batcher import (
    Batcher,
    BatcherClosed,
    ModelNotReady,
)
from tests.polling import eventually

from .batching_helpers import feeds
from .conftest import FakeBackend


def test_close_drains_queued_requests_then_refuses(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=2, max_delay=0.0)
    backend.delay = 0.02
    futs = [batcher.submit(feeds(1)) for _ in range(6)]
    batcher.close(drain=True, timeout=5)
    assert all(f.result(0)["logits"].shape == (1, 10) for f in futs)
    assert not batcher.ready
    with pytest.raises(BatcherClosed):
        batcher.submit(feeds(1))


def test_close_without_drain_fails_queued(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(feeds(1))
    assert eventually(lambda: bool(backend.calls))
    waiting = batcher.submit(feeds(1))
    threading.Timer(0.05, backend.gate.set).start()
    batcher.close(drain=False, timeout=5)
    assert busy.result(0)["logits"].shape == (1, 10)
    with pytest.raises(BatcherClosed):  # never ran: the client gets a clean 503, not a hang
        waiting.result(0)


def test_load_failure_is_reported_not_raised() -> None:
    def factory() -> FakeBackend:
        raise RuntimeError("no engine for this GPU")

    b = Batcher(factory, name="broken").start()
    assert not b.wait_ready(5)
    assert "no engine" in str(b.load_error)
    with pytest.raises(ModelNotReady):
        b.submit(feeds(1))
    b.close(timeout=5)


@pytest.mark.parametrize(("kw", "message"), [
    ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
    ({"max_delay": -0.5}, "max_delay must be >= 0, got -0.5"),
    ({"max_queue": 0}, "max_queue must be >= 1, got 0"),
])
def test_settings_out_of_range_are_refused(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Batcher(lambda: None, **kw)  # type: ignore[arg-type, return-value]
    assert str(info.value) == message


def test_settings_at_their_edge_are_taken(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher(max_batch=1, max_delay=0.0, max_queue=1)
    assert batcher.submit(feeds(1)).result(5)["logits"].shape == (1, 10)


def test_default_settings(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher()
    assert (batcher.max_items, batcher.max_delay, batcher.max_queue) == (32, 0.002, 256)


def test_a_batcher_starts_once(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher()
    with pytest.raises(RuntimeError, match="^batcher already started$"):
        batcher.start()


def test_warm_up_runs_the_smallest_and_largest_batch_then_the_smallest(start_batcher) -> None:  # type: ignore[no-untyped-def]
    _, backend = start_batcher(max_batch=8)
    assert [n for n, _ in backend.calls] == [1, 8, 1]


def test_no_warm_up_when_switched_off(start_batcher) -> None:  # type: ignore[no-untyped-def]
    _, backend = start_batcher(warmup=False)
    assert backend.calls == []


def test_a_failed_warm_up_closes_the_backend_and_reports(classify_bundle) -> None:  # type: ignore[no-untyped-def]
    backend = FakeBackend(classify_bundle)
    backend.fail_next = True
    b = Batcher(lambda: backend, name="digits").start()
    assert not b.wait_ready(5) and backend.closed_on == "kiln-batcher-digits"
    assert "simulated backend failure" in str(b.load_error)
    b.close(timeout=5)


def test_requests_queued_while_loading_fail_when_the_load_fails() -> None:
    release = threading.Event()

    def slow_broken() -> FakeBackend:
        release.wait(5)
        raise RuntimeError("bad weights")

    b = Batcher(slow_broken, name="late").start()
    queued = b.submit(feeds(1))
    release.set()
    with pytest.raises(BatcherClosed, match="^model 'late' stopped before the request ran$"):
        queued.result(5)
    b.close(timeout=5)


def test_ready_is_logged_with_the_backend_and_its_batch(start_batcher, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="kiln.serve.batcher"):
        start_batcher(max_batch=8)
        assert eventually(lambda: "model 'digits' ready: fake fp32 on cpu (max batch 8)" in caplog.messages)
    assert "model 'digits' ready: fake fp32 on cpu (max batch 8)" in caplog.messages


def test_a_load_failure_is_logged_with_a_traceback_unless_kiln_explains_it(caplog) -> None:  # type: ignore[no-untyped-def]
    from kiln.errors import KilnError

    for exc in (RuntimeError("driver crashed"), KilnError("no engine for this GPU")):
        def factory(exc: Exception = exc) -> FakeBackend:
            raise exc

        with caplog.at_level(logging.ERROR, logger="kiln.serve.batcher"):
            b = Batcher(factory, name="x").start()
            assert not b.wait_ready(5)
            b.close(timeout=5)
    records = [r for r in caplog.records if r.getMessage().startswith("model 'x' failed to load")]
    assert [r.getMessage() for r in records] == ["model 'x' failed to load: driver crashed",
                                                 "model 'x' failed to load: no engine for this GPU"]
    assert records[0].exc_info is not None and not records[1].exc_info


def test_the_worker_thread_does_not_keep_the_process_alive(start_batcher) -> None:  # type: ignore[no-untyped-def]
    start_batcher()
    workers = [t for t in threading.enumerate() if t.name == "kiln-batcher-digits"]
    assert workers and all(t.daemon for t in workers)


def test_wait_ready_gives_up_after_its_timeout(classify_bundle) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def slow() -> FakeBackend:
        release.wait(5)
        return FakeBackend(classify_bundle)

    b = Batcher(slow, name="slow").start()
    try:
        assert b.wait_ready(0.05) is False and not release.is_set()
        release.set()
        assert b.wait_ready(5) is True
    finally:
        release.set()
        b.close(timeout=5)
