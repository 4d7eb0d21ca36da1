"""Serving overhead and dynamic batching on a real bundle, not collected by pytest.

    .venv/bin/python tests/perf/bench_serve_latency.py /tmp/serve-digits [--soak-s 60] [--client-procs 2]
        [--json out.json]

1. bare backend: ``backend.infer`` on one preprocessed image (median of 2000 after 200 warm-up), the
   baseline the end-to-end figure is compared with;
2. p50 end-to-end at concurrency 1: JSON ``{"images": [base64 PNG]}`` over keep-alive HTTP;
3. throughput at concurrency 32: the same server with dynamic batching vs ``--max-batch 1``;
4. soak: concurrency 64 for ``--soak-s`` seconds, counting 5xx and the server's RSS growth.

The load comes from kiln's own load generator (``kiln.bench.loadgen``, what ``kiln bench --url`` runs).
Client and server share the machine's cores; the client's CPU time is printed beside the figures.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kiln.bench import time_backend
from kiln.bench.client import http_get
from kiln.bench.loadgen import LoadConfig, run_load


def digit_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bare_backend_ms(bundle: str, png: bytes, iters: int = 2000, warmup: int = 200) -> dict[str, Any]:
    from kiln import processing
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
    return {"infer_p50_ms": statistics.median(times_ms), "pipeline_p50_ms": statistics.median(pipe) * 1e3,
            **info}


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
                if http_get(self.url, "/readyz", {}, 5.0)[0] == 200:
                    break
            except OSError:
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


def load_level(url: str, concurrency: int, seconds: float, *, warmup: int = 20, max_requests: int = 100_000,
               client_procs: int = 1) -> dict[str, Any]:
    """One closed-loop level of the load generator, reduced to the figures this script prints."""
    report = run_load(LoadConfig(url=url, model="digits", concurrency=[concurrency], duration=seconds,
                                 warmup=warmup,
                                 max_requests=max_requests, client_procs=client_procs))
    (lv,) = report["levels"]
    lat = lv["latency_ms"] or {}
    sb = lv["server_batch_size"] or {}
    return {
        "concurrency": concurrency,
        "seconds": lv["elapsed_s"],
        "ok": lv["ok"],
        "rps": lv["ok_per_s"],
        "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"),
        "statuses": {"2xx": lv["ok"], **lv["errors"]},
        "client_cpu": lv["client_cpu_fraction"],
        "client_procs": lv["client_procs"],
        "mean_batch": sb.get("mean"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="a digits lenet5 bundle with model.onnx (kiln train + kiln export)")
    ap.add_argument("--throughput-s", type=float, default=10.0)
    ap.add_argument("--soak-s", type=float, default=60.0)
    ap.add_argument("--max-delay-ms", default="2", help="the dynamic batching server's --max-delay-ms")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="load generator processes (kiln bench --client-procs)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    png = digit_png()
    procs = args.client_procs
    import onnxruntime

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__,
                    "platform": platform.platform()},
        "bundle": args.bundle,
        "input": "JSON base64 PNG, 28x28 grayscale noise, 1 image per request",
        "client_procs": procs,
    }
    report["bare"] = bare_backend_ms(args.bundle, png)
    print(f"bare backend ({report['bare']['backend']} {report['bare']['precision']} "
          f"{report['bare']['device']}): "
          f"infer p50 {report['bare']['infer_p50_ms']:.3f} ms; decode+preprocess+infer+top-k "
          f"{report['bare']['pipeline_p50_ms']:.3f} ms", flush=True)

    dyn = Server(args.bundle, "--max-delay-ms", args.max_delay_ms)
    try:
        report["server_cmd"] = dyn.cmd
        # One connection, one request at a time: 1000 timed after 100 warm-up.
        seq = load_level(dyn.url, 1, 600.0, warmup=100, max_requests=1000)
        report["concurrency1"] = {**seq, "overhead_ms": seq["p50_ms"] - report["bare"]["infer_p50_ms"]}
        print(f"concurrency 1: p50 {seq['p50_ms']:.3f} ms (p90 {seq['p90_ms']:.3f}, p99 "
              f"{seq['p99_ms']:.3f}); "
              f"p50 minus bare infer: {report['concurrency1']['overhead_ms']:.3f} ms (target <= 1.5)",
              flush=True)
        report["c32_dynamic"] = load_level(dyn.url, 32, args.throughput_s, client_procs=procs)
        print(f"concurrency 32, dynamic batching: {report['c32_dynamic']}", flush=True)
        if args.soak_s > 0:
            load_level(dyn.url, 64, 3.0, client_procs=procs)  # settle allocator pools before the baseline
            rss0 = dyn.rss_mb()
            soak = load_level(dyn.url, 64, args.soak_s, client_procs=procs)
            rss1 = dyn.rss_mb()
            fivexx = sum(v for k, v in soak["statuses"].items() if k.startswith("5"))
            report["soak_c64"] = {**soak, "rss_start_mb": rss0, "rss_end_mb": rss1,
                                  "rss_growth_mb": rss1 - rss0,
                                  "5xx": fivexx}
            print(f"soak c64 {args.soak_s:.0f}s: {soak['ok']} ok, 5xx {fivexx}, statuses {soak['statuses']}, "
                  f"RSS {rss0:.1f} -> {rss1:.1f} MB (+{rss1 - rss0:.1f}, target < 50)", flush=True)
    finally:
        report["dynamic_exit_code"] = dyn.stop()

    one = Server(args.bundle, "--max-batch", "1", "--max-delay-ms", "0")
    try:
        report["c32_batch1"] = load_level(one.url, 32, args.throughput_s, client_procs=procs)
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
