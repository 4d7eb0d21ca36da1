"""Real uploads for a minute: the image corpus (tests/corpus.py: 24x24 to 4000x3000, 1 KB to 15 MB, PNG,
JPEG, WebP, EXIF-rotated, RGBA, 16-bit) sent in a random mix by several clients at once, through the
server stack ``kiln serve`` runs. Prints the count of answers that were not 2xx (must be 0) and the
latency per image. Not collected by pytest.

    .venv/bin/python tests/perf/bench_serve_mixed.py [--seconds 60] [--clients 4] [--bundle PATH]
        [--json out.json]

Without ``--bundle`` the server is tests/serve/fake_serve.py (``build_server`` over kiln's app, settings
from KILN_*, a numpy test backend: the decode is the work measured); with it, ``kiln serve PATH``.
Each request picks an image and a protocol: /v1 multipart (httpx), /v1 JSON base64 (httpx), or /v2
BYTES of the encoded image (tritonclient.http, binary data extension). Clients are threads of this
process and share the machine's cores with the server. Exit status 1 when any answer was not 2xx.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.corpus import CorpusImage, build_corpus  # noqa: E402

PROTOCOLS = ("v1-multipart", "v1-json", "v2-bytes")


def start_server(bundle: Path | None, workdir: Path) -> tuple[subprocess.Popen[str], str, str]:
    """The server process, its base URL and the served model's name."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if bundle is None:
        cmd = [sys.executable, str(ROOT / "tests" / "serve" / "fake_serve.py"), str(workdir)]
        pattern, model = r"serving on (http://\S+)", "digits"
    else:
        cmd = [sys.executable, "-m", "kiln.cli", "serve", str(bundle), "--port", "0"]
        pattern, model = r"serving .* on (http://\S+)", bundle.resolve().name
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT / "tests" / "serve")
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(pattern, line)
            if m and not url:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(120):
        proc.kill()
        raise SystemExit("the server did not start")
    end = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url[0] + "/readyz", timeout=5).status_code == 200:
                return proc, url[0], model
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit("the server did not become ready")
        time.sleep(0.1)


def send(client: httpx.Client, v2: object, model: str, item: CorpusImage, data: bytes, protocol: str) -> int:
    if protocol == "v1-multipart":
        return client.post(f"/v1/models/{model}/predict",
                           files={"file": (item.name, data, item.mime)}).status_code
    if protocol == "v1-json":
        body = {"images": [base64.b64encode(data).decode()]}
        return client.post(f"/v1/models/{model}/predict", json=body).status_code
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    inp = httpclient.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
    try:
        v2.infer(model, [inp])  # type: ignore[attr-defined]
    except InferenceServerException as exc:
        return int(exc.status() or 599) if str(exc.status() or "").isdigit() else 599
    return 200


def run(url: str, model: str, corpus: list[CorpusImage], seconds: float, clients: int,
        seed: int) -> dict[str, object]:
    import tritonclient.http as httpclient

    blobs = {c.name: c.data for c in corpus}
    lock = threading.Lock()
    statuses: Counter[str] = Counter()
    latency: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client_loop(k: int) -> None:
        rng = random.Random(seed + k)
        host = url.removeprefix("http://")
        with httpx.Client(base_url=url, timeout=120) as client:
            v2 = httpclient.InferenceServerClient(host, network_timeout=120.0, connection_timeout=120.0)
            try:
                while time.monotonic() < deadline:
                    item, protocol = rng.choice(corpus), rng.choice(PROTOCOLS)
                    t0 = time.perf_counter()
                    try:
                        code = send(client, v2, model, item, blobs[item.name], protocol)
                    except Exception as exc:  # a dropped connection counts as a failure, not a crash
                        code = 0
                        with lock:
                            errors.append(f"{protocol} {item.name}: {type(exc).__name__}: {exc}")
                    with lock:
                        statuses[str(code)] += 1
                        latency[item.name].append(time.perf_counter() - t0)
            finally:
                v2.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    total = sum(statuses.values())
    non2xx = sum(n for code, n in statuses.items() if not code.startswith("2"))
    per_image = {}
    for c in corpus:
        lat = sorted(latency.get(c.name, []))
        if lat:
            per_image[c.name] = {"bytes": c.nbytes, "n": len(lat),
                                 "p50_ms": round(statistics.median(lat) * 1000, 1),
                                 "max_ms": round(lat[-1] * 1000, 1)}
    return {"requests": total, "seconds": round(elapsed, 1), "req_per_s": round(total / elapsed, 2),
            "statuses": dict(statuses), "non_2xx": non2xx, "errors": errors[:5], "per_image": per_image}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--bundle", type=Path,
                        help="serve this bundle with `kiln serve` (default: the test backend)")
    parser.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "kiln-corpus",
                        help="where the corpus files are encoded once and kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    corpus = build_corpus(args.corpus_dir)
    with tempfile.TemporaryDirectory() as work:
        proc, url, model = start_server(args.bundle, Path(work))
        try:
            load_before = os.getloadavg()
            report = run(url, model, corpus, args.seconds, args.clients, args.seed)
        finally:
            proc.terminate()
            proc.wait(60)
    report = {"server": "kiln serve " + str(args.bundle) if args.bundle
              else "fake_serve.py (build_server, test backend)",
              "clients": args.clients, "load_average_before": load_before,
              "load_average_after": os.getloadavg(),
              "cpus": os.cpu_count(), **report}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"non-2xx: {report['non_2xx']} of {report['requests']} requests", file=sys.stderr)
    return 1 if report["non_2xx"] else 0


if __name__ == "__main__":
    sys.exit(main())
