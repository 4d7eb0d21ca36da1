"""Serving throughput with wrk (a C load generator), kiln beside a bare ASGI floor, in one run.

    .venv/bin/python tests/perf/bench_serve_wrk.py BUNDLE [--seconds 8] [--repeats 3] [--soak-s 60]
        [--json out.json]

Servers, started one at a time on the same cores as wrk (``wrk -t1``):
- ``bare``: a plain ASGI app on uvicorn (no framework) doing what kiln does per request for this body:
  JSON parse, base64 decode, PNG decode, the bundle's preprocessing, one ONNX Runtime run (1 intra-op
  thread), top-1 JSON. The Python floor kiln is compared with.
- ``kiln``: ``kiln serve BUNDLE --backend onnxrt --threads 1`` with its defaults (dynamic batching on).
- ``kiln-mb1``: the same with ``--max-batch 1``.
- ``kiln-w2``: ``--workers 2 --threads 1``.
Each level (concurrency 1, 32, 64) runs ``--repeats`` times; the table shows the median req/s and its
latency. Then ``kiln bench --url`` runs at c=32 against ``kiln`` beside wrk's figure, and a soak at
c=64 for ``--soak-s`` seconds counts non-2xx answers and the server's RSS growth.
Not collected by pytest. Needs Debian's wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_latency import digit_png  # noqa: E402  (the same request body as the latency script)

LEVELS = (1, 32, 64)

BARE_APP = textwrap.dedent('''
    import base64, io, json, os
    import numpy as np, onnxruntime as ort
    from PIL import Image
    from kiln import processing
    from kiln.bundle import Bundle

    B = Bundle.load(os.environ["BARE_BUNDLE"])
    M = B.manifest
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    S = ort.InferenceSession(str(B.path("model.onnx")), so, providers=["CPUExecutionProvider"])
    CLASSES = M.classes

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"}); return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if scope["path"] == "/readyz":
            out = b"{}"
        else:
            blob = base64.b64decode(json.loads(body)["images"][0])
            img = Image.open(io.BytesIO(blob)); img.load()
            x, _ = processing.preprocess([img.convert("L" if M.input.shape[0] == 1 else "RGB")], M.preprocess)
            logits = S.run(None, {M.input.name: x})[0][0]
            i = int(np.argmax(logits))
            out = json.dumps({"predictions": [{"label": CLASSES[i], "score": float(logits[i])}]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})
''')


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{name} exited: {self.log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not become ready")

    def rss_mb(self) -> float:
        """RSS of the server and its children (workers)."""
        pids = [self.proc.pid]
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if kids.exists():
            pids += [int(p) for p in kids.read_text().split()]
        total = 0
        for pid in pids:
            m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
            total += int(m.group(1)) if m else 0
        return total / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(port: int, path: str, lua: Path, conns: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "-s",
                          str(lua),
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                          check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"), "non2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else "",
            "requests": int(total.group(1)) if total else 0}


def lua_script(folder: Path, body: bytes) -> Path:
    path = folder / "post.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
    )
    return path


def server_cmd(name: str, bundle: str, port: int) -> tuple[list[str], dict[str, str]]:
    kiln = [sys.executable, "-m", "kiln.cli", "serve", bundle, "--name", "digits", "--port", str(port),
            "--backend", "onnxrt", "--threads", "1"]
    if name == "bare":
        return ([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--no-access-log",
                 "--log-level", "warning", "--app-dir", str(Path(tempfile.gettempdir()) / "kiln-bare")],
                {"BARE_BUNDLE": bundle})
    extra = {"kiln": [], "kiln-mb1": ["--max-batch", "1"], "kiln-w2": ["--workers", "2"]}[name]
    return kiln + extra, {}


def environment() -> dict[str, Any]:
    import onnxruntime
    import uvicorn

    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "uvicorn": uvicorn.__version__,
            "wrk": wrk_v[0] if wrk_v else "?", "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--soak-s", type=float, default=60)
    ap.add_argument("--servers", default="bare,kiln,kiln-mb1,kiln-w2")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    bare_dir = Path(tempfile.gettempdir()) / "kiln-bare"
    bare_dir.mkdir(exist_ok=True)
    (bare_dir / "bare_app.py").write_text(BARE_APP)
    work = Path(tempfile.mkdtemp())
    body = json.dumps({"images": [base64.b64encode(digit_png()).decode()]}).encode()
    lua = lua_script(work, body)
    report: dict[str, Any] = {"env": environment(), "seconds": args.seconds, "repeats": args.repeats,
                              "servers": {}}
    path = {"bare": "/predict"}
    for name in args.servers.split(","):
        port = _free_port()
        cmd, env = server_cmd(name, args.bundle, port)
        server = Proc(name, cmd, port, env)
        try:
            url_path = path.get(name, "/v1/models/digits/predict")
            wrk(port, url_path, lua, 8, 2)  # warm-up
            levels = {}
            for c in LEVELS:
                runs = [wrk(port, url_path, lua, c, args.seconds) for _ in range(args.repeats)]
                med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
                levels[c] = {**med, "all_rps": [r["rps"] for r in runs]}
                print(f"{name:9s} c={c:<3d} {med['rps']:8.0f} req/s  p50 {med['p50_ms']:7.2f} ms  "
                      f"p99 {med['p99_ms']:7.2f} ms  non-2xx {med['non2xx']}  runs "
                      f"{[round(r['rps']) for r in runs]}",
                      flush=True)
            entry: dict[str, Any] = {"cmd": " ".join(cmd[2:] if cmd[1] == "-m" else cmd), "levels": levels}
            if name == "kiln":
                entry["bench_url_c32"] = bench_url(port, args.seconds)
                print(f"kiln bench --url c=32: {entry['bench_url_c32']['rps']:.0f} req/s "
                      f"(wrk {levels[32]['rps']:.0f}; ratio "
                      f"{entry['bench_url_c32']['rps'] / levels[32]['rps']:.2f})",
                      flush=True)
                if args.soak_s > 0:
                    entry["soak"] = soak(server, url_path, lua, args.soak_s)
                    print(f"soak c=64 {args.soak_s:.0f} s: {entry['soak']}", flush=True)
            report["servers"][name] = entry
        finally:
            server.stop()
    summarize(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


def bench_url(port: int, seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        subprocess.run([sys.executable, "-m", "kiln.cli", "bench", "--url", f"http://127.0.0.1:{port}",
                        "--model", "digits",
                        "--concurrency", "32", "--duration", str(seconds), "--json", fh.name],
                       check=True, capture_output=True, text=True)
        data = json.loads(Path(fh.name).read_text())
    (lv,) = data["levels"]
    return {"rps": lv["requests_per_s"], "p50_ms": lv["latency_ms"]["p50"],
            "client_cpu": lv["client_cpu_fraction"]}


def soak(server: Proc, url_path: str, lua: Path, seconds: float) -> dict[str, Any]:
    before = server.rss_mb()
    res = wrk(server.port, url_path, lua, 64, seconds)
    after = server.rss_mb()
    return {"requests": res["requests"], "non2xx": res["non2xx"], "rps": res["rps"], "p99_ms": res["p99_ms"],
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "rss_growth_mb": round(after - before, 1)}


def summarize(report: dict[str, Any]) -> None:
    s = report["servers"]
    if "bare" in s and "kiln" in s:
        for c in (32, 64):
            print(
                f"kiln / bare at c={c}: {s['kiln']['levels'][c]['rps'] / s['bare']['levels'][c]['rps']:.2f}"
            )
        print(f"p50 at c=1: kiln {s['kiln']['levels'][1]['p50_ms']:.2f} ms vs bare "
              f"{s['bare']['levels'][1]['p50_ms']:.2f} ms")
    if "kiln" in s and "kiln-mb1" in s:
        for c in LEVELS:
            print(f"batching / max-batch 1 at c={c}: "
                  f"{s['kiln']['levels'][c]['rps'] / s['kiln-mb1']['levels'][c]['rps']:.2f}")
    if "kiln" in s and "kiln-w2" in s:
        print("--workers 2 / --workers 1 at c=64: "
              f"{s['kiln-w2']['levels'][64]['rps'] / s['kiln']['levels'][64]['rps']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
