"""The load generator's HTTP client against tests/bench/fake_server.py: exact request counts, merged
percentiles, errors by status, keep-alive reuse, chunked answers, servers that close connections, and
several client processes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kiln.bench.client import ProtocolError, _read_chunked, parse_head
from kiln.bench.loadgen import LoadConfig, run_load

from .fake_server import MODEL, FakeState, fake_server


def _one_level(state: FakeState, **kw: object) -> dict:
    opts: dict = {"concurrency": [3], "duration": 30.0, "warmup": 0, "max_requests": 30, **kw}
    with fake_server(state) as url:
        report = run_load(LoadConfig(url=url, model=MODEL, **opts))  # type: ignore[arg-type]
    (level,) = report["levels"]
    return level


def test_request_count_and_percentiles_of_the_samples() -> None:
    state = FakeState()
    lv = _one_level(state)
    # The cap ends the level long before the 30 s: every request is counted once, on both sides.
    assert lv["requests"] == lv["ok"] == 30 == state.calls
    assert lv["elapsed_s"] < 10
    samples = np.asarray(lv["samples_ms"])
    assert len(samples) == lv["latency_ms"]["count"] == 30
    for q in (50, 90, 99):
        assert lv["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(samples, q), abs=1e-3)


def test_errors_are_counted_by_status() -> None:
    state = FakeState(fail_every=3, fail_status=503)
    lv = _one_level(state)
    assert lv["requests"] == 30 and lv["ok"] == 20 and lv["errors"] == {"503": 10}
    assert lv["latency_ms"]["count"] == 20  # percentiles are of successful requests only


def test_keep_alive_reuses_one_connection_per_concurrent_request() -> None:
    state = FakeState()
    lv = _one_level(state, concurrency=[4], max_requests=40)
    assert lv["connections_opened"] == 4 and lv["retries"] == 0
    used = [n for n in state.posts_per_connection if n]
    assert len(used) == 4 and sum(used) == 40


def test_chunked_answers_are_read_to_the_end() -> None:
    state = FakeState(chunked=True)
    lv = _one_level(state)
    assert lv["ok"] == 30 and lv["errors"] == {}
    assert lv["connections_opened"] == 3  # the trailer was consumed: the connections stayed usable


def test_connection_close_answers_reconnect() -> None:
    state = FakeState(close_every=2)
    lv = _one_level(state, concurrency=[2])
    assert lv["ok"] == 30 and lv["errors"] == {}
    # 15 answers closed their connection; the client never reused one of those, so it never had to retry.
    assert lv["connections_opened"] == sum(1 for n in state.posts_per_connection if n) >= 15
    assert lv["retries"] == 0


def test_a_server_closing_without_saying_so_costs_no_request() -> None:
    state = FakeState(drop_every=3)
    lv = _one_level(state, concurrency=[2])
    assert lv["ok"] == 30 and lv["errors"] == {}
    assert lv["connections_opened"] > 2
    # Requests sent again after a reused connection turned out closed reach the server once more at most.
    assert state.calls == 30


def test_client_processes_split_the_level_and_merge_samples() -> None:
    state = FakeState(fail_every=5)
    with fake_server(state) as url:
        report = run_load(LoadConfig(url=url, model=MODEL, concurrency=[4, 1], duration=30.0, warmup=4,
                                     max_requests=40, client_procs=2))
    four, one = report["levels"]
    assert four["client_procs"] == 2 and one["client_procs"] == 1  # one connection needs one process
    assert four["requests"] == 40 and one["requests"] == 40
    assert four["connections_opened"] == 4
    assert four["ok"] + four["errors"].get("503", 0) == 40 and len(four["samples_ms"]) == four["ok"]
    assert four["client_cpu_s"] > 0 and report["client"]["procs"] == 2
    assert state.calls == 2 * (40 + 4)
    assert four["server_batch_size"]["batches"] == four["ok"]


def test_open_loop_over_two_processes() -> None:
    state = FakeState()
    with fake_server(state) as url:
        report = run_load(LoadConfig(url=url, model=MODEL, rate=100, duration=0.5, warmup=0, client_procs=2))
    (lv,) = report["levels"]
    assert lv["client_procs"] == 2 and 20 <= lv["requests"] <= 90
    assert lv["errors"] == {} and lv["schedule_lag_ms"]["count"] == lv["requests"]


def test_parse_head() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n") == (200, 12, False, True)
    assert parse_head(b"HTTP/1.1 503 Busy\r\nconnection: Close\r\n\r\n") == (503, None, False, False)
    assert parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n") == (
        200,
        None,
        True,
        True,
    )
    assert parse_head(b"HTTP/1.0 200 OK\r\n\r\n")[3] is False
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")[3] is True
    with pytest.raises(ProtocolError):
        parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_read_chunked() -> None:
    async def read(data: bytes) -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await _read_chunked(reader), await reader.read()

    assert asyncio.run(read(b"3\r\nabc\r\nA;x=y\r\n0123456789\r\n0\r\nT: 1\r\n\r\nNEXT")) == (13, b"NEXT")
    with pytest.raises(ProtocolError):
        asyncio.run(read(b"zz\r\n"))
