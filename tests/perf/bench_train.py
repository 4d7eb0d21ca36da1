"""Training throughput and the default-run target, on demand (not part of `make test`).

    .venv/bin/python tests/perf/bench_train.py [--epochs-resnet 1]

1. `kiln train` with its defaults (digits, lenet5): wall time and validation top-1 (target: >= 97% in < 60 s).
2. lenet5 on digits and resnet18 on 32x32 RGB inputs (a CIFAR-10-format set of random images written to a
   temporary folder: only the speed is meaningful): training images/s from the run's own summary.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def kiln_train(*args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "train", "--no-progress", "--json", *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout), time.perf_counter() - t0


def fake_cifar(root: Path, n_train: int = 5000, n_test: int = 1000) -> None:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, fh)
    per = n_train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(d / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n).tolist()}, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs-resnet", type=int, default=1)
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, "
          f"cuda={torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        summary, wall = kiln_train("--out", f"{tmp}/default")
        print(f"kiln train (defaults: digits, lenet5, {summary['epochs']} epochs): top-1 "
              f"{summary['metrics']['top1']:.2f}% "
              f"in {wall:.1f} s wall (training loop {summary['timings']['total_s']:.1f} s), "
              f"{summary['timings']['train_images_per_s']:.0f} images/s")
        fake_cifar(Path(tmp) / "c10")
        summary, wall = kiln_train("--data", f"cifar10:{tmp}/c10", "--model", "resnet18", "--epochs",
                                   str(args.epochs_resnet),
                                   "--out", f"{tmp}/r18")
        print("resnet18 32x32 (5,000 random CIFAR-format images, batch 64): "
              f"{summary['timings']['train_images_per_s']:.0f} "
              f"images/s, {wall:.1f} s wall for {args.epochs_resnet} epoch(s)")


if __name__ == "__main__":
    main()
