"""The batcher's worker running batches (serve/batcher.py): it owns the backend and runs every call on
its own thread, batches concurrent requests, splits what exceeds the batch cap (its own or the
backend's) and joins it again, fails only the batch whose call raised or returned the wrong batch size,
reports each batch to the hooks, and amortizes a per-call cost over concurrent clients."""

from __future__ import annotations

import threading

import pytest

from kiln.serve.batcher import (
    Batcher,
    InferenceFailed,
)
from tests.polling import eventually

from .batching_helpers import feeds
from .conftest import FakeBackend


def test_worker_owns_backend_and_batches_concurrent_requests(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=8, max_delay=60.0)
    backend.calls.clear()
    # Announced as on their way, the requests keep the batch open whatever the machine's load; it closes
    # at max items, before the announcement ends and long before the 60 s delay.
    with batcher.announce():
        futs = [batcher.submit(feeds(1, value=-0.9 + 0.2 * i)) for i in range(8)]  # class i
        outs = [f.result(30) for f in futs]
    assert [n for n, _ in backend.calls] == [8]
    assert {t for _, t in backend.calls} == {"kiln-batcher-digits"}
    # each request gets its own row back
    assert [int(o["logits"][0].argmax()) for o in outs] == list(range(8))
    batcher.close(timeout=5)
    assert backend.closed_on == "kiln-batcher-digits"


def test_request_larger_than_max_batch_is_split_and_rejoined(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=4, max_delay=0.0, backend_max=4)
    backend.calls.clear()
    out = batcher.submit(feeds(10)).result(5)
    assert out["logits"].shape == (10, 10)
    assert sum(n for n, _ in backend.calls) == 10
    assert max(n for n, _ in backend.calls) <= 4


def test_backend_max_batch_caps_configured_max(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher(max_batch=64, backend_max=16)
    assert batcher.max_items == 16


def test_backend_exception_fails_only_that_batch(start_batcher, caplog) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=8, max_delay=0.0)
    backend.fail_next = True
    with pytest.raises(InferenceFailed) as info:
        batcher.submit(feeds(1), request_id="req-1").result(5)
    assert info.value.request_id == "req-1"
    assert "simulated backend failure" in caplog.text and "Traceback" in caplog.text
    assert batcher.submit(feeds(2)).result(5)["logits"].shape == (2, 10)


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

        batcher = Batcher(factory, name="amortize", max_batch=max_batch, max_delay=0.005,
                          warmup=False).start()
        assert batcher.wait_ready(5)
        done = threading.Barrier(33)

        def client() -> None:
            for _ in range(4):
                batcher.submit(feeds(1)).result(10)
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


def test_the_backend_cap_applies_without_a_configured_max(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher(backend_max=16)
    assert batcher.max_items == 16
    assert start_batcher(max_batch=4, backend_max=16)[0].max_items == 4


def test_an_output_of_the_wrong_batch_size_fails_the_batch(start_batcher, caplog) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_delay=0.0)
    real = backend._infer
    backend._infer = lambda f: {k: v[:-1] for k, v in real(f).items()}  # type: ignore[method-assign]
    with pytest.raises(InferenceFailed, match=r"^inference failed \(RuntimeError\); see the server log$"):
        batcher.submit(feeds(2), request_id="r1").result(5)
    assert "model 'digits': inference failed for 2 items (requests r1)" in caplog.messages
    assert "output logits has batch 1, expected 2" in caplog.text


def test_hooks_get_the_items_and_times_and_cannot_stop_the_worker(start_batcher, caplog) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple] = []

    def on_batch(n: int, seconds: float) -> None:
        seen.append(("batch", n, 0 <= seconds < 5))
        raise RuntimeError("metrics down")

    batcher, _ = start_batcher(max_delay=0.0, on_batch=on_batch)

    def on_run(n: int, seconds: float, waits: list[float], *_: float) -> None:
        seen.append(("run", n, 0 <= seconds < 5, len(waits), all(0 <= w < 5 for w in waits)))
        raise RuntimeError("metrics down")

    batcher.on_run = on_run
    assert batcher.submit(feeds(3)).result(5)["logits"].shape == (3, 10)
    assert batcher.submit(feeds(1)).result(5)["logits"].shape == (1, 10)
    assert eventually(lambda: len([s for s in seen if s[0] == "run"]) == 2)
    assert ("batch", 3, True) in seen and ("run", 3, True, 1, True) in seen and ("batch", 1, True) in seen
    assert {"on_batch hook failed", "on_run hook failed"} <= set(caplog.messages)
