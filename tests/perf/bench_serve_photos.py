"""Serving camera photos with wrk: kiln beside a bare uvicorn app and LitServe doing the same work, and the
machine's limit for the workload, all in one run.

    OMP_NUM_THREADS=1 .venv/bin/python tests/perf/bench_serve_photos.py [--workloads A-fp32,A-int8,B]
        [--seconds 10] [--repeats 3] [--levels 8,32,64] [--threads 2] [--decode-threads 2]
        [--kiln-configs 2:2,1:2] [--servers kiln,bare,litserve] [--work DIR] [--json out.json]

Workloads (each request a JSON body ``{"images": ["<base64>"]}``, wrk cycling through 20 different photos):
- ``A-fp32`` / ``A-int8``: 20 different 1920x1080 JPEGs of 0.5-1 MB (crops of scikit-learn's and
  scikit-image's photos with sensor-like grain, the quality chosen to land in that range) into a
  torchvision resnet18 at 224, fp32 and the ``--int8-layout cpu`` int8 export;
- ``B``: 20 different 640x480 JPEGs into kiln-det-s at 320 (letterbox), fp32.
The bundles are built in ``--work`` (reused when there) by ``kiln train`` for one epoch on photo crops
(resnet18) or a small shapes set (kiln-det-s): near-random weights, no download, and ``kiln export``.

Servers, started one at a time on the same cores as wrk (``wrk -t1``), ONNX Runtime on the CPU with
``--threads`` intra-op threads in all three:
- ``kiln``: ``kiln serve BUNDLE --backend onnxrt --threads T --decode-threads D`` (its defaults otherwise:
  the DCT-scaled JPEG decode on its decode threads, dynamic batching). ``--kiln-configs T:D,...`` adds a
  kiln server per pair (the sweep the defaults are chosen from).
- ``bare``: a plain ASGI app on uvicorn: JSON parse, base64, full PIL decode, the bundle's resize or
  letterbox and normalisation (kiln.processing.preprocess), one ONNX Runtime run, top-1 or detections
  (kiln.processing.detect_postprocess), all on the event loop.
- ``litserve``: LitServe (pinned in the dev extra) with the same decode, preprocessing and model in its
  ``decode_request`` / ``predict`` / ``encode_response``.

The machine's limit is measured in the same run: cores / (single-thread DCT-scaled decode + preprocess
of the workload's photos + single-thread batch-1 inference), in requests per second. Each level runs
``--repeats`` times and the median is shown; the summary prints kiln / bare, kiln / LitServe and kiln /
limit at every level, p99 / p50 at c=64 and the non-2xx count. Print ``uptime`` beside the figures:
on a shared machine they move with the load. Not collected by pytest. Needs Debian's wrk.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_decode import median_ms  # noqa: E402
from bench_serve_wrk import Proc, _free_port, environment, wrk  # noqa: E402

from kiln import processing  # noqa: E402
from kiln.bundle import Bundle  # noqa: E402

PHOTOS = 20
A_SIZE, B_SIZE = (1920, 1080), (640, 480)
A_BYTES = (500_000, 1_000_000)

APPS = textwrap.dedent('''
    """The bare ASGI app and the LitServe app of tests/perf/bench_serve_photos.py
    (PHOTO_APP=bare|litserve)."""
    import base64, io, json, os
    import numpy as np, onnxruntime as ort
    from PIL import Image
    from kiln import processing
    from kiln.bundle import Bundle

    B = Bundle.load(os.environ["PHOTO_BUNDLE"])
    M = B.manifest
    ARTIFACT = os.environ["PHOTO_ARTIFACT"]
    THREADS = int(os.environ["PHOTO_THREADS"])


    def session():
        so = ort.SessionOptions(); so.intra_op_num_threads = THREADS; so.inter_op_num_threads = 1
        return ort.InferenceSession(str(B.path(ARTIFACT)), so, providers=["CPUExecutionProvider"])


    def decode(body):
        img = Image.open(io.BytesIO(base64.b64decode(json.loads(body)["images"][0]))); img.load()
        return processing.preprocess([img.convert("L" if M.input.shape[0] == 1 else "RGB")], M.preprocess)


    def answer(out, boxes):
        if M.task == "classify":
            logits = out[0][0]; i = int(np.argmax(logits))
            return {"predictions": [{"label": M.classes[i], "score": float(logits[i])}]}
        names = [o.name for o in M.outputs]
        got = dict(zip(names, out))
        dets = processing.detect_postprocess(got["boxes"], got["scores"], boxes, M.detect_post(), M.classes)
        return {"predictions": [{"detections": dets[0]}]}


    if os.environ["PHOTO_APP"] == "bare":
        S = session()

        async def lifespan(receive, send):
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

        async def read_body(receive):
            parts, more = [], True
            while more:
                msg = await receive()
                parts.append(msg.get("body", b""))
                more = msg.get("more_body", False)
            return b"".join(parts)

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                return await lifespan(receive, send)
            body = await read_body(receive)
            if scope["path"] == "/readyz":
                out = b"{}"
            else:
                x, boxes = decode(body)
                out = json.dumps(answer(S.run(None, {M.input.name: x}), boxes)).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": out})
    else:
        import litserve as ls

        class PhotoAPI(ls.LitAPI):
            def setup(self, device):
                self.session = session()

            def decode_request(self, request):
                return decode(json.dumps(request))

            def predict(self, x):
                arr, boxes = x
                return self.session.run(None, {M.input.name: arr}), boxes

            def encode_response(self, output):
                return answer(*output)

        if __name__ == "__main__":
            server = ls.LitServer(PhotoAPI(), accelerator="cpu", devices=1, workers_per_device=1, timeout=60,
                                  healthcheck_path="/readyz")
            server.run(host="127.0.0.1", port=int(os.environ["PHOTO_PORT"]), generate_client_file=False,
                       log_level="warning")
''')


# ---- photos and bundles ---------------------------------------------------------------------------


def _sources() -> list[np.ndarray]:
    spec = importlib.util.spec_from_file_location("photos", ROOT / "tests" / "train" / "photos.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [np.asarray(p)[..., :3] for p in mod.photos().values()]


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_photos(size: tuple[int, int], count: int, within: tuple[int, int] | None,
                seed: int = 0) -> list[bytes]:
    """``count`` different JPEGs of ``size``: random crops of the real photos, flipped at random, resized,
    with Gaussian grain (a camera's sensor noise, which is what makes a large JPEG heavy); the quality is
    searched so each file lands ``within`` (min, max) bytes when given, else 90."""
    rng = np.random.default_rng(seed)
    sources = _sources()
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = Image.fromarray(src[y:y + ch, x:x + cw])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(crop.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        arr += rng.normal(0, 3.0, arr.shape).astype(np.float32)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        if within is None:
            out.append(_jpeg(img, 90))
            continue
        lo_q, hi_q, best = 30, 98, _jpeg(img, 85)
        while lo_q <= hi_q:  # the largest quality whose file stays under the ceiling
            q = (lo_q + hi_q) // 2
            data = _jpeg(img, q)
            if len(data) <= within[1]:
                best, lo_q = data, q + 1
            else:
                hi_q = q - 1
        if not within[0] <= len(best) <= within[1]:
            raise RuntimeError(f"photo {i}: {len(best)} bytes, outside {within}")
        out.append(best)
    return out


def _kiln(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "kiln.cli", *args]
    print("$ kiln " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"kiln {args[0]} failed:\n{proc.stderr[-3000:]}")


def build_bundles(work: Path) -> dict[str, Path]:
    """resnet18 at 224 (fp32 + cpu-layout int8) and kiln-det-s at 320 (fp32), each trained for one epoch
    (near-random weights: speed does not depend on them) and exported; reused when already built."""
    cls, det = work / "resnet18", work / "det"
    if not (cls / "model.int8.onnx").exists():
        spec = importlib.util.spec_from_file_location("photos", ROOT / "tests" / "train" / "photos.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        data = work / "crops"
        mod.write_photo_crops(data, per_class=8, size=224)
        _kiln("train", "--data", f"folder:{data}", "--model", "resnet18", "--image-size", "224", "--epochs",
              "1",
              "--batch-size", "16", "--out", str(cls), "--no-progress")
        _kiln("export", str(cls), "--precision", "fp32,int8", "--int8-layout", "cpu", "--calib-images", "16",
              "--calib-eval-images", "16")
    if not (det / "model.onnx").exists():
        _kiln("train", "--data", "shapes", "--model", "kiln-det-s", "--image-size", "320", "--epochs", "1",
              "--batch-size", "8", "--out", str(det), "--no-progress", env={"KILN_SHAPES_COUNT": "40"})
        _kiln("export", str(det), "--precision", "fp32")
    return {"A": cls, "B": det}


# ---- the machine's limit ----------------------------------------------------------------------------


def machine_limit(bundle: Path, artifact: str, photos: list[bytes], cores: int) -> dict[str, float]:
    """Single-thread decode + preprocess (kiln's DCT-scaled decode and the full one) of the workload's
    photos and single-thread batch-1 inference; ``cores`` / (draft decode + inference) is the limit."""
    import onnxruntime as ort

    m = Bundle.load(bundle).manifest
    spec = m.preprocess
    full = spec.model_copy(update={"decode": "full"})
    i = [0]

    def dec(s: Any) -> Callable[[], object]:
        def run() -> object:
            i[0] = (i[0] + 1) % len(photos)
            return processing.preprocess([processing.decode_image(photos[i[0]], spec=s)], s)
        return run

    draft_ms = median_ms(dec(spec.model_copy(update={"decode": "draft"})), 3 * len(photos))
    full_ms = median_ms(dec(full), 3 * len(photos))
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(str(Bundle.load(bundle).path(artifact)), so,
                                providers=["CPUExecutionProvider"])
    x = np.zeros((1, *m.input.shape), dtype=np.float32)
    infer_ms = median_ms(lambda: sess.run(None, {m.input.name: x}), 30)
    return {"draft_decode_ms": draft_ms, "full_decode_ms": full_ms, "infer_ms": infer_ms, "cores": cores,
            "limit_rps": cores * 1000.0 / (draft_ms + infer_ms)}


# ---- servers --------------------------------------------------------------------------------------


class Server(Proc):
    """A server process (bench_serve_wrk.Proc: started, ready on /readyz) whose child processes (LitServe's
    workers) are stopped with it."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str]) -> None:
        self.cmd = cmd
        super().__init__(name, cmd, port, env)

    def stop(self) -> None:
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids = [int(p) for p in kids.read_text().split()] if kids.exists() else []
        super().stop()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start(name: str, bundle: Path, artifact: str, precision: str, threads: int, decode_threads: int,
          apps: Path) -> tuple[Server, str]:
    port = _free_port()
    env = {"PHOTO_BUNDLE": str(bundle), "PHOTO_ARTIFACT": artifact, "PHOTO_THREADS": str(threads),
           "PHOTO_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(apps)}
    if name.startswith("kiln"):
        cmd = [sys.executable, "-m", "kiln.cli", "serve", str(bundle), "--name", "m", "--port", str(port),
               "--backend", "onnxrt", "--precision", precision, "--threads", str(threads),
               "--decode-threads", str(decode_threads)]
        return Server(name, cmd, port, env), "/v1/models/m/predict"
    if name == "bare":
        cmd = [sys.executable, "-m", "uvicorn", "photo_apps:app", "--port", str(port), "--no-access-log",
               "--log-level", "warning", "--app-dir", str(apps)]
        return Server(name, cmd, port, {**env, "PHOTO_APP": "bare"}), "/predict"
    cmd = [sys.executable, str(apps / "photo_apps.py")]
    return Server(name, cmd, port, {**env, "PHOTO_APP": "litserve"}), "/predict"


def lua_script(folder: Path, photos: list[bytes]) -> Path:
    """A wrk script that cycles through one JSON body per photo."""
    for i, data in enumerate(photos):
        (folder / f"body{i}.json").write_text(json.dumps({"images": [base64.b64encode(data).decode()]}))
    path = folder / "photos.lua"
    path.write_text(textwrap.dedent(f'''
        wrk.method = "POST"
        wrk.headers["Content-Type"] = "application/json"
        local bodies, n = {{}}, 0
        for i = 0, {len(photos) - 1} do
          local f = io.open("{folder}/body" .. i .. ".json", "rb"); bodies[i + 1] = f:read("*a"); f:close()
        end
        request = function()
          n = n % {len(photos)} + 1
          return wrk.format(nil, nil, nil, bodies[n])
        end
    '''))
    return path


def run_levels(server: Server, path: str, lua: Path, levels: list[int], seconds: float,
               repeats: int) -> dict[int, Any]:
    wrk(server.port, path, lua, 4, 2)  # warm-up
    out = {}
    for c in levels:
        runs = [wrk(server.port, path, lua, c, seconds) for _ in range(repeats)]
        med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        out[c] = {**med, "all_rps": [r["rps"] for r in runs], "non2xx_all": sum(r["non2xx"] for r in runs)}
        print(f"  {server.name:12s} c={c:<3d} {med['rps']:7.1f} req/s  p50 {med['p50_ms']:8.1f} ms  "
              f"p99 {med['p99_ms']:8.1f} ms  non-2xx {out[c]['non2xx_all']}  runs "
              f"{[round(r['rps'], 1) for r in runs]}",
              flush=True)
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a (no answer in the run)"


def summarize(name: str, limit: dict[str, float], servers: dict[str, Any], levels: list[int]) -> None:
    print(f"{name}: limit {limit['limit_rps']:.1f} req/s = {limit['cores']} cores / "
          f"({limit['draft_decode_ms']:.1f} ms "
          f"draft decode + {limit['infer_ms']:.1f} ms inference; full decode {limit['full_decode_ms']:.1f} "
          "ms)")
    for s, entry in servers.items():
        if not s.startswith("kiln"):
            continue
        for c in levels:
            k = entry["levels"][c]["rps"]
            parts = [f"{s} c={c}: {k:.1f} req/s", f"/limit {_ratio(k, limit['limit_rps'])}"]
            for other in ("bare", "litserve"):
                if other in servers:
                    parts.append(f"/{other} {_ratio(k, servers[other]['levels'][c]['rps'])}")
            print("  " + "  ".join(parts))
    if 64 in levels:
        for s, entry in servers.items():
            lv = entry["levels"][64]
            print(f"  {s} c=64: p99/p50 {_ratio(lv['p99_ms'], lv['p50_ms'])} ({lv['p50_ms']:.0f} / "
                  f"{lv['p99_ms']:.0f} ms), "
                  f"non-2xx {lv['non2xx_all']}")


WORKLOADS = {  # name -> (bundle key, artifact, precision, photo size, bytes range)
    "A-fp32": ("A", "model.onnx", "fp32", A_SIZE, A_BYTES),
    "A-int8": ("A", "model.int8.onnx", "int8", A_SIZE, A_BYTES),
    "B": ("B", "model.onnx", "fp32", B_SIZE, None),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="A-fp32,A-int8,B")
    ap.add_argument("--servers", default="kiln,bare,litserve")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", default="8,32,64")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, every server")
    ap.add_argument("--decode-threads", type=int, default=2, help="kiln's --decode-threads")
    ap.add_argument("--kiln-configs", default="", help="more kiln servers, THREADS:DECODE_THREADS,...")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kiln-bench-photos")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    servers = args.servers.split(",")
    if "litserve" in servers and importlib.util.find_spec("litserve") is None:
        print("litserve is not installed (pip install -e '.[dev]'): left out", file=sys.stderr)
        servers.remove("litserve")
    for pair in filter(None, args.kiln_configs.split(",")):
        servers.append(f"kiln-t{pair.split(':')[0]}-d{pair.split(':')[1]}")
    levels = [int(c) for c in args.levels.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    apps = args.work / "apps"
    apps.mkdir(exist_ok=True)
    (apps / "photo_apps.py").write_text(APPS)
    bundles = build_bundles(args.work)
    cores = len(os.sched_getaffinity(0))
    report: dict[str, Any] = {"env": environment(), "threads": args.threads,
                              "decode_threads": args.decode_threads,
                              "seconds": args.seconds, "repeats": args.repeats, "workloads": {}}
    print(f"load average {os.getloadavg()}, {cores} cores", flush=True)
    for wl in args.workloads.split(","):
        key, artifact, precision, size, within = WORKLOADS[wl]
        photos = make_photos(size, PHOTOS, within, seed=1 if key == "A" else 2)
        folder = args.work / f"bodies-{wl}"
        folder.mkdir(exist_ok=True)
        lua = lua_script(folder, photos)
        limit = machine_limit(bundles[key], artifact, photos, cores)
        print(f"{wl}: {len(photos)} photos {size[0]}x{size[1]}, {min(map(len, photos)) // 1000}-"
              f"{max(map(len, photos)) // 1000} KB; limit {limit}", flush=True)
        entries: dict[str, Any] = {}
        for name in servers:
            threads, decode_threads = args.threads, args.decode_threads
            if name.startswith("kiln-t"):
                threads, decode_threads = (int(v) for v in name[len("kiln-t"):].split("-d"))
            server, path = start(name, bundles[key], artifact, precision, threads, decode_threads, apps)
            try:
                entries[name] = {"cmd": " ".join(server.cmd[1:]), "threads": threads,
                                 "levels": run_levels(server, path, lua, levels, args.seconds, args.repeats)}
            finally:
                server.stop()
        report["workloads"][wl] = {"limit": limit, "servers": entries}
        summarize(wl, limit, entries, levels)
    report["env"]["loadavg_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
