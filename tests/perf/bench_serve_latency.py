"""Serving overhead and dynamic batching on a real bundle (issue 5 targets), not collected by pytest.

    .venv/bin/python tests/perf/bench_serve_latency.py /tmp/serve-digits [--soak-s 60] [--json out.json]

1. bare backend: ``backend.infer`` on one preprocessed image (median of 2000 after 200 warm-up), the
   baseline the end-to-end figure is compared with;
2. p50 end-to-end at concurrency 1: JSON ``{"images": [base64 PNG]}`` over keep-alive HTTP;
3. throughput at concurrency 32: the same server with dynamic batching vs ``--max-batch 1``;
4. soak: concurrency 64 for ``--soak-s`` seconds, counting 5xx and the server's RSS growth.

Client and server share the machine's cores; the client's CPU time is printed beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image


def digit_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bare_backend_ms(bundle: str, png: bytes, iters: int = 2000, warmup: int = 200) -> dict[str, Any]:
    from kiln import processing
    from kiln.bench import time_backend
    from kiln.bundle import Bundle
    from kiln.runtime import load

    b = Bundle.load(bundle)
    with load(b, backend="onnxrt") as backend:
        x, _ = processing.preprocess([processing.decode_image(png)], b.manifest.preprocess)
        times_ms, _, _, _ = time_backend(backend, {b.manifest.input.name: x}, warmup, iters, None)
        # the in-process pipeline too: what the server does per request besides HTTP
        pipe = []
        for _ in range(iters // 4):
            t0 = time.perf_counter()
            img = processing.decode_image(base64.b64decode(base64.b64encode(png)))
            x, _ = processing.preprocess([img], b.manifest.preprocess)
            processing.classify_topk(backend.infer({b.manifest.input.name: x})["logits"], b.manifest.classes,
                                     b.manifest.classify_post())
            pipe.append(time.perf_counter() - t0)
        info = {"backend": backend.name, "precision": backend.precision, "device": backend.device}
    return {"infer_p50_ms": statistics.median(times_ms), "pipeline_p50_ms": statistics.median(pipe) * 1e3, **info}


class Server:
    """``kiln serve`` in a subprocess on a free port."""

    def __init__(self, bundle: str, *flags: str) -> None:
        cmd = [sys.executable, "-m", "kiln.cli", "serve", bundle, "--name", "digits", "--port", "0",
               "--backend", "onnxrt", *flags]
        self.cmd = " ".join(["kiln", *cmd[3:]])
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        found = threading.Event()
        self.url = ""

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"serving .* on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(120):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("server not ready:\n" + "".join(self.lines))
            time.sleep(0.1)

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


class Conn:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams.

    httpx's async pool costs more CPU per request than the server under test at 32+ connections on a
    2-core machine (measured: /healthz fell from 333 to 112 requests/s going from 1 to 32 connections),
    so the load generator would be what is measured. This speaks just enough HTTP for one server.
    """

    def __init__(self, url: str, path: str, body: bytes) -> None:
        m = re.match(r"http://([^:/]+):(\d+)", url)
        assert m is not None
        self.host, self.port = m.group(1), int(m.group(2))
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        body = await self.reader.readexactly(length)
        if re.search(rb"(?i)connection: *close", head):
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def sequential_ms(url: str, body: bytes, n: int = 1000, warmup: int = 100) -> dict[str, float]:
    async def run() -> list[float]:
        conn = Conn(url, "/v1/models/digits/predict", body)
        times = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            status, text = await conn.post()
            dt = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"{status}: {text!r}")
            if i >= warmup:
                times.append(dt)
        await conn.close()
        return times

    arr = np.asarray(asyncio.run(run())) * 1e3
    return {"p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
            "p99_ms": float(np.percentile(arr, 99))}


