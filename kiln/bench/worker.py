"""One client process's part of a load level, and the client processes that run them.

A :class:`Share` is what one process sends in one level: its connections (closed loop) or its part of
the rate (open loop), its part of the warm-up and of the request cap. The process opens and warms its
connections, waits at a gate until every process is warm and the server's ``/metrics`` has been read,
and then all start timing at the same ``time.monotonic`` instant (one clock for every process).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import random
import ssl
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.bench.client import Connection, Endpoint, ProtocolError, StaleConnection
from kiln.errors import KilnError

# Open loop: one warm connection per this many requests/s of the rate, opened before timing starts.
RATE_PER_WARM_CONNECTION = 100


# ---- one client process's part of a level --------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """What one client process sends in one level. Picklable: it travels to the client processes."""

    mode: str  # "concurrency" | "rate"
    endpoint: Endpoint
    payload: bytes
    concurrency: int  # closed loop: connections; open loop: cap on requests in flight
    rate: float
    duration: float
    max_requests: int
    warmup: int
    timeout: float
    seed: int


@dataclass
class ShareResult:
    """What one client process measured; times are ``time.monotonic`` values, shared by all processes."""

    latencies_ms: array = field(default_factory=lambda: array("d"))
    statuses: Counter[str] = field(default_factory=Counter)
    lag_ms: array = field(default_factory=lambda: array("d"))
    dropped: int = 0
    connections: int = 0  # opened, warm-up included: with keep-alive, one per concurrent request
    retries: int = 0  # requests sent again on a new connection after a reused one turned out closed
    cpu_s: float = 0.0
    start: float = 0.0
    end: float = 0.0  # closed loop: the last request done; open loop: the last arrival
    drained: float = 0.0  # the last request done


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal whole parts, the larger first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


class _ShareRunner:
    """Runs one :class:`Share` on this process's event loop."""

    def __init__(self, share: Share) -> None:
        self.share = share
        self.result = ShareResult()
        self.ssl = ssl.create_default_context() if share.endpoint.tls else None

    async def connect(self) -> Connection:
        conn = await Connection.open(self.share.endpoint, self.ssl)
        self.result.connections += 1
        return conn

    async def request(self, conn: Connection | None) -> tuple[str, Connection | None]:
        """One request on ``conn`` (opened first when missing or closed): (status or error name,
        conn to reuse)."""
        try:
            async with asyncio.timeout(self.share.timeout):
                return await self._exchange(conn)
        except TimeoutError:
            status = "timeout"
        except ProtocolError:
            status = "ProtocolError"
        except ConnectionRefusedError:
            status = "ConnectError"
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            status = "ReadError"
        if conn is not None:
            conn.close()  # an answer cut short leaves the stream at an unknown position
        return status, None

    async def _exchange(self, conn: Connection | None) -> tuple[str, Connection | None]:
        reused = conn is not None and conn.usable
        if conn is not None and not reused:
            conn.close()
        live = conn if conn is not None and reused else await self.connect()
        try:
            status, _ = await live.exchange(self.share.payload)
        except StaleConnection:
            # A keep-alive race: the server closed the idle connection as it was reused. Nothing of the
            # request was answered, so it is sent once more, on a new connection.
            live.close()
            self.result.retries += 1
            live = await self.connect()
            try:
                status, _ = await live.exchange(self.share.payload)
            except StaleConnection:
                live.close()
                return "ReadError", None
        return str(status), live if live.usable else None

    def record(self, status: str, t0: float) -> None:
        ms = (time.perf_counter() - t0) * 1000.0
        self.result.statuses[status] += 1
        if status[0] == "2":
            self.result.latencies_ms.append(ms)

    async def warm(self, connections: int) -> list[Connection | None]:
        """Open ``connections`` and send the warm-up requests over them; nothing here is recorded."""
        opened = await asyncio.gather(*(self.connect() for _ in range(connections)), return_exceptions=True)
        conns: list[Connection | None] = [c if isinstance(c, Connection) else None for c in opened]
        left = self.share.warmup

        async def worker(i: int) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                _, conns[i] = await self.request(conns[i])

        await asyncio.gather(*(worker(i) for i in range(min(len(conns), left))))
        return conns

    async def closed_loop(self, conns: list[Connection | None], start: float) -> None:
        share, res = self.share, self.result
        deadline = start + share.duration
        sent = 0

        async def worker(i: int) -> None:
            nonlocal sent
            conn = conns[i]
            while sent < share.max_requests and time.monotonic() < deadline:
                sent += 1
                t0 = time.perf_counter()
                status, conn = await self.request(conn)
                self.record(status, t0)
            conns[i] = conn

        await asyncio.gather(*(worker(i) for i in range(len(conns))))
        res.end = res.drained = time.monotonic()

    async def open_loop(self, idle: list[Connection], start: float) -> None:
        share, res = self.share, self.result
        rng = random.Random(share.seed)
        inflight: set[asyncio.Task[None]] = set()

        async def one(scheduled: float) -> None:
            res.lag_ms.append((time.monotonic() - scheduled) * 1000.0)
            t0 = time.perf_counter()
            status, conn = await self.request(idle.pop() if idle else None)
            self.record(status, t0)
            if conn is not None:
                idle.append(conn)

        at = start
        for _ in range(share.max_requests):
            at += rng.expovariate(share.rate)
            if at - start > share.duration:
                break
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= share.concurrency:
                res.dropped += 1
                continue
            task = asyncio.create_task(one(at))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        # Rates are per arrival window: the drain below would otherwise dilute them on a slow server.
        res.end = time.monotonic()
        if inflight:
            # Bounded: every request has its own timeout.
            await asyncio.wait(set(inflight), timeout=share.timeout + 5)
        res.drained = time.monotonic()

    async def run(self, gate: Callable[[], float]) -> ShareResult:
        share = self.share
        if share.mode == "concurrency":
            conns = await self.warm(share.concurrency)
        else:
            per = max(1, math.ceil(share.rate / RATE_PER_WARM_CONNECTION))
            conns = await self.warm(min(share.concurrency, per))
        # Blocking on purpose: every process waits here until the /metrics scrape before the level is done.
        start = gate()
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = time.process_time()
        self.result.start = start
        try:
            if share.mode == "concurrency":
                await self.closed_loop(conns, start)
            else:
                idle = [c for c in conns if c is not None and c.usable]
                conns = list[Connection | None](idle)  # the pool the open loop takes from and gives back to
                await self.open_loop(idle, start)
        finally:
            self.result.cpu_s = time.process_time() - cpu0
            for c in conns:
                if c is not None:
                    c.close()
        return self.result


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # about half the CPU per request of the default loop
    except ImportError:
        return None
    return uvloop.new_event_loop


