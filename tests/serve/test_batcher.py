"""The batcher's core (collect) with a plain Queue and a fake clock, then the worker thread."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.serve.batcher import (
    Batcher,
    BatcherClosed,
    InferenceFailed,
    ModelNotReady,
    Pending,
    QueueFull,
    RequestTimeout,
    collect,
    split_feeds,
    wait_result,
)

from .conftest import FakeBackend


class FakeClock:
    """A clock that moves only when a blocking queue.get would have waited (via FakeQueue)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeQueue(queue.Queue):  # type: ignore[type-arg]
    """A Queue whose timed get advances the fake clock instead of sleeping, and records the timeouts."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> Pending:
        if block:
            self.waits.append(timeout)
        try:
            return super().get(block=False)
        except queue.Empty:
            if block and timeout is None:
                raise AssertionError("collect blocked without a timeout on an empty queue") from None
            if timeout:
                self.clock.now += timeout
            raise


def item(size: int = 1, enqueued: float = 100.0, deadline: float | None = None, rid: str = "") -> Pending:
    return Pending({"x": np.zeros((size, 2), np.float32)}, size, request_id=rid, enqueued=enqueued, deadline=deadline)


def test_batch_closes_at_max_items() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    for _ in range(5):
        q.put(item())
    batch, carry = collect(q, max_items=4, max_delay=10.0, first_timeout=None, clock=clock)
    assert [p.size for p in batch] == [1, 1, 1, 1]
    assert carry is None
    assert clock.now == 100.0  # full before any wait
    assert q.qsize() == 1


def test_batch_closes_at_max_delay_after_first_request() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item(enqueued=99.0))  # queued 1 s ago: the 2.5 s window has 1.5 s left
    batch, carry = collect(q, max_items=8, max_delay=2.5, first_timeout=None, clock=clock)
    assert len(batch) == 1 and carry is None
    assert q.waits[-1] == pytest.approx(1.5)
    assert clock.now == pytest.approx(101.5)


def test_first_timeout_expires_with_empty_batch() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    batch, carry = collect(q, max_items=8, max_delay=1.0, first_timeout=0.25, clock=clock)
    assert batch == [] and carry is None
    assert q.waits == [0.25]


def test_timeout_zero_takes_only_what_is_queued() -> None:
    q: queue.Queue[Pending] = queue.Queue()
    assert collect(q, max_items=8, max_delay=0.0, first_timeout=0.0) == ([], None)
    q.put(item())
    q.put(item())
    t0 = time.monotonic()
    batch, _ = collect(q, max_items=8, max_delay=0.0, first_timeout=0.0)
    assert len(batch) == 2
    assert time.monotonic() - t0 < 1.0  # no wait at all; the bound only catches a blocking get


def test_max_delay_none_waits_until_full_and_real_timer_fires() -> None:
    q: queue.Queue[Pending] = queue.Queue()
    first = item(enqueued=time.monotonic())
    q.put(first)
    threading.Timer(0.05, lambda: q.put(item(enqueued=time.monotonic()))).start()
    batch, _ = collect(q, max_items=2, max_delay=None, first_timeout=0.0)
    assert len(batch) == 2
    # and a real max_delay closes a batch that never fills
    q.put(item(enqueued=time.monotonic()))
    t0 = time.monotonic()
    batch, _ = collect(q, max_items=8, max_delay=0.05, first_timeout=0.0)
    assert len(batch) == 1
    assert 0.03 < time.monotonic() - t0 < 5.0  # waited out the window, and did not block for good


def test_items_not_requests_count_and_overflow_is_carried() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item(3))
    q.put(item(3))
    q.put(item(1))
    batch, carry = collect(q, max_items=5, max_delay=1.0, clock=clock, first_timeout=0)
    assert [p.size for p in batch] == [3]
    assert carry is not None and carry.size == 3
    batch, carry = collect(q, max_items=5, max_delay=1.0, clock=clock, carry=carry, first_timeout=0)
    assert [p.size for p in batch] == [3, 1]
    assert carry is None


def test_cancelled_and_expired_requests_are_skipped() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    gone, expired, live = item(rid="gone"), item(deadline=99.0, rid="late"), item(rid="live")
    gone.future.cancel()
    for p in (gone, expired, live):
        q.put(p)
    batch, _ = collect(q, max_items=8, max_delay=0.0, clock=clock, first_timeout=0)
    assert batch == [live]
    assert live.future.running()
    with pytest.raises(RequestTimeout):
        expired.future.result(0)


def test_collect_rejects_bad_max_items() -> None:
    with pytest.raises(ValueError):
        collect(queue.Queue(), max_items=0, max_delay=0.0)


def test_split_feeds_views() -> None:
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    parts = split_feeds({"x": x}, 2)
    assert [p["x"].shape[0] for p in parts] == [2, 2, 1]
    assert np.shares_memory(parts[0]["x"], x)


# ---- the worker ----------------------------------------------------------------------------------


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


def _feeds(n: int, value: float = 0.0) -> dict[str, np.ndarray]:
    return {"images": np.full((n, 1, 28, 28), value, np.float32)}


@pytest.fixture
def started(classify_bundle):  # type: ignore[no-untyped-def]
    made: list[FakeBackend] = []
    batchers: list[Batcher] = []

    def start(**kw: object) -> tuple[Batcher, FakeBackend]:
        max_backend = kw.pop("backend_max", None)

        def factory() -> FakeBackend:
            b = FakeBackend(classify_bundle, max_batch=max_backend)  # type: ignore[arg-type]
            made.append(b)
            return b

        b = Batcher(factory, name="digits", **kw).start()  # type: ignore[arg-type]
        assert b.wait_ready(5)
        batchers.append(b)
        return b, made[-1]

    yield start
    for b in batchers:
        b.close(drain=False, timeout=5)


def test_worker_owns_backend_and_batches_concurrent_requests(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=8, max_delay=0.2)
    backend.calls.clear()
    futs = [batcher.submit(_feeds(1, value=-0.9 + 0.2 * i)) for i in range(8)]  # class i
    outs = [f.result(5) for f in futs]
    assert [n for n, _ in backend.calls] == [8]  # one batch: closed at max items, long before 0.2 s
    assert {t for _, t in backend.calls} == {"kiln-batcher-digits"}
    # each request gets its own row back
    assert [int(o["logits"][0].argmax()) for o in outs] == list(range(8))
    batcher.close(timeout=5)
    assert backend.closed_on == "kiln-batcher-digits"


def test_request_larger_than_max_batch_is_split_and_rejoined(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=4, max_delay=0.0, backend_max=4)
    backend.calls.clear()
    out = batcher.submit(_feeds(10)).result(5)
    assert out["logits"].shape == (10, 10)
    assert sum(n for n, _ in backend.calls) == 10
    assert max(n for n, _ in backend.calls) <= 4


def test_backend_max_batch_caps_configured_max(started) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = started(max_batch=64, backend_max=16)
    assert batcher.max_items == 16


def test_backend_exception_fails_only_that_batch(started, caplog) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=8, max_delay=0.0)
    backend.fail_next = True
    with pytest.raises(InferenceFailed) as info:
        batcher.submit(_feeds(1), request_id="req-1").result(5)
    assert info.value.request_id == "req-1"
    assert "simulated backend failure" in caplog.text and "Traceback" in caplog.text
    assert batcher.submit(_feeds(2)).result(5)["logits"].shape == (2, 10)


def test_full_queue_raises_queue_full(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=1, max_delay=0.0, max_queue=2)
    backend.gate = threading.Event()
    backend.calls.clear()
    first = batcher.submit(_feeds(1))
    _wait_for(lambda: bool(backend.calls))
    queued = [batcher.submit(_feeds(1)) for _ in range(2)]
    with pytest.raises(QueueFull) as info:
        batcher.submit(_feeds(1))
    assert info.value.retry_after > 0
    backend.gate.set()
    for f in [first, *queued]:
        assert f.result(5)["logits"].shape == (1, 10)


def test_cancelled_request_is_not_run(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(_feeds(1, 0.9))
    _wait_for(lambda: bool(backend.calls))
    gone = batcher.submit(_feeds(1, -0.9))
    assert gone.cancel()
    kept = batcher.submit(_feeds(1, 0.0))
    backend.gate.set()
    busy.result(5)
    kept.result(5)
    assert len(backend.calls) == 2  # the cancelled one never reached the backend


def test_deadline_expires_in_queue(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(_feeds(1))
    _wait_for(lambda: bool(backend.calls))
    late = batcher.submit(_feeds(1), timeout=0.01)
    time.sleep(0.05)
    backend.gate.set()
    busy.result(5)
    with pytest.raises(RequestTimeout):
        late.result(5)


def test_close_drains_queued_requests_then_refuses(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=2, max_delay=0.0)
    backend.delay = 0.02
    futs = [batcher.submit(_feeds(1)) for _ in range(6)]
    batcher.close(drain=True, timeout=5)
    assert all(f.result(0)["logits"].shape == (1, 10) for f in futs)
    assert not batcher.ready
    with pytest.raises(BatcherClosed):
        batcher.submit(_feeds(1))


def test_close_without_drain_fails_queued(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(_feeds(1))
    _wait_for(lambda: bool(backend.calls))
    waiting = batcher.submit(_feeds(1))
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
        b.submit(_feeds(1))
    b.close(timeout=5)


def test_submit_checks_batch_axis(started) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = started()
    with pytest.raises(InputError):
        batcher.submit({"images": np.zeros((0, 1, 28, 28), np.float32)})
    with pytest.raises(InputError):
        batcher.submit({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})


def test_wait_result_timeout_and_disconnect_cancel_the_future() -> None:
    async def scenario() -> None:
        fut: Future[dict[str, np.ndarray]] = Future()
        with pytest.raises(RequestTimeout):
            await wait_result(fut, timeout=0.02, poll=0.01)
        assert fut.cancelled()

        fut2: Future[dict[str, np.ndarray]] = Future()

        async def gone() -> bool:
            return True

        with pytest.raises(Exception, match="disconnected"):
            await wait_result(fut2, timeout=None, is_disconnected=gone, poll=0.01)
        assert fut2.cancelled()

        fut3: Future[dict[str, np.ndarray]] = Future()
        threading.Timer(0.02, lambda: fut3.set_result({"y": np.ones(1)})).start()
        assert (await wait_result(fut3, timeout=1.0, poll=0.01))["y"][0] == 1.0

    asyncio.run(scenario())


def test_batch_closes_at_once_when_nothing_more_is_coming() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item())
    batch, _ = collect(q, max_items=8, max_delay=5.0, first_timeout=0, clock=clock, more_coming=lambda: False)
    assert len(batch) == 1 and clock.now == 100.0  # no wait for a lone request
    q.put(item())
    batch, _ = collect(q, max_items=8, max_delay=5.0, first_timeout=0, clock=clock, more_coming=lambda: True)
    assert len(batch) == 1 and clock.now == pytest.approx(105.0)  # a request was on its way: waited


def test_announce_counts_requests_on_their_way(started) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = started(max_batch=8, max_delay=2.0)
    backend.calls.clear()
    t0 = time.monotonic()
    assert batcher.submit(_feeds(1)).result(10)["logits"].shape == (1, 10)
    assert time.monotonic() - t0 < 1.5  # nothing announced: the 2 s window is skipped
    with batcher.announce():
        first = batcher.submit(_feeds(1))
        time.sleep(0.05)
        assert not first.done()  # the worker waits for the announced request
        second = batcher.submit(_feeds(1))
    first.result(10), second.result(10)
    assert [n for n, _ in backend.calls] == [1, 2]


def test_dynamic_batching_amortizes_a_per_call_cost(classify_bundle) -> None:  # type: ignore[no-untyped-def]
    """When a call costs the same for 1 or 32 images (a GPU), 32 concurrent clients need a third of the
    calls or fewer. Calls are counted, not timed: a loaded machine slows both runs, not the count."""
    made: list[FakeBackend] = []

    def run(max_batch: int) -> int:
        def factory() -> FakeBackend:
            b = FakeBackend(classify_bundle)
            b.delay = 0.01
            made.append(b)
            return b

        batcher = Batcher(factory, name="amortize", max_batch=max_batch, max_delay=0.005, warmup=False).start()
        assert batcher.wait_ready(5)
        done = threading.Barrier(33)

        def client() -> None:
            for _ in range(4):
                batcher.submit(_feeds(1)).result(10)
            done.wait(30)

        for _ in range(32):
            threading.Thread(target=client, daemon=True).start()
        done.wait(60)
        batcher.close(timeout=5)
        calls = made[-1].calls
        assert sum(n for n, _ in calls) == 128
        return len(calls)

    assert run(1) == 128
    assert run(32) * 3 <= 128