async def _closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    lat: list[float] = []
    end = time.monotonic() + seconds

    async def worker() -> None:
        conn = Conn(url, "/v1/models/digits/predict", body)
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                status, _ = await conn.post()
                statuses[str(status)] += 1
                if status == 200:
                    lat.append(time.perf_counter() - t0)
            except (OSError, asyncio.IncompleteReadError) as exc:
                statuses[type(exc).__name__] += 1
                await conn.close()
        await conn.close()

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    arr = np.asarray(lat) * 1e3 if lat else np.zeros(1)
    return {
        "concurrency": concurrency,
        "seconds": wall,
        "ok": statuses.get("200", 0),
        "rps": statuses.get("200", 0) / wall,
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "statuses": dict(statuses),
        "client_cpu": (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall,
    }


def batch_mean(url: str) -> float | None:
    text = httpx.get(url + "/metrics").text
    s = re.search(r'kiln_batch_size_sum\{model="digits"\} (\S+)', text)
    c = re.search(r'kiln_batch_size_count\{model="digits"\} (\S+)', text)
    return float(s.group(1)) / float(c.group(1)) if s and c and float(c.group(1)) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="a digits lenet5 bundle with model.onnx (kiln train + kiln export)")
    ap.add_argument("--throughput-s", type=float, default=10.0)
    ap.add_argument("--soak-s", type=float, default=60.0)
    ap.add_argument("--max-delay-ms", default="2", help="the dynamic batching server's --max-delay-ms")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    png = digit_png()
    body = json.dumps({"images": [base64.b64encode(png).decode()]}).encode()
    import onnxruntime

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "platform": platform.platform()},
        "bundle": args.bundle,
        "input": "JSON base64 PNG, 28x28 grayscale, 1 image per request",
    }
    report["bare"] = bare_backend_ms(args.bundle, png)
    print(f"bare backend ({report['bare']['backend']} {report['bare']['precision']} {report['bare']['device']}): "
          f"infer p50 {report['bare']['infer_p50_ms']:.3f} ms; decode+preprocess+infer+top-k "
          f"{report['bare']['pipeline_p50_ms']:.3f} ms", flush=True)

    dyn = Server(args.bundle, "--max-delay-ms", args.max_delay_ms)
    try:
        report["server_cmd"] = dyn.cmd
        seq = sequential_ms(dyn.url, body)
        report["concurrency1"] = {**seq, "overhead_ms": seq["p50_ms"] - report["bare"]["infer_p50_ms"]}
        print(f"concurrency 1: p50 {seq['p50_ms']:.3f} ms (p90 {seq['p90_ms']:.3f}, p99 {seq['p99_ms']:.3f}); "
              f"p50 minus bare infer: {report['concurrency1']['overhead_ms']:.3f} ms (target <= 1.5)", flush=True)
        report["c32_dynamic"] = asyncio.run(_closed_loop(dyn.url, body, 32, args.throughput_s))
        report["c32_dynamic"]["mean_batch"] = batch_mean(dyn.url)
        print(f"concurrency 32, dynamic batching: {report['c32_dynamic']}", flush=True)
        if args.soak_s > 0:
            asyncio.run(_closed_loop(dyn.url, body, 64, 3.0))  # settle allocator pools before the baseline
            rss0 = dyn.rss_mb()
            soak = asyncio.run(_closed_loop(dyn.url, body, 64, args.soak_s))
            rss1 = dyn.rss_mb()
            fivexx = sum(v for k, v in soak["statuses"].items() if k.startswith("5"))
            report["soak_c64"] = {**soak, "rss_start_mb": rss0, "rss_end_mb": rss1, "rss_growth_mb": rss1 - rss0,
                                  "5xx": fivexx}
            print(f"soak c64 {args.soak_s:.0f}s: {soak['ok']} ok, 5xx {fivexx}, statuses {soak['statuses']}, "
                  f"RSS {rss0:.1f} -> {rss1:.1f} MB (+{rss1 - rss0:.1f}, target < 50)", flush=True)
    finally:
        report["dynamic_exit_code"] = dyn.stop()

    one = Server(args.bundle, "--max-batch", "1", "--max-delay-ms", "0")
    try:
        report["c32_batch1"] = asyncio.run(_closed_loop(one.url, body, 32, args.throughput_s))
        report["c32_batch1"]["mean_batch"] = batch_mean(one.url)
    finally:
        one.stop()
    ratio = report["c32_dynamic"]["rps"] / max(report["c32_batch1"]["rps"], 1e-9)
    report["c32_ratio"] = ratio
    print(f"concurrency 32, max batch 1: {report['c32_batch1']}", flush=True)
    print(f"throughput ratio dynamic / batch 1: {ratio:.2f}x (target >= 3)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
