"""KServe v2 / Triton protocol speed on one ``kiln serve``: binary vs JSON tensors, gRPC vs HTTP.

    .venv/bin/python tests/perf/bench_triton.py BUNDLE [--seconds 8] [--repeats 3] [--iters 2000]
        [--json out.json]

1. ``POST /v2/models/digits/infer`` at concurrency 32 with wrk (``wrk -t1``): the same preprocessed
   float32 tensor [1, 1, 28, 28] as JSON ``data`` and with the binary tensor data extension
   (``Inference-Header-Content-Length``); median req/s of ``--repeats`` runs.
2. p50 at concurrency 1 with Triton's own clients: ``tritonclient.http`` ``infer(binary_data=True)``
   and ``tritonclient.grpc`` ``infer``, ``--iters`` calls each after 200 warm-up, interleaved in
   blocks so drift in the machine's load hits both alike.
3. The transports' floors, measured the same way: the same two clients against servers that do no work
   (a grpcio asyncio ``ModelInfer`` and a bare ASGI app on uvicorn, each answering a fixed 10-float
   response). What kiln adds per call is each protocol's figure minus its floor.
Not collected by pytest. Needs Debian's wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_wrk import Proc, _free_port, environment, wrk  # noqa: E402


def lua_json(folder: Path, x: np.ndarray) -> Path:
    body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    path = folder / "v2_json.lua"
    path.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f"wrk.body = {json.dumps(body)}\n")
    return path


def lua_binary(folder: Path, x: np.ndarray) -> Path:
    header = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    body = header + x.astype("<f4").tobytes()
    escaped = "".join(f"\\{b}" for b in body)  # Lua decimal escapes keep every byte as is
    path = folder / "v2_binary.lua"
    path.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/octet-stream"\n'
                    f'wrk.headers["Inference-Header-Content-Length"] = "{len(header)}"\n'
                    f'wrk.body = "{escaped}"\n')
    return path


FLOOR_SERVERS = textwrap.dedent('''
    import asyncio, json, sys
    import grpc, numpy as np, uvicorn
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

    LOGITS = np.zeros((1, 10), np.float32).tobytes()
    HEADER = json.dumps({"model_name": "digits", "model_version": "1", "outputs": [{"name": "logits",
        "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": len(LOGITS)}}]}).encode()

    class Floor(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            r = pb.ModelInferResponse(model_name="digits", model_version="1", id=request.id)
            r.outputs.append(pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32",
                                                                     shape=[1, 10]))
            r.raw_output_contents.append(LOGITS)
            return r

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(len(HEADER)).encode())]})
        await send({"type": "http.response.body", "body": HEADER + LOGITS})

    async def main():
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(), server)
        server.add_insecure_port(f"127.0.0.1:{sys.argv[2]}")
        await server.start()
        config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
        await uvicorn.Server(config).serve()

    asyncio.run(main())
''')


def floors(x: np.ndarray, iters: int) -> dict[str, Any]:
    """p50 of the two clients against servers that do nothing (see the module docstring)."""
    port, gport = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVERS, str(port), str(gport)])
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port),
                                              0.2), socket.create_connection(("127.0.0.1", gport), 0.2):
                    break
            except OSError:
                time.sleep(0.1)
        return client_p50(port, gport, x, iters, model_check=False)
    finally:
        proc.terminate()
        proc.wait(30)


def client_p50(http_port: int, grpc_port: int, x: np.ndarray, iters: int,
               model_check: bool = True) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    h = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    hin = httpclient.InferInput("images", list(x.shape), "FP32")
    hin.set_data_from_numpy(x, binary_data=True)
    hout = [httpclient.InferRequestedOutput("logits", binary_data=True)]
    gin = grpcclient.InferInput("images", list(x.shape), "FP32")
    gin.set_data_from_numpy(x)
    calls = {"http_binary": lambda: h.infer("digits", [hin], outputs=hout).as_numpy("logits"),
             "grpc": lambda: g.infer("digits", [gin]).as_numpy("logits")}
    first = {k: f() for k, f in calls.items()}
    if model_check:
        np.testing.assert_allclose(first["http_binary"], first["grpc"], atol=1e-6)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(200):
        for f in calls.values():
            f()
    block = 100
    for _ in range(max(1, iters // block)):
        for k, f in calls.items():
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"p50_ms": statistics.median(v), "p99_ms": float(np.percentile(v, 99)), "n": len(v)}
            for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    work = Path(tempfile.mkdtemp())
    port, gport = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "serve", args.bundle, "--name", "digits", "--port", str(port),
           "--grpc-port", str(gport), "--backend", "onnxrt", "--threads", "1"]
    report: dict[str, Any] = {"env": environment(), "cmd": " ".join(["kiln", *cmd[3:]])}
    server = Proc("kiln", cmd, port)
    try:
        path = "/v2/models/digits/infer"
        for name, lua in (("json", lua_json(work, x)), ("binary", lua_binary(work, x))):
            wrk(port, path, lua, 8, 2)
            runs = [wrk(port, path, lua, 32, args.seconds) for _ in range(args.repeats)]
            assert all(r["non2xx"] == 0 for r in runs), runs
            med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
            report[f"v2_{name}_c32"] = {**med, "all_rps": [r["rps"] for r in runs]}
            print(f"v2 {name:6s} c=32 {med['rps']:8.0f} req/s  p50 {med['p50_ms']:.2f} ms  runs "
                  f"{[round(r['rps']) for r in runs]}", flush=True)
        ratio = report["v2_binary_c32"]["rps"] / report["v2_json_c32"]["rps"]
        report["binary_over_json"] = ratio
        print(f"binary / JSON at c=32: {ratio:.2f}")
        report["c1"] = client_p50(port, gport, x, args.iters)
        for k, v in report["c1"].items():
            print(f"{k:12s} c=1 p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms  ({v['n']} calls)")
    finally:
        server.stop()
    report["floor_c1"] = floors(x, args.iters)
    for k, v in report["floor_c1"].items():
        added = report["c1"][k]["p50_ms"] - v["p50_ms"]
        print(f"{k:12s} floor p50 {v['p50_ms']:.3f} ms (a server doing nothing); kiln adds {added:.3f} ms")
    report["env"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
