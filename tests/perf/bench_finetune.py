"""Fine-tuning against training from scratch on a related task, with the same budget.

    .venv/bin/python tests/perf/bench_finetune.py [--model lenet5] [--epochs 10] [--train-per-class 20] [--json out.json]

The pair of related tasks is built from scikit-learn's digits (no download):
- source: digits 0-4, every training image; a model trained on it stands in for "pretrained" weights;
- target: digits 5-9 with only ``--train-per-class`` training images per class (the few-photos case),
  validated on all of their validation images.
Both are written as ``folder:`` datasets (PNG files), so the runs are plain ``kiln train`` commands:
``kiln train --data folder:SOURCE`` once, then on the target ``kiln train --data folder:TARGET`` from
scratch and with ``--weights SOURCE/model.pt`` (the 5-class head is replaced by a new 5-class head),
each for ``--epochs`` with the same settings. Reported: validation top-1 per epoch for both (from each
run's metrics.csv) and the first epoch at which fine-tuning reaches scratch's final accuracy
(target: at most half the epochs). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kiln.data import open_dataset


def write_folder(root: Path, digits: range, per_class: int | None) -> None:
    train, val = open_dataset("digits")
    for split, ds, cap in (("train", train, per_class), ("val", val, None)):
        counts: dict[int, int] = {}
        for i in range(len(ds)):
            label = int(ds.target(i))
            if label not in digits or (cap is not None and counts.get(label, 0) >= cap):
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / split / f"d{label}"
            folder.mkdir(parents=True, exist_ok=True)
            ds.image(i).save(folder / f"{i}.png")


def kiln_train(data: Path, out: Path, model: str, epochs: int, extra: list[str]) -> list[float]:
    subprocess.run([sys.executable, "-m", "kiln.cli", "train", "--data", f"folder:{data}", "--model", model,
                    "--epochs", str(epochs), "--out", str(out), "--no-progress", "--seed", "0", *extra],
                   check=True, capture_output=True, text=True)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    key = next(k for k in rows[0] if k.startswith("val_top1") or k == "val_acc" or k == "val_accuracy")
    return [float(r[key]) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--source-epochs", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--tune-flags", default="", help="extra kiln train flags for the fine-tuned run, e.g. "
                                                   "'--backbone-lr-scale 0.1'")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-finetune-"))
    source, target = work / "source", work / "target"
    write_folder(source, range(0, 5), None)
    write_folder(target, range(5, 10), args.train_per_class)
    kiln_train(source, work / "pre", args.model, args.source_epochs, [])
    scratch = kiln_train(target, work / "scratch", args.model, args.epochs, [])
    tuned = kiln_train(target, work / "tuned", args.model, args.epochs, ["--weights", str(work / "pre" / "model.pt"), *args.tune_flags.split()])
    goal = scratch[-1]
    reached = next((i + 1 for i, acc in enumerate(tuned) if acc >= goal), None)
    for name, accs in (("scratch", scratch), ("fine-tuned", tuned)):
        print(f"{name:10s} " + " ".join(f"{a:5.1f}" for a in accs))
    print(f"scratch final {goal:.1f}%; fine-tuning reaches it at epoch {reached} of {args.epochs} "
          f"(target <= {args.epochs // 2})")
    report: dict[str, Any] = {**vars(args), "json": None, "scratch": scratch, "fine_tuned": tuned,
                              "epoch_reached": reached, "loadavg": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
