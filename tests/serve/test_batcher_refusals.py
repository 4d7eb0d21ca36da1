"""What a client is told when the batcher refuses a request or gives up on it: a full queue (and when
to retry), a request the queue could never hold, a closed or failed batcher naming the model, a deadline
reached in the queue, a cancelled request never run, and the wait for a result (timeout, disconnect,
the messages)."""

from __future__ import annotations

import asyncio
import threading
import time
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
from tests.polling import eventually

from .batching_helpers import feeds, occupy
from .conftest import FakeBackend


def test_full_queue_raises_queue_full(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=1, max_delay=0.0, max_queue=2)
    backend.gate = threading.Event()
    backend.calls.clear()
    first = batcher.submit(feeds(1))
    assert eventually(lambda: bool(backend.calls))
    queued = [batcher.submit(feeds(1)) for _ in range(2)]
    with pytest.raises(QueueFull) as info:
        batcher.submit(feeds(1))
    assert info.value.retry_after > 0
    backend.gate.set()
    for f in [first, *queued]:
        assert f.result(5)["logits"].shape == (1, 10)


def test_cancelled_request_is_not_run(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(feeds(1, 0.9))
    assert eventually(lambda: bool(backend.calls))
    gone = batcher.submit(feeds(1, -0.9))
    assert gone.cancel()
    kept = batcher.submit(feeds(1, 0.0))
    backend.gate.set()
    busy.result(5)
    kept.result(5)
    assert len(backend.calls) == 2  # the cancelled one never reached the backend


def test_deadline_expires_in_queue(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(feeds(1))
    assert eventually(lambda: bool(backend.calls))
    submitted = time.monotonic()
    late = batcher.submit(feeds(1), timeout=0.01)
    assert eventually(lambda: time.monotonic() > submitted + 0.02)  # its deadline passed in the queue
    backend.gate.set()
    busy.result(5)
    with pytest.raises(RequestTimeout):
        late.result(5)


def test_submit_checks_batch_axis(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher()
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


def test_refusals_name_the_model(start_batcher, classify_bundle) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher()
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


def test_a_request_the_queue_could_never_hold_is_an_input_error(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=4, max_queue=2)
    with pytest.raises(InputError) as info:
        batcher.submit(feeds(9))
    assert str(info.value) == ("request of 9 items needs 3 batches of 4, more than the queue holds (2); "
                               "send at most 8 items per request")
    assert batcher.submit(feeds(8)).result(5)["logits"].shape == (8, 10)


def test_queue_full_names_the_model_and_the_queue_size(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=1, max_delay=0.0, max_queue=1)
    busy = occupy(batcher, backend)
    queued = batcher.submit(feeds(1))
    with pytest.raises(QueueFull,
                       match=r"^model 'digits' queue is full \(1 requests waiting\); retry later$"):
        batcher.submit(feeds(1))
    backend.gate.set()
    assert busy.result(5) and queued.result(5)


def test_a_request_without_an_id_is_named_after_the_model(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_delay=0.0)
    backend.fail_next = True
    with pytest.raises(InferenceFailed) as info:
        batcher.submit(feeds(1)).result(5)
    assert info.value.request_id.startswith("digits-") and info.value.request_id[7:].isdigit()
    assert str(info.value) == "inference failed (RuntimeError); see the server log"


def test_close_without_drain_fails_what_is_queued_naming_the_model(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=1, max_delay=0.0)
    busy = occupy(batcher, backend)
    waiting = batcher.submit(feeds(1))
    threading.Timer(0.05, backend.gate.set).start()
    batcher.close(drain=False, timeout=5)
    assert busy.result(0)
    with pytest.raises(BatcherClosed, match="^model 'digits' stopped before the request ran$"):
        waiting.result(0)


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


def test_queue_full_asks_to_retry_after_a_second_by_default() -> None:
    assert QueueFull("full").retry_after == 1.0 and QueueFull("full", 2.5).retry_after == 2.5
    err = InferenceFailed("inference failed", "r7")
    assert (str(err), err.request_id) == ("inference failed", "r7")


def test_queue_full_keeps_its_message() -> None:
    assert str(QueueFull("model 'digits' queue is full")) == "model 'digits' queue is full"
