"""Evaluation of any :class:`~kiln.runtime.base.Backend` on a bundle's validation split.

The images go through :func:`kiln.processing.preprocess` exactly as in serving, so the numbers here are
what the endpoint will deliver. ``kiln eval`` writes the fp32 reference into kiln.json; export and
calibration call :func:`evaluate_backend` to measure every precision variant the same way.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.bundle import Bundle
from kiln.errors import DatasetError
from kiln.fsutil import atomic_path, atomic_write_text
from kiln.processing import preprocess
from kiln.runtime.base import Backend
from kiln.train.data import ImageDataset, open_dataset

log = logging.getLogger("kiln.eval")


def bundle_split(bundle: Bundle, split: str = "val", data: str | None = None) -> ImageDataset:
    """The bundle's own train/val split (as recorded at training time), or ``data``'s with the same classes."""
    training = bundle.manifest.training
    spec = data or training.get("data")
    if not spec:
        raise DatasetError(f"{bundle.root}/kiln.json does not record its dataset; pass --data")
    skip_bad = bool(training.get("config", {}).get("skip_bad_images", False))
    train, val = open_dataset(spec, val_fraction=float(training.get("val_fraction", 0.2)), seed=int(training.get("seed", 0)),
                              skip_bad_images=skip_bad)
    ds = val if split == "val" else train
    if ds.classes != bundle.manifest.classes:
        raise DatasetError(
            f"--data {spec} has classes {ds.classes[:6]}... but the model was trained on {bundle.manifest.classes[:6]}..."
        )
    return ds


@dataclass
class SplitOutputs:
    """Raw model outputs over a split (``name -> [N, ...]``), with the targets and placements."""

    outputs: dict[str, np.ndarray]
    targets: list[Any]
    letterboxes: list[Any]


def batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def run_split(bundle: Bundle, backend: Backend, dataset: ImageDataset, limit: int | None = None,
              batch_size: int | None = None) -> SplitOutputs:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    bs = max(backend.min_batch, min(batch_size or 32, backend.max_batch))
    name = bundle.manifest.input.name
    chunks: dict[str, list[np.ndarray]] = {}
    boxes: list[Any] = []
    for idx in batches(n, bs):
        x, lb = preprocess([dataset.image(i) for i in idx], bundle.manifest.preprocess)
        real = len(x)
        if real < backend.min_batch:  # pad a short last batch up to the profile minimum
            x = np.concatenate([x, np.repeat(x[-1:], backend.min_batch - real, axis=0)])
        out = backend.infer({name: x})
        for k, v in out.items():
            chunks.setdefault(k, []).append(v[:real])
        boxes.extend(lb)
    outputs = {k: np.concatenate(v) for k, v in chunks.items()}
    return SplitOutputs(outputs, [dataset.target(i) for i in range(n)], boxes)


def evaluate_backend(bundle: Bundle | str, backend: Backend, split: str = "val", limit: int | None = None,
                     data: str | None = None) -> dict[str, Any]:
    """Accuracy (classify: top1/top5 percent) or mAP (detect: map, map50) of ``backend`` on a split."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    ds = bundle_split(b, split, data)
    return split_metrics(b, run_split(b, backend, ds, limit), ds)


def split_metrics(bundle: Bundle, res: SplitOutputs, dataset: ImageDataset) -> dict[str, Any]:
    """The task's metrics of outputs already computed over ``dataset`` (see :func:`run_split`)."""
    if bundle.manifest.task == "detect":
        from kiln.train.detect.evaluate import detection_metrics

        return detection_metrics(bundle, res, dataset)
    return classify_report(bundle, res)


def classify_report(bundle: Bundle, res: SplitOutputs) -> dict[str, Any]:
    from kiln.train.tasks import classification_metrics

    logits = res.outputs[bundle.manifest.outputs[0].name]
    return classification_metrics(logits, np.asarray(res.targets), len(bundle.manifest.classes))


def write_classify_reports(bundle: Bundle, metrics: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """confusion.csv, confusion.png and per_class.csv in ``out_dir``."""
    classes = bundle.manifest.classes
    cm: np.ndarray = metrics["confusion"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, cm, strict=True):
        w.writerow([name, *row.tolist()])
    atomic_write_text(out_dir / "confusion.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", "accuracy_percent", "images"])
    for name, acc, count in zip(classes, metrics["per_class"], cm.sum(1), strict=True):
        w.writerow([name, f"{acc:.2f}", int(count)])
    atomic_write_text(out_dir / "per_class.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * k + 2), max(3.5, 0.45 * k + 1.5)))
    im = ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"confusion matrix (top-1 {metrics['top1']:.2f}%)")
    ax.set_xticklabels(classes, rotation=90 if k > 10 else 0)
    ax.set_yticklabels(classes)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(out_dir / "confusion.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return {"confusion_csv": str(out_dir / "confusion.csv"), "confusion_png": str(out_dir / "confusion.png"),
            "per_class_csv": str(out_dir / "per_class.csv")}


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()}
