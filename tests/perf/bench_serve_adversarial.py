"""Well-behaved clients beside bad ones: disconnects mid-upload and decode bombs, against one ``kiln serve``.

    .venv/bin/python tests/perf/bench_serve_adversarial.py BUNDLE [--seconds 60] [--json out.json]

Two runs of ``--seconds`` each on the same server (defaults, ONNX Runtime, one intra-op thread):
1. baseline: wrk (``-t1``) with 58 well-behaved connections posting one digit PNG as JSON;
2. the same wrk load, plus 6 connections (10% of 64) that send a request head and part of its body,
   then disconnect, over and over (a new connection each time), and 1 keep-alive connection (1-2%)
   that posts decode bombs (a 6000x6000 palette PNG, 6 KB as JSON, 36 Mpx decoded) one after another.
Reported: 5xx among good and bad answers (wrk's non-2xx and the server's own /metrics), the good
clients' p99 in each run and their ratio, and the server's RSS growth across the adversarial run.
Not collected by pytest. Needs Debian's wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_wrk import Proc, _free_port, digit_png, environment, lua_script, wrk  # noqa: E402

GOOD, DISCONNECTORS, BOMBERS = 58, 6, 1


def bomb_body() -> bytes:
    img = Image.new("P", (6000, 6000))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()


async def _disconnector(port: int, stop: float, counts: dict[str, int]) -> None:
    head = (b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    while time.monotonic() < stop:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b'{"images": ["' + b"A" * 4000)
            await writer.drain()
            await asyncio.sleep(0.005)
            writer.transport.abort()  # reset, like a client that went away
            counts["disconnects"] += 1
        except OSError:
            counts["connect_errors"] += 1
            await asyncio.sleep(0.01)


async def _bomber(port: int, stop: float, counts: dict[str, int]) -> None:
    """Decode bombs on one keep-alive connection, one after the other (a new connection when the server
    closes it)."""
    body = bomb_body()
    head = (f"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    reader = writer = None
    while time.monotonic() < stop:
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + body)
            await writer.drain()
            status = (await reader.readline()).split()[1].decode()
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                length = int(value) if name.strip().lower() == "content-length" else length
                close = close or (name.strip().lower() == "connection" and "close" in value.lower())
            await reader.readexactly(length)
            counts[f"bomb_{status}"] = counts.get(f"bomb_{status}", 0) + 1
            if close:
                writer.close()
                reader = writer = None
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            counts["bomb_errors"] = counts.get("bomb_errors", 0) + 1
            if writer is not None:
                writer.close()
            reader = writer = None


def bad_clients(port: int, seconds: float, out: Any) -> None:
    counts: dict[str, int] = {"disconnects": 0, "connect_errors": 0}
    stop = time.monotonic() + seconds

    async def run() -> None:
        await asyncio.gather(*[_disconnector(port, stop, counts) for _ in range(DISCONNECTORS)],
                             *[_bomber(port, stop, counts) for _ in range(BOMBERS)])

    asyncio.run(run())
    out.put(counts)


def server_5xx(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(int(float(m.group(1))) for m in re.finditer(r'^kiln_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)', text, re.M))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    lua = lua_script(work, json.dumps({"images": [base64.b64encode(digit_png()).decode()]}).encode())
    port = _free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "serve", args.bundle, "--name", "digits", "--port", str(port),
           "--backend", "onnxrt", "--threads", "1"]
    report: dict[str, Any] = {"env": environment(), "cmd": " ".join(["kiln", *cmd[3:]]), "seconds": args.seconds}
    server = Proc("kiln", cmd, port)
    path = "/v1/models/digits/predict"
    try:
        wrk(port, path, lua, 8, 2)
        report["baseline"] = wrk(port, path, lua, GOOD, args.seconds)
        print(f"baseline    {report['baseline']}", flush=True)
        rss0 = server.rss_mb()
        q: Any = mp.Queue()
        bad = mp.Process(target=bad_clients, args=(port, args.seconds, q))
        bad.start()
        report["adversarial"] = wrk(port, path, lua, GOOD, args.seconds)
        bad.join(args.seconds + 60)
        report["bad_clients"] = q.get(timeout=10)
        time.sleep(1)
        report["rss_growth_mb"] = round(server.rss_mb() - rss0, 1)
        report["server_5xx"] = server_5xx(port)
        print(f"adversarial {report['adversarial']}", flush=True)
        print(f"bad clients {report['bad_clients']}", flush=True)
        ratio = report["adversarial"]["p99_ms"] / report["baseline"]["p99_ms"]
        report["p99_ratio"] = ratio
        print(f"good clients' p99: {report['baseline']['p99_ms']:.1f} ms -> {report['adversarial']['p99_ms']:.1f} ms "
              f"(x{ratio:.2f}); server 5xx {report['server_5xx']}; RSS growth {report['rss_growth_mb']} MB")
    finally:
        server.stop()
    report["env"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
