"""Small real-photo sets train well with the defaults, and the chance guard fires on one that cannot.

    OMP_NUM_THREADS=1 .venv/bin/python tests/perf/bench_photos_train.py [--models shufflenet_v2_x0_5,...]

Crops of the photos scikit-learn ships (scikit-image's bundled photos too, when it is installed) make a
folder set of 4+ classes, ~60 64x64 crops each (tests/train/photos.py). `kiln train --data folder:...
--model M` runs with nothing else set (the defaults choose input size, batch size, warm-up, precise-BN),
for three torchvision families (shufflenet_v2, mobilenet_v2, regnet) and kiln's own models
(mobilenet_v3_small, lenet5); target: >= 90% validation top-1. Then the same set with its labels shuffled
must end with the validation-at-chance warning. Prints a Markdown table. (kiln's resnet18 takes 64 px
inputs with a stride-1 stem, as costly as 256 px: about an hour on 2 loaded cores.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = "shufflenet_v2_x0_5,mobilenet_v2,regnet_y_400mf,mobilenet_v3_small,lenet5"
TARGET = 90.0


def _photos_module():
    spec = importlib.util.spec_from_file_location("photos", ROOT / "tests" / "train" / "photos.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kiln_train(data: str, model: str, out: Path, extra: list[str]) -> tuple[dict, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "train", "--data", data, "--model", model,
                           "--out", str(out), "--json", "--no-progress", *extra],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"kiln train --model {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), time.perf_counter() - t0, proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default: {DEFAULT_MODELS})")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--shuffled-model", default="shufflenet_v2_x0_5",
                    help="the model trained on shuffled labels")
    ap.add_argument("--extra", default="", help="more kiln train options for every run, e.g. '--epochs 10'")
    args = ap.parse_args()
    photos = _photos_module()
    extra = args.extra.split()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        real, shuffled = Path(tmp) / "photos", Path(tmp) / "shuffled"
        classes = photos.write_photo_crops(real, per_class=args.per_class)
        photos.write_photo_crops(shuffled, per_class=args.per_class, shuffle_labels=True)
        n = sum(1 for _ in real.rglob("*.png"))
        print(f"# {len(classes)} classes ({', '.join(classes)}), {n} crops of 64x64; load average "
              f"{os.getloadavg()[0]:.1f} at start; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores\n")
        print("| model | labels | val top-1 % | best epoch | epochs | input | batch | wall s | chance "
              "warning |")
        print("|---|---|---|---|---|---|---|---|---|")
        runs = [(m, real, "real") for m in args.models.split(",") if m]
        runs.append((args.shuffled_model, shuffled, "shuffled"))
        for model, folder, labels in runs:
            out = Path(tmp) / f"run-{model}-{labels}"
            summary, wall, log = kiln_train(f"folder:{folder}", model, out, extra)
            cfg = json.loads((out / "config.json").read_text())
            top1 = summary["metrics"]["top1"]
            warned = any("sits at chance" in w for w in summary["warnings"])
            print(f"| {model} | {labels} | {top1:.1f} | {summary['best_epoch']} | {summary['epochs']} | "
                  f"{cfg['preprocess']['size'][0]} | {cfg['batch_size']} | {wall:.0f} | "
                  f"{'yes' if warned else 'no'} |",
                  flush=True)
            if labels == "real" and (top1 < TARGET or warned):
                failures.append(f"{model}: {top1:.1f}% (target "
                                f"{TARGET}%){' and a chance warning' if warned else ''}")
            if labels == "shuffled" and not warned:
                failures.append(f"{model} on shuffled labels: no chance warning")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
