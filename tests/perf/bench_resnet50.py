"""A pretrained resnet50 at 224x224 through the whole pipeline: training images/s, then ONNX Runtime
fp32 and INT8 latency per image, with kiln's own commands.

    .venv/bin/python tests/perf/bench_resnet50.py [--images-per-class 48] [--batch-size 16] [--json out.json]

Nothing is downloaded: torchvision's resnet50 checkpoint file (``resnet50-11ad3fa6.pth``, what
``--pretrained`` fetches) is written into a temporary ``TORCH_HOME`` with the architecture's freshly
initialised weights, so ``kiln train --model resnet50 --pretrained`` runs its real path (the cache file is
loaded, the head replaced, the weights' resize-232/crop-224 preprocessing recorded). Speed does not depend
on the weights' values; the accuracies printed do, and mean nothing here. The images are synthetic
photos (smooth colour fields with noise, 256x320 JPEG) in a ``folder:`` dataset of two classes.

Steps, each a kiln command: ``kiln train ... --epochs 1`` (training images/s from its ``--json`` summary),
``kiln export RUN --precision fp32,int8 --calib-images 32`` (INT8's accuracy budget is lifted: the
labels are random), ``kiln bench RUN --backend onnxrt --precision fp32,int8 --batch 1,8``; then the int8
graph again with ``--int8-layout cpu`` (ONNX Runtime's integer kernels) and the same bench.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image


def write_images(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:320].astype(np.float32)
    for split, n in (("train", per_class), ("val", max(8, per_class // 4))):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                a, b, ph = rng.uniform(0.01, 0.05, 3)
                field = np.stack([np.sin(a * xx + ph * k) * np.cos(b * yy) for k in range(1, 4)], -1)
                img = 127 + 90 * field + rng.normal(0, 20, field.shape)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def kiln(*args: str, env: dict[str, str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kiln.cli", *args], check=True, capture_output=True,
                         text=True, env=env)
    return out.stdout, time.perf_counter() - t0


def bench(run: Path, precisions: str, iters: int, env: dict[str, str], layout: str) -> list[dict[str, Any]]:
    """``kiln bench`` rows of ONNX Runtime for ``precisions``, tagged with the int8 graph's layout."""
    out = run / f"bench.{layout}.json"
    kiln("bench", str(run), "--backend", "onnxrt", "--precision", precisions, "--batch", "1,8",
         "--iters", str(iters), "--json", str(out), env=env)
    rows = [r for r in json.loads(out.read_text())["results"] if r["backend"] == "onnxrt"]
    return [{**r, "layout": layout} for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images-per-class", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-r50-"))
    cache = work / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), cache / "resnet50-11ad3fa6.pth")
    env = {**os.environ, "TORCH_HOME": str(work / "torch")}
    write_images(work / "data", args.images_per_class)
    run = work / "run"
    out, train_wall = kiln("train", "--data", f"folder:{work / 'data'}", "--model", "resnet50",
                           "--pretrained",
                           "--epochs", "1", "--batch-size", str(args.batch_size), "--out", str(run),
                           "--no-progress", "--json", env=env)
    summary = json.loads(out)
    manifest = json.loads((run / "kiln.json").read_text())
    _, export_wall = kiln("export", str(run), "--precision", "fp32,int8", "--calib-images", "32",
                          "--max-accuracy-drop", "100", env=env)
    rows = bench(run, "fp32,int8", args.iters, env, "tensorrt")
    kiln("export", str(run), "--precision", "int8", "--int8-layout", "cpu", "--calib-images", "32",
         "--max-accuracy-drop", "100", env=env)
    rows += bench(run, "int8", args.iters, env, "cpu")
    report: dict[str, Any] = {
        "torch": torch.__version__, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
        "preprocess": manifest["preprocess"], "train_images_per_s": summary["timings"]["train_images_per_s"],
        "train_wall_s": round(train_wall, 1), "export_wall_s": round(export_wall, 1),
        "onnxrt": [{"precision": r["precision"] + ("" if r["precision"] == "fp32" else f" {r['layout']}"),
                    "batch": r["batch"], "p50_ms": r["latency_ms"]["p50"],
                    "p99_ms": r["latency_ms"]["p99"], "images_per_s": r["throughput"]} for r in rows
                    if r["status"] == "ok"],
    }
    print(f"resnet50 224x224 --pretrained ({manifest['preprocess']['source']}), batch {args.batch_size}: "
          f"{report['train_images_per_s']} training images/s ({report['train_wall_s']} s for 1 epoch of "
          f"{2 * args.images_per_class} images incl. validation and start-up)")
    for r in report["onnxrt"]:
        print(f"ONNX Runtime CPU {r['precision']:13s} batch {r['batch']:2d}: p50 {r['p50_ms']:.1f} ms "
              f"({r['p50_ms'] / r['batch']:.1f} ms/image), {r['images_per_s']:.1f} images/s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
