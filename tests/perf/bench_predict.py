"""`kiln predict` on a folder against a bare batched ONNX Runtime loop, in one run (not part of `make test`).

    .venv/bin/python tests/perf/bench_predict.py [--bundle runs/digits] [--images 3000] [--tiny 100000]

1. N crops (64x64 JPEG) of scikit-learn's sample photos in a temporary folder.
2. The bare loop: one ``onnxruntime.InferenceSession`` on the bundle's model.onnx with ONNX Runtime's
   default threads, images decoded by ``kiln.processing.load_image`` + ``preprocess`` (the same work
   kiln does) one after the other, ``session.run`` on batches of ``--batch``.
3. ``kiln predict BUNDLE FOLDER --backend onnxrt --out preds.jsonl --batch B`` as a user runs it.
Each runs in its own process, alternately, ``--repeat`` times; reported: wall time (process start to
exit) and the time the work took (from the first image to the last result, as each prints it), images/s,
the ratio kiln/bare, and each process's peak RSS (its VmHWM).
4. With ``--tiny N``: kiln predict on N 8x8 PNGs, RSS sampled from /proc while it runs: flat means the
   last samples are no higher than those early in the run.

Without ``--bundle`` a lenet5 digits bundle is trained (1 epoch) and exported in the temporary folder.
The machine's load average is printed first and last: figures taken on a loaded machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BARE = r"""
import sys, time
import numpy as np, onnxruntime as ort
from kiln.bundle import Bundle
from kiln.processing import load_image, preprocess
from kiln.data import IMG_EXTENSIONS
import os
bundle, folder, batch = Bundle.load(sys.argv[1]), sys.argv[2], int(sys.argv[3])
m = bundle.manifest
sess = ort.InferenceSession(str(bundle.path("model.onnx")), providers=["CPUExecutionProvider"])
paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
               if os.path.splitext(f)[1].lower() in IMG_EXTENSIONS)
t0 = time.perf_counter()
top1 = []
for i in range(0, len(paths), batch):
    x, _ = preprocess([load_image(p) for p in paths[i:i + batch]], m.preprocess)
    logits = sess.run(None, {m.input.name: x})[0]
    top1.extend(np.argmax(logits, axis=1).tolist())
print(f"bare: {len(top1)} images in {time.perf_counter() - t0:.3f} s")
"""


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def photo_crops(folder: Path, n: int, size: int = 64) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True)
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        im = photos[i % len(photos)]
        y, x = int(rng.integers(0, im.shape[0] - size)), int(rng.integers(0, im.shape[1] - size))
        Image.fromarray(im[y:y + size, x:x + size]).save(folder / f"{i:06d}.jpg", quality=90)


def tiny_pngs(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def digits_bundle(root: Path) -> Path:
    kiln = [sys.executable, "-m", "kiln.cli"]
    subprocess.run([*kiln, "train", "--epochs", "1", "--out", str(root), "--no-progress"], check=True,
                   capture_output=True)
    subprocess.run([*kiln, "export", str(root)], check=True, capture_output=True)
    return root


def timed(cmd: list[str], env: dict[str, str], rss_samples: list[tuple[int, int]] | None = None,
          out_file: Path | None = None) -> tuple[float, int, str]:
    """Run ``cmd``: wall seconds, peak RSS in MB, combined output; with ``rss_samples``, (results written
    to ``out_file``, RSS MB) every 0.5 s.

    The peak is the child's own high-water mark (VmHWM in /proc, read every 0.2 s until it exits):
    wait4's ru_maxrss would report this script's RSS, which a child inherits across fork and exec."""
    t0 = time.perf_counter()
    peak_kb, last_sample = 0, 0.0
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks on it
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            hwm = re.search(r"VmHWM:\s+(\d+)", status)
            rss = re.search(r"VmRSS:\s+(\d+)", status)
            if hwm and rss:
                peak_kb = max(peak_kb, int(hwm.group(1)))
                if rss_samples is not None and time.perf_counter() - last_sample >= 0.5:
                    last_sample = time.perf_counter()
                    lines = out_file.read_bytes().count(b"\n") if out_file and out_file.exists() else 0
                    rss_samples.append((lines, int(rss.group(1)) // 1024))
            time.sleep(0.2)
        proc.wait()
        log.seek(0)
        output = log.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-2000:]}")
    return wall, peak_kb // 1024, output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="kiln predict --threads (default: its own)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tiny", type=int, default=0, help="also run on this many 8x8 PNGs, sampling RSS")
    args = ap.parse_args()
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = args.bundle or digits_bundle(root / "digits")
        folder = root / "photos"
        photo_crops(folder, args.images)
        out = root / "preds.jsonl"
        predict = [sys.executable, "-m", "kiln.cli", "predict", str(bundle), str(folder), "--backend",
                   "onnxrt",
                   "--out", str(out), "--batch", str(args.batch), "--no-progress"]
        if args.threads:
            predict += ["--threads", str(args.threads)]
        bare = [sys.executable, "-c", BARE, str(bundle), str(folder), str(args.batch)]
        rows: dict[str, list[tuple[float, float, int]]] = {"bare": [], "kiln": []}
        for _ in range(args.repeat):
            for name, cmd in (("bare", bare), ("kiln", predict)):
                wall, rss, text = timed(cmd, env)
                work = float(re.search(r"in ([\d.]+) s", text).group(1))  # type: ignore[union-attr]
                rows[name].append((wall, work, rss))
        assert out.read_bytes().count(b"\n") == args.images, "kiln predict wrote one line per image"
        first = json.loads(out.read_text().splitlines()[0])
        print(f"bundle {bundle} ({first['top_k'][0]['label']!r} first), {args.images} images, batch "
              f"{args.batch}")
        for name, vals in rows.items():
            wall = min(v[0] for v in vals)
            work = min(v[1] for v in vals)
            rss = max(v[2] for v in vals)
            print(f"{name:5s} best of {len(vals)}: wall {wall:.2f} s, work {work:.2f} s "
                  f"({args.images / work:.0f} images/s), peak RSS {rss} MB")
        ratio_work = min(v[1] for v in rows["bare"]) / min(v[1] for v in rows["kiln"])
        ratio_wall = min(v[0] for v in rows["bare"]) / min(v[0] for v in rows["kiln"])
        print(f"kiln predict speed / bare loop: {ratio_work:.2f}x (work), {ratio_wall:.2f}x (wall)")
        if args.tiny:
            tiny = root / "tiny"
            tiny_pngs(tiny, args.tiny)
            out_tiny = root / "tiny.jsonl"
            cmd = [*predict[:5], str(tiny), *predict[6:8], "--out", str(out_tiny), *predict[10:]]
            samples: list[tuple[int, int]] = []
            wall, rss, _ = timed(cmd, env, samples, out_tiny)
            print(f"tiny: {args.tiny} 8x8 PNGs in {wall:.1f} s, peak RSS {rss} MB")
            for frac in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
                done = [s for s in samples if s[0] <= frac * args.tiny]
                if done:
                    print(f"  RSS with {done[-1][0]:>7d} results written: {done[-1][1]} MB")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
