"""Studio figures for docs/BENCHMARKS.md: first page load, curve latency, and a run from the studio against
the same `kiln train` command.

    OMP_NUM_THREADS=1 .venv/bin/python tests/studio/bench_studio.py --epochs 3 --repeats 3

Starts `kiln studio` on a temporary workspace, drives headless Chromium (Debian's chromium +
chromium-driver), and prints one line per figure:
1. first page load: navigation start to the runs table drawn (the API answered), browser cache cleared;
2. a run queued from the studio against the same `kiln train` command (the command line the studio shows,
   another --out) in a terminal, alternated --repeats times: wall time from process start to exit (the
   job's started/ended as the studio recorded them, the subprocess's for the terminal) and training
   images/s from metrics.csv; the ratio must stay within 10%;
3. curve latency: a new epoch row in metrics.csv until the chart on the page has one more point.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.browser
from tests.browser import chromium  # noqa: E402


def start_studio(ws: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "studio", "--workspace", str(ws), "--port",
                             "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    url = re.search(r"(http://\S+?)/", proc.stderr.readline()).group(1)  # type: ignore[union-attr]
    while True:
        try:
            if httpx.get(url + "/api/info").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)


def until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"not reached within {timeout} s")
        time.sleep(0.01)


def images_per_s(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        return statistics.mean(float(r["images_per_s"]) for r in csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--points", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="studio/terminal run pairs")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs: at least 2 (the curve latency replays the second epoch's row of metrics.csv)")
    ws = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    proc, url = start_studio(ws)
    drivers = chromium()  # the browser tests' headless Chromium; quit when the generator is closed
    d = next(drivers)
    try:
        # 1. first page load: navigation start to the runs table drawn (the API answered), fresh browser cache
        loads = []
        for _ in range(args.loads):
            d.execute_cdp_cmd("Network.clearBrowserCache", {})
            d.get("about:blank")
            t0 = time.perf_counter()
            d.get(url + "/#runs")
            while not d.execute_script("return document.querySelectorAll('#runs-table tr').length > 0"):
                time.sleep(0.005)
            loads.append((time.perf_counter() - t0) * 1000)
        print(f"first page load (navigation to the runs table drawn), median of {args.loads}: "
              f"{statistics.median(loads):.0f} ms (min {min(loads):.0f}, max {max(loads):.0f})")

        # 2. runs from the studio and the same command in a terminal, alternated
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        walls: dict[str, list[float]] = {"studio": [], "terminal": []}
        speeds: dict[str, list[float]] = {"studio": [], "terminal": []}
        command = ""
        for i in range(args.repeats):
            r = httpx.post(url + "/api/runs", json={"epochs": args.epochs, "name": f"studio{i}"},
                           headers={"X-Kiln-Studio": "1"})
            r.raise_for_status()
            command, job_id = r.json()["command"], r.json()["job"]["id"]
            while True:
                job = next(j for j in httpx.get(url + "/api/jobs").json() if j["id"] == job_id)
                if job["state"] not in ("queued", "running"):
                    break
                time.sleep(0.2)
            assert job["state"] == "done", job
            walls["studio"].append(job["ended"] - job["started"])
            speeds["studio"].append(images_per_s(ws / f"runs/studio{i}"))
            argv = [a if not a.startswith("--out=")
                    else f"--out=runs/terminal{i}" for a in shlex.split(command)[1:]]
            t0 = time.time()
            cli = subprocess.run([sys.executable, "-m", "kiln.cli", *argv], cwd=ws, env=env,
                                 capture_output=True,
                                 text=True)
            walls["terminal"].append(time.time() - t0)
            assert cli.returncode == 0, cli.stderr[-2000:]
            speeds["terminal"].append(images_per_s(ws / f"runs/terminal{i}"))
        ws_, wt = statistics.median(walls["studio"]), statistics.median(walls["terminal"])
        ss, st = statistics.median(speeds["studio"]), statistics.median(speeds["terminal"])
        ratio = ws_ / wt
        print(f"a run of `{command}`, median of {args.repeats} alternated: studio {ws_:.1f} s, terminal "
              f"{wt:.1f} s "
              f"(wall, process start to exit): studio/terminal {ratio:.3f} "
              f"({'within' if abs(ratio - 1) <= 0.10 else 'OUTSIDE'} 10%); training images/s studio "
              f"{ss:.0f}, "
              f"terminal {st:.0f}")

        # 3. curve latency: a new epoch row in metrics.csv until the chart on the page has one more point
        from kiln.fsutil import atomic_write_text

        run = ws / "runs/terminal0"
        rows = (run / "metrics.csv").read_text().splitlines()
        d.get(url + "/#runs?run=runs/terminal0")
        lat = []
        for _ in range(args.points):
            atomic_write_text(run / "metrics.csv", "\n".join(rows[:2]) + "\n")
            until(
                lambda: d.execute_script("return document.getElementById('chart-loss').dataset.points") == "2"
            )
            atomic_write_text(run / "metrics.csv", "\n".join(rows[:3]) + "\n")
            t0 = time.perf_counter()
            until(
                lambda: d.execute_script("return document.getElementById('chart-loss').dataset.points") == "4"
            )
            lat.append((time.perf_counter() - t0) * 1000)
        print(f"metrics.csv row written -> point drawn, median of {args.points}: "
              f"{statistics.median(lat):.0f} ms "
              f"(max {max(lat):.0f})")
    finally:
        drivers.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


if __name__ == "__main__":
    main()
