"""The batcher as its callers see it: settings checked at their edges, the messages of every refusal
(closed, failed to load, too large for the queue, queue full, stopped), the warm-up batches, the hooks'
figures, an output of the wrong batch size, and what the log says. Threaded tests count calls and bound
every wait generously (only a hang breaks them)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.serve.batcher import (
    Batcher,
    BatcherClosed,
    ClientDisconnected,
    InferenceFailed,
    ModelNotReady,
    QueueFull,
    RequestTimeout,
    wait_result,
)

from .conftest import FakeBackend


def eventually(cond: Callable[[], bool]) -> bool:
    """Whether ``cond`` holds within 5 s (the worker logs and calls hooks after it sets the results)."""
    for _ in range(2500):
        if cond():
            return True
        threading.Event().wait(0.002)
    return cond()


def feeds(n: int) -> dict[str, np.ndarray]:
    return {"images": np.zeros((n, 1, 28, 28), np.float32)}


def occupy(batcher: Batcher, backend: FakeBackend) -> Future[dict[str, np.ndarray]]:
    """Hold the backend busy on one request (until ``backend.gate`` is set); returns that request."""
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(feeds(1))
    assert eventually(lambda: bool(backend.calls))
    return busy


@pytest.fixture
def make(classify_bundle) -> Iterator[Callable[..., tuple[Batcher, FakeBackend]]]:  # type: ignore[no-untyped-def]
    batchers: list[Batcher] = []

    def start(backend_max: int | None = None, **kw: object) -> tuple[Batcher, FakeBackend]:
        backend = FakeBackend(classify_bundle, max_batch=backend_max)
        b = Batcher(lambda: backend, name="digits", **kw).start()  # type: ignore[arg-type]
        assert b.wait_ready(5)
        batchers.append(b)
        return b, backend

    yield start
    for b in batchers:
        b.close(drain=False, timeout=5)


@pytest.mark.parametrize(("kw", "message"), [
    ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
    ({"max_delay": -0.5}, "max_delay must be >= 0, got -0.5"),
    ({"max_queue": 0}, "max_queue must be >= 1, got 0"),
])
def test_settings_out_of_range_are_refused(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Batcher(lambda: None, **kw)  # type: ignore[arg-type, return-value]
    assert str(info.value) == message


def test_settings_at_their_edge_are_taken(make) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = make(max_batch=1, max_delay=0.0, max_queue=1)
    assert batcher.submit(feeds(1)).result(5)["logits"].shape == (1, 10)


def test_default_settings(make) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = make()
    assert (batcher.max_items, batcher.max_delay, batcher.max_queue) == (32, 0.002, 256)


def test_a_batcher_starts_once(make) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = make()
    with pytest.raises(RuntimeError, match="^batcher already started$"):
        batcher.start()


def test_refusals_name_the_model(make, classify_bundle) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = make()
    batcher.close(timeout=5)
    with pytest.raises(BatcherClosed, match="^model 'digits' is shutting down$"):
        batcher.submit(feeds(1))

    def broken() -> FakeBackend:
        raise RuntimeError("no engine for this GPU")

    b = Batcher(broken, name="broken").start()
    assert not b.wait_ready(5)
    with pytest.raises(ModelNotReady, match="^model 'broken' failed to load: no engine for this GPU$"):
        b.submit(feeds(1))
    b.close(timeout=5)


def test_a_request_the_queue_could_never_hold_is_an_input_error(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_batch=4, max_queue=2)
    with pytest.raises(InputError) as info:
        batcher.submit(feeds(9))
    assert str(info.value) == ("request of 9 items needs 3 batches of 4, more than the queue holds (2); "
                               "send at most 8 items per request")
    assert batcher.submit(feeds(8)).result(5)["logits"].shape == (8, 10)


def test_queue_full_names_the_model_and_the_queue_size(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_batch=1, max_delay=0.0, max_queue=1)
    busy = occupy(batcher, backend)
    queued = batcher.submit(feeds(1))
    with pytest.raises(QueueFull, match=r"^model 'digits' queue is full \(1 requests waiting\); retry later$"):
        batcher.submit(feeds(1))
    backend.gate.set()
    assert busy.result(5) and queued.result(5)


def test_a_request_without_an_id_is_named_after_the_model(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_delay=0.0)
    backend.fail_next = True
    with pytest.raises(InferenceFailed) as info:
        batcher.submit(feeds(1)).result(5)
    assert info.value.request_id.startswith("digits-") and info.value.request_id[7:].isdigit()
    assert str(info.value) == "inference failed (RuntimeError); see the server log"


def test_warm_up_runs_the_smallest_and_largest_batch_then_the_smallest(make) -> None:  # type: ignore[no-untyped-def]
    _, backend = make(max_batch=8)
    assert [n for n, _ in backend.calls] == [1, 8, 1]


def test_no_warm_up_when_switched_off(make) -> None:  # type: ignore[no-untyped-def]
    _, backend = make(warmup=False)
    assert backend.calls == []


def test_the_backend_cap_applies_without_a_configured_max(make) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = make(backend_max=16)
    assert batcher.max_items == 16
    assert make(max_batch=4, backend_max=16)[0].max_items == 4


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


def test_an_output_of_the_wrong_batch_size_fails_the_batch(make, caplog) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_delay=0.0)
    real = backend._infer
    backend._infer = lambda f: {k: v[:-1] for k, v in real(f).items()}  # type: ignore[method-assign]
    with pytest.raises(InferenceFailed, match=r"^inference failed \(RuntimeError\); see the server log$"):
        batcher.submit(feeds(2), request_id="r1").result(5)
    assert "model 'digits': inference failed for 2 items (requests r1)" in caplog.messages
    assert "output logits has batch 1, expected 2" in caplog.text


def test_hooks_get_the_items_and_times_and_cannot_stop_the_worker(make, caplog) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple] = []

    def on_batch(n: int, seconds: float) -> None:
        seen.append(("batch", n, 0 <= seconds < 5))
        raise RuntimeError("metrics down")

    batcher, _ = make(max_delay=0.0, on_batch=on_batch)

    def on_run(n: int, seconds: float, waits: list[float], *_: float) -> None:
        seen.append(("run", n, 0 <= seconds < 5, len(waits), all(0 <= w < 5 for w in waits)))
        raise RuntimeError("metrics down")

    batcher.on_run = on_run
    assert batcher.submit(feeds(3)).result(5)["logits"].shape == (3, 10)
    assert batcher.submit(feeds(1)).result(5)["logits"].shape == (1, 10)
    assert eventually(lambda: len([s for s in seen if s[0] == "run"]) == 2)
    assert ("batch", 3, True) in seen and ("run", 3, True, 1, True) in seen and ("batch", 1, True) in seen
    assert {"on_batch hook failed", "on_run hook failed"} <= set(caplog.messages)


def test_close_without_drain_fails_what_is_queued_naming_the_model(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_batch=1, max_delay=0.0)
    busy = occupy(batcher, backend)
    waiting = batcher.submit(feeds(1))
    threading.Timer(0.05, backend.gate.set).start()
    batcher.close(drain=False, timeout=5)
    assert busy.result(0)
    with pytest.raises(BatcherClosed, match="^model 'digits' stopped before the request ran$"):
        waiting.result(0)


def test_ready_is_logged_with_the_backend_and_its_batch(make, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="kiln.serve.batcher"):
        make(max_batch=8)
        assert eventually(lambda: "model 'digits' ready: fake fp32 on cpu (max batch 8)" in caplog.messages)
    assert "model 'digits' ready: fake fp32 on cpu (max batch 8)" in caplog.messages


def test_wait_result_messages() -> None:
    async def scenario() -> None:
        with pytest.raises(RequestTimeout, match=r"^no result within 0\.05 s$"):
            await wait_result(Future(), 0.05)

        async def gone() -> bool:
            return True

        fut: Future = Future()
        with pytest.raises(ClientDisconnected, match="^client disconnected$"):
            await wait_result(fut, None, gone, poll=0.01)
        assert fut.cancelled()

    asyncio.run(scenario())


# ---- inline runs, arrivals and load failures ---------------------------------------------------------


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
        with caplog.at_level(logging.ERROR, logger="kiln.serve.batcher"), pytest.raises(InferenceFailed) as info:
            b.run_inline(feeds(2))
        assert str(info.value) == "inference failed (RuntimeError); see the server log"
        assert info.value.request_id == ""
        record = next(r for r in caplog.records if r.getMessage() == "model 'm': inference failed for 2 items")
        assert record.exc_info is not None
    finally:
        b.close(timeout=5)


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


def test_arrival_submit_passes_the_id_and_timeout_and_stops_counting(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_delay=0.0)
    backend.fail_next = True
    with batcher.announce() as arrival:
        fut = arrival.submit(feeds(1), "r5", 30.0)
        assert arrival.coming is False
    with pytest.raises(InferenceFailed) as info:
        fut.result(5)
    assert info.value.request_id == "r5"


def test_a_deadline_from_arrival_submit_expires(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    busy = batcher.submit(feeds(1))
    assert eventually(lambda: bool(backend.calls))
    with batcher.announce() as arrival:
        late = arrival.submit(feeds(1), "late", 0.01)
    threading.Event().wait(0.05)
    backend.gate.set()
    assert busy.result(5)
    with pytest.raises(RequestTimeout, match="request late waited past its deadline"):
        late.result(5)


def test_a_batch_waiting_for_an_announced_request_closes_when_it_leaves(make) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = make(max_delay=30.0)
    with batcher.announce() as mine:
        with batcher.announce():  # another request being read
            fut = mine.submit(feeds(1))
            threading.Event().wait(0.1)
            assert not fut.done()  # the batch waits for the other one
        assert fut.result(5)["logits"].shape == (1, 10)  # it left unsent: the batch closed, not after 30 s


def test_a_refused_announced_request_closes_the_batch_waiting_for_it(make) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = make(max_delay=30.0)
    with batcher.announce() as mine, batcher.announce() as other:
        fut = mine.submit(feeds(1))
        threading.Event().wait(0.1)
        assert not fut.done()
        with pytest.raises(InputError):
            other.submit({})
        assert fut.result(5)["logits"].shape == (1, 10)


def test_a_plain_future_finished_by_another_thread_ends_the_wait_at_once() -> None:
    """A split request's joined future is not a BatchFuture: its completion wakes the loop itself, long
    before the next poll and without asking whether the client is still there."""
    async def scenario() -> None:
        fut: Future = Future()
        asked: list[int] = []

        async def still_there() -> bool:
            asked.append(1)
            return False

        threading.Timer(0.1, lambda: fut.set_result({"y": 1})).start()
        out = await asyncio.wait_for(wait_result(fut, None, still_there, poll=30.0), 5)
        assert out == {"y": 1} and asked == []

    asyncio.run(scenario())


def test_the_timeout_ends_the_wait_before_the_next_poll() -> None:
    async def scenario() -> None:
        fut: Future = Future()
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(wait_result(fut, 0.05, poll=30.0), 5)
        assert fut.cancelled()

    asyncio.run(scenario())


def test_an_arrival_without_an_id_is_named_after_the_model(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_delay=0.0)
    backend.fail_next = True
    with batcher.announce() as arrival:
        fut = arrival.submit(feeds(1))
    with pytest.raises(InferenceFailed) as info:
        fut.result(5)
    assert info.value.request_id.startswith("digits-")


def test_a_request_that_did_not_fit_opens_the_next_batch(make) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = make(max_batch=4, max_delay=0.0)
    busy = occupy(batcher, backend)
    a, b = batcher.submit(feeds(3)), batcher.submit(feeds(3))
    backend.gate.set()
    assert busy.result(5) and a.result(5)["logits"].shape == (3, 10) and b.result(5)["logits"].shape == (3, 10)
    assert [n for n, _ in backend.calls] == [1, 3, 3]


def test_the_worker_thread_does_not_keep_the_process_alive(make) -> None:  # type: ignore[no-untyped-def]
    make()
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
