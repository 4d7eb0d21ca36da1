"""`kiln train` on a shared machine: the default run alone, then beside one CPU-bound process.

    .venv/bin/python tests/perf/bench_train_shared.py [--repeats 1] [--json out.json]
        [-- extra kiln train flags]

Each run is ``kiln train --out <tmp> --no-progress`` (lenet5 on digits by default) with the environment
kiln gives it (OMP_WAIT_POLICY=PASSIVE unless set). "shared" starts ``python -c 'while True: pass'``
first and stops it after. Reported: wall seconds per run, and shared / alone (target <= 2).
Not collected by pytest; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def train_once(extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kiln.cli", "train", "--out", str(Path(tmp) / "run"),
                        "--no-progress", *extra],
                       check=True, capture_output=True, text=True)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("extra", nargs="*", help="flags passed on to kiln train (after --)")
    args = ap.parse_args()
    import torch

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "extra": args.extra,
    }
    alone = [train_once(args.extra) for _ in range(args.repeats)]
    print(f"alone:  {[round(t, 1) for t in alone]} s", flush=True)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        shared = [train_once(args.extra) for _ in range(args.repeats)]
    finally:
        busy.kill()
        busy.wait()
    print(f"shared: {[round(t, 1) for t in shared]} s", flush=True)
    ratio = statistics.median(shared) / statistics.median(alone)
    print(f"shared / alone: {ratio:.2f} (target <= 2)")
    report.update(alone_s=alone, shared_s=shared, ratio=ratio, loadavg_end=os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