def client_loop_name() -> str:
    return "asyncio" if _loop_factory() is None else "uvloop"


def run_share(share: Share, gate: Callable[[], float]) -> ShareResult:
    """Run one share on a new event loop; ``gate()`` is called once warm and returns the start time."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_ShareRunner(share).run(gate))


# ---- client processes ----------------------------------------------------------------------------


def _client_main(pipe: Any) -> None:
    """A client process: run the shares it is sent until it is sent None."""

    def gate() -> float:
        pipe.send(("ready", None))
        return float(pipe.recv())

    while (share := pipe.recv()) is not None:
        try:
            pipe.send(("done", run_share(share, gate)))
        except Exception:
            pipe.send(("error", traceback.format_exc()))


class ClientProcesses:
    """``n`` client processes kept for every level of a run (started once: a process costs a second)."""

    def __init__(self, n: int) -> None:
        # spawn: forking a process that runs threads (a server in the same process) can deadlock.
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(child,), daemon=True, name="kiln-bench-client")
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def _recv(self, i: int, expect: str) -> Any:
        try:
            kind, value = self.pipes[i].recv()
        except EOFError:
            raise KilnError(f"client process {i} exited (exit code {self.procs[i].exitcode})") from None
        if kind == "error":
            raise KilnError(f"client process {i} failed:\n{value}")
        if kind != expect:
            raise KilnError(f"client process {i} answered {kind}, expected {expect}")
        return value

    def run(self, shares: list[Share], before: Callable[[], None]) -> list[ShareResult]:
        """Run the shares, one per process; ``before()`` runs once all are warm, right before timing."""
        for pipe, share in zip(self.pipes, shares, strict=False):
            pipe.send(share)
        for i in range(len(shares)):
            self._recv(i, "ready")
        before()
        start = time.monotonic() + 0.01  # the same instant for every process, a little ahead
        for pipe in self.pipes[: len(shares)]:
            pipe.send(start)
        return [self._recv(i, "done") for i in range(len(shares))]

    def close(self) -> None:
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            with contextlib.suppress(OSError):  # a process that died has closed its end
                pipe.send(None)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            pipe.close()
