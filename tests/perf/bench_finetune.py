"""Fine-tuning against training from scratch on a related task, with the same budget.

    .venv/bin/python tests/perf/bench_finetune.py [--pair hue] [--model resnet18] [--image-size 32]
        [--epochs 10] [--train-per-class 10] [--batch-size 16] [--tune-flags '...'] [--json out.json]

The pairs of related tasks are built from scikit-learn's digits (no download), and written as
``folder:`` datasets (PNG files), so every run is a plain ``kiln train`` command:

- ``--pair hue`` (default), a new domain for the same classes, as photos of one's own are to ImageNet:
  source = the 10 digits in grey on black, from the first half of the digits train split (a model
  trained on it stands in for "pretrained" weights); target = *other* images of the digits (second half
  of the train split, and the val split), drawn in a random hue on a background of another random hue,
  with only ``--train-per-class`` training images per class (the few-photos case).
- ``--pair split``, new classes: source = digits 0-4 (every training image), target = digits 5-9 with
  ``--train-per-class`` training images each.

``kiln train --data folder:SOURCE`` runs once (``--source-epochs``); then on the target the same
command from scratch and with ``--weights SOURCE_RUN/model.pt`` (the target's classes have other names
than the source's, so kiln initializes a new head and loads only the backbone), each for ``--epochs``
with the same settings
(``--tune-flags`` adds flags to the fine-tuned run only). Reported: validation top-1 per epoch for
both (from each run's metrics.csv) and the first epoch at which fine-tuning reaches scratch's final
accuracy (target: at most half the epochs). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from kiln.data import open_dataset


def _hue(img: Image.Image, rng: random.Random) -> Image.Image:
    """The grey digit ``img`` in one random hue on a background of another (at least 90 degrees away)."""
    h = rng.random()
    fg = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    bg = colorsys.hsv_to_rgb((h + rng.uniform(0.25, 0.75)) % 1.0, rng.uniform(0.3, 1.0),
                             rng.uniform(0.2, 0.6))
    return ImageOps.colorize(img.convert("L"), black=tuple(round(255 * c) for c in bg),
                             white=tuple(round(255 * c) for c in fg))


def write_pair(root: Path, pair: str, per_class: int) -> tuple[Path, Path]:
    """Write the source and target ``folder:`` datasets of ``pair`` under ``root``."""
    train, val = open_dataset("digits")
    rng = random.Random(0)
    half = len(train) // 2
    counts: dict[int, int] = {}

    def put(dataset: Path, split: str, ds: Any, i: int, recolor: bool) -> None:
        label = int(ds.target(i))
        # The target's classes have other names ("h3" is the recoloured "d3"), so --weights gets a new
        # head, as a pretrained model's head is replaced for one's own classes; only the backbone carries
        # over.
        folder = dataset / split / f"{'h' if recolor else 'd'}{label}"
        folder.mkdir(parents=True, exist_ok=True)
        img = ds.image(i).convert("RGB")
        (_hue(img, rng) if recolor else img).save(folder / f"{split}{i}.png")

    source, target = root / "source", root / "target"
    for i in range(len(train)):
        label = int(train.target(i))
        if pair == "hue":
            if i < half:
                put(source, "train", train, i, False)
            elif counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                put(target, "train", train, i, True)
        elif label < 5:
            put(source, "train", train, i, False)
        elif counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            put(target, "train", train, i, False)
    for i in range(len(val)):
        label = int(val.target(i))
        if pair == "hue":
            put(source, "val", val, i, False)
            put(target, "val", val, i, True)
        else:
            put(source if label < 5 else target, "val", val, i, False)
    return source, target


def kiln_train(data: Path, out: Path, args: argparse.Namespace, epochs: int, extra: list[str]) -> list[float]:
    cmd = [sys.executable, "-m", "kiln.cli", "train", "--data", f"folder:{data}", "--model", args.model,
           "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--out", str(out), "--no-progress",
           "--seed", "0", *(["--image-size", str(args.image_size)] if args.image_size else []), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return [float(r["val_top1"]) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=("hue", "split"), default="hue")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--source-epochs", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tune-flags", default="", help="extra kiln train flags for the fine-tuned run, e.g. "
                                                   "'--backbone-lr-scale 0.1'")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-finetune-"))
    source, target = write_pair(work, args.pair, args.train_per_class)
    kiln_train(source, work / "pre", args, args.source_epochs, [])
    scratch = kiln_train(target, work / "scratch", args, args.epochs, [])
    tuned = kiln_train(target, work / "tuned", args, args.epochs,
                       ["--weights", str(work / "pre" / "model.pt"), *args.tune_flags.split()])
    goal = scratch[-1]
    reached = next((i + 1 for i, acc in enumerate(tuned) if acc >= goal), None)
    for name, accs in (("scratch", scratch), ("fine-tuned", tuned)):
        print(f"{name:10s} " + " ".join(f"{a:5.1f}" for a in accs))
    print(f"scratch final {goal:.1f}%; fine-tuning reaches it at epoch {reached} of {args.epochs} "
          f"(target <= {args.epochs // 2}); runs in {work}")
    report: dict[str, Any] = {**vars(args), "json": None, "scratch": scratch, "fine_tuned": tuned,
                              "epoch_reached": reached, "loadavg": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
