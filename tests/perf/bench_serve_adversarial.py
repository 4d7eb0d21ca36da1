"""Well-behaved clients beside bad ones, against one ``kiln serve``: disconnects mid-upload, decode bombs,
slow request heads (slowloris) and element floods.

    .venv/bin/python tests/perf/bench_serve_adversarial.py BUNDLE [--seconds 60] [--slow 1100]
        [--json out.json]

Two runs of ``--seconds`` each on the same server (defaults, ONNX Runtime, one intra-op thread, gRPC on):
1. quiet: wrk (``-t1``) with 58 well-behaved connections posting one digit PNG as JSON;
2. the same wrk load, plus
   - 6 connections (10% of 64) that send a request head and part of its body, then disconnect, over and
     over (a new connection each time);
   - 1 keep-alive connection (1-2%) posting decode bombs (a 6000x6000 palette PNG, 6 KB as JSON, 36 Mpx
     decoded) one after another;
   - ``--slow`` connections sending their request head at 1 byte/s (a new connection whenever the server
     closes one: the head deadline answers 408);
   - 1 connection posting a KServe v2 JSON request whose ``data`` holds 6M values for a 784-value input
     (12 MB), one after another;
   - 1 gRPC channel sending ``ModelInfer`` with a BYTES input of shape [1] holding 20 MB of empty
     elements (5M length prefixes), one after another.
Reported: the good clients' p50 and p99 in each run and their ratio, their non-2xx, 5xx answered by the
server (its /metrics), what each kind of bad client got, and the server's RSS growth over the adversarial
run. Not collected by pytest. Needs Debian's wrk (``apt-get install wrk``) and tritonclient[grpc].
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
import resource
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_wrk import Proc, _free_port, digit_png, environment, lua_script, wrk  # noqa: E402

GOOD, DISCONNECTORS, BOMBERS = 58, 6, 1
# Element floods: 6M values for an input of 784, and 20 MB of BYTES elements (4-byte length prefixes, empty).
JSON_FLOOD_VALUES = 6_000_000
GRPC_FLOOD_BYTES = 20_000_000


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


async def _slow_head(port: int, stop: float, counts: dict[str, int]) -> None:
    """A request head at 1 byte/s; a new connection each time the server closes one."""
    head = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\nX-Slow: " + b"a" * 4096 + b"\r\n\r\n"
    )
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["slow_connect_errors"] = counts.get("slow_connect_errors", 0) + 1
            await asyncio.sleep(1)
            continue
        answer = b""
        try:
            for i in range(len(head)):
                if time.monotonic() >= stop:
                    break
                writer.write(head[i:i + 1])
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(200), 1.0)
                except TimeoutError:
                    continue
                break
        except OSError:
            answer = b"reset"
        writer.close()
        if answer:
            key = "slow_" + (answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else
                             "reset" if answer == b"reset" else "other")
            counts[key] = counts.get(key, 0) + 1
        elif time.monotonic() < stop:
            counts["slow_closed"] = counts.get("slow_closed", 0) + 1


def json_flood_body() -> bytes:
    return (b'{"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ['
            + b"0," * (JSON_FLOOD_VALUES - 1) + b"0]}]}")


async def _json_flooder(port: int, stop: float, counts: dict[str, int]) -> None:
    """v2 JSON requests with far more values than the input holds, one after another on new connections."""
    body = json_flood_body()
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + body)
            await writer.drain()
            status = (await reader.readline()).split()[1].decode()
            await reader.read()
            writer.close()
            counts[f"json_flood_{status}"] = counts.get(f"json_flood_{status}", 0) + 1
        except (OSError, IndexError):
            counts["json_flood_errors"] = counts.get("json_flood_errors", 0) + 1
            await asyncio.sleep(0.1)


def grpc_flooder(grpc_port: int, stop: float, counts: dict[str, int]) -> None:
    """gRPC ModelInfer with a BYTES input of shape [1] and 20 MB of empty elements, one after another."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "images", "BYTES"
    tensor.shape.extend([1])
    request.raw_input_contents.append(b"\0\0\0\0" * (GRPC_FLOOD_BYTES // 4))
    limit = GRPC_FLOOD_BYTES + (1 << 20)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                               options=[("grpc.max_send_message_length", limit)]) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < stop:
            try:
                stub.ModelInfer(request, timeout=60)
                key = "grpc_flood_OK"
            except grpc.RpcError as exc:
                key = f"grpc_flood_{exc.code().name}"
            counts[key] = counts.get(key, 0) + 1


KINDS = ("disconnect", "bomb", "slow", "json-flood", "grpc-flood")


def bad_clients(port: int, grpc_port: int, kinds: set[str], slow: int, seconds: float, out: Any) -> None:
    counts: dict[str, int] = {"disconnects": 0, "connect_errors": 0}
    stop = time.monotonic() + seconds
    flood = threading.Thread(target=grpc_flooder, args=(grpc_port, stop, counts))
    if "grpc-flood" in kinds:
        flood.start()

    async def run() -> None:
        await asyncio.gather(
            *[_disconnector(port, stop, counts) for _ in range(DISCONNECTORS * ("disconnect" in kinds))],
            *[_bomber(port, stop, counts) for _ in range(BOMBERS * ("bomb" in kinds))],
            *[_slow_head(port, stop, counts) for _ in range(slow * ("slow" in kinds))],
            *[_json_flooder(port, stop, counts) for _ in range("json-flood" in kinds)],
        )

    asyncio.run(run())
    if flood.is_alive():
        flood.join()
    out.put(counts)


def server_5xx(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        int(float(m.group(1)))
        for m in re.finditer(r'^kiln_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)', text, re.M)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--slow", type=int, default=1100, help="slow-head (slowloris) connections")
    ap.add_argument("--bad", default=",".join(KINDS),
                    help=f"bad clients to run, of {','.join(KINDS)} (default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    kinds = {k.strip() for k in args.bad.split(",") if k.strip()}
    if kinds - set(KINDS):
        ap.error(f"--bad: unknown {sorted(kinds - set(KINDS))}; known: {', '.join(KINDS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this process holds the slow connections
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 16, hard))
    work = Path(tempfile.mkdtemp())
    lua = lua_script(work, json.dumps({"images": [base64.b64encode(digit_png()).decode()]}).encode())
    port, grpc_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "serve", args.bundle, "--name", "digits", "--port", str(port),
           "--grpc-port", str(grpc_port), "--backend", "onnxrt", "--threads", "1"]
    report: dict[str, Any] = {"env": environment(), "cmd": " ".join(["kiln", *cmd[3:]]),
                              "seconds": args.seconds,
                              "bad": sorted(kinds), "slow_clients": args.slow if "slow" in kinds else 0}
    server = Proc("kiln", cmd, port)
    path = "/v1/models/digits/predict"
    try:
        wrk(port, path, lua, 8, 2)
        report["quiet"] = wrk(port, path, lua, GOOD, args.seconds)
        print(f"quiet       {report['quiet']}", flush=True)
        rss0 = server.rss_mb()
        q: Any = mp.Queue()
        bad = mp.Process(target=bad_clients, args=(port, grpc_port, kinds, args.slow, args.seconds, q))
        bad.start()
        time.sleep(min(5.0, args.seconds / 4))  # the slow clients connect before the good ones are timed
        report["adversarial"] = wrk(port, path, lua, GOOD, args.seconds)
        report["bad_clients"] = q.get(timeout=args.seconds + 120)
        bad.join(60)
        time.sleep(1)
        report["rss_growth_mb"] = round(server.rss_mb() - rss0, 1)
        report["server_5xx"] = server_5xx(port)
        print(f"adversarial {report['adversarial']}", flush=True)
        print(f"bad clients {report['bad_clients']}", flush=True)
        quiet, adv = report["quiet"], report["adversarial"]
        if adv["requests"]:
            report["p50_ratio"] = adv["p50_ms"] / quiet["p50_ms"]
            report["p99_ratio"] = adv["p99_ms"] / quiet["p99_ms"]
            print(f"good clients' p50: {quiet['p50_ms']:.1f} ms -> {adv['p50_ms']:.1f} ms "
                  f"(x{report['p50_ratio']:.2f}); "
                  f"p99: {quiet['p99_ms']:.1f} ms -> {adv['p99_ms']:.1f} ms (x{report['p99_ratio']:.2f}); ",
                  end="")
        else:
            print("no good request completed while the bad clients ran (wrk: "
                  f"{adv['socket_errors'] or 'no errors'}); ",
                  end="")
        print(f"good non-2xx {adv['non2xx']}; server 5xx {report['server_5xx']}; RSS growth "
              f"{report['rss_growth_mb']} MB; "
              f"load average {os.getloadavg()}")
    finally:
        server.stop()
    report["env"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["adversarial"]["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
