"""The decode threads' wait is first come, first served and bounded: a freed slot goes to the request that
has waited longest, a newcomer never overtakes it, a cancelled request gives its place up, and once
``max_decode_queue`` requests wait the next is refused at once with 503 + Retry-After in its protocol's
error shape (/v1's and /v2's), through the app ``kiln serve`` runs."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kiln.bundle import Bundle
from kiln.serve.app import create_app
from kiln.serve.batching import QueueFull
from kiln.serve.images import INLINE_PIXELS, DecodePool
from kiln.serve.settings import Settings

from .conftest import FakeBackend


async def _until(check: Any, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "condition not reached before the deadline"
        await asyncio.sleep(0.001)


def test_a_freed_slot_goes_to_the_request_that_waited_longest() -> None:
    async def main() -> list[int]:
        pool = DecodePool(1, 10)
        await pool.acquire()
        order: list[int] = []

        async def request(i: int) -> None:
            async with pool:
                order.append(i)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(request(i)))
            await _until(lambda n=i + 1: pool.waiting == n)  # arrival order is creation order
        pool.release()
        late = asyncio.create_task(request(99))  # arrives after the release: must not overtake
        await asyncio.gather(*tasks, late)
        return order

    assert asyncio.run(main()) == [0, 1, 2, 3, 4, 99]


def test_a_full_wait_is_refused_at_once() -> None:
    async def main() -> None:
        pool = DecodePool(1, 2)
        await pool.acquire()
        waiting = [asyncio.create_task(pool.acquire()) for _ in range(2)]
        await _until(lambda: pool.waiting == 2)
        with pytest.raises(QueueFull, match="max_decode_queue 2"):
            await pool.acquire()
        pool.release()
        await _until(lambda: pool.waiting == 1)
        third = asyncio.create_task(pool.acquire())  # room again: it waits instead of being refused
        await _until(lambda: pool.waiting == 2)
        # the first two holders are done: the slot goes on to the second waiter, then the third
        for _ in range(2):
            pool.release()
        await asyncio.gather(*waiting, third)
        assert (pool.busy, pool.waiting) == (1, 0)

    asyncio.run(main())


def test_a_cancelled_request_gives_its_place_up() -> None:
    async def main() -> list[str]:
        pool = DecodePool(1, 10)
        await pool.acquire()
        order: list[str] = []

        async def request(name: str) -> None:
            async with pool:
                order.append(name)

        gone = asyncio.create_task(request("gone"))
        await _until(lambda: pool.waiting == 1)
        kept = asyncio.create_task(request("kept"))
        await _until(lambda: pool.waiting == 2)
        gone.cancel()
        await _until(lambda: pool.waiting == 1)
        pool.release()
        await kept
        assert pool.busy == 0
        return order

    assert asyncio.run(main()) == ["kept"]


def test_a_running_decode_keeps_its_thread_when_its_request_is_cancelled() -> None:
    async def main() -> None:
        pool = DecodePool(1, 10)
        gate = threading.Event()
        running = asyncio.create_task(pool.run(gate.wait, 10))
        await _until(lambda: pool.busy == 1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert pool.busy == 1  # the thread is still decoding: the next request must not start beside it
        gate.set()
        await _until(lambda: pool.busy == 0)
        assert await pool.run(sum, [1, 2]) == 3
        pool.close()

    asyncio.run(main())


# ---- through the app ----------------------------------------------------------------------------


def _big_png() -> bytes:
    """A PNG over the inline decode size (so it goes to the decode threads) and over /v2's inline body
    size (noise does not compress)."""
    side = int(INLINE_PIXELS**0.5) + 64
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def full_decode_wait(classify_bundle: Bundle) -> Iterator[TestClient]:
    """A server with one decode thread held and its one waiting place taken."""
    app = create_app([("digits", classify_bundle)],
                     Settings(decode_threads=1, max_decode_queue=1, max_delay_ms=1.0),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    with TestClient(app, raise_server_exceptions=False) as client:
        end = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.01)
        pool: DecodePool = app.state.decode_slots
        portal = client.portal  # type: ignore[attr-defined]
        portal.call(pool.acquire)
        waiter = portal.start_task_soon(pool.acquire)
        end = time.monotonic() + 10
        while portal.call(lambda: pool.waiting) != 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        yield client
        portal.call(pool.release)
        waiter.result(10)
        portal.call(pool.release)


def test_v1_answers_503_with_retry_after_when_the_decode_wait_is_full(full_decode_wait: TestClient) -> None:
    resp = full_decode_wait.post("/v1/models/digits/predict",
                                 files={"file": ("a.png", _big_png(), "image/png")})
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "queue_full"
    assert "max_decode_queue" in resp.json()["error"]["message"]


def test_v2_answers_503_in_its_shape_when_the_decode_wait_is_full(full_decode_wait: TestClient) -> None:
    blob = _big_png()
    header = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob) + 4}}]}).encode()
    resp = full_decode_wait.post("/v2/models/digits/infer",
                                 content=header + struct.pack("<I", len(blob)) + blob,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and "max_decode_queue" in body["error"]


def test_a_decode_after_the_wait_clears_is_served(classify_bundle: Bundle) -> None:
    app = create_app([("digits", classify_bundle)],
                     Settings(decode_threads=1, max_decode_queue=1, max_delay_ms=1.0),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    with TestClient(app, raise_server_exceptions=False) as client:
        end = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.01)
        resp = client.post("/v1/models/digits/predict", files={"file": ("a.png", _big_png(), "image/png")})
        assert resp.status_code == 200, resp.text
        assert app.state.decode_slots.busy == 0
