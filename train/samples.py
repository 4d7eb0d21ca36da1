"""A few validation images of a dataset written as PNG files, to look at or to send to ``kiln predict``."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from kiln.data import DataSpec, ImageDataset, open_dataset
from kiln.draw import render

# Tiny images (digits are 8x8) are upscaled to this side so they can be seen; the model's preprocessing
# resizes them back, as it does any input.
MIN_SIDE = 64


def write_samples(data: str, out: str | Path, count: int | None = None, *, seed: int = 0) -> list[Path]:
    """Write ``count`` validation images of ``data`` into ``out`` and return their paths.

    Classification: ``<name>-<label>-<i>.png``, one class after another so every label shows up early.
    Detection: ``<name>-<i>.png`` and ``<name>-<i>-boxes.png`` with the ground-truth boxes drawn.
    """
    _, val = open_dataset(data, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = DataSpec.parse(data).name
    prefix = "digit" if name == "digits" else name
    if val.task == "detect":
        return _detect_samples(val, out, prefix, count or 4)
    return _classify_samples(val, out, prefix, count or len(val.classes))


def _visible(img: Image.Image) -> Image.Image:
    w, h = img.size
    if max(w, h) >= MIN_SIDE:
        return img
    scale = MIN_SIDE / max(w, h)
    return img.resize((round(w * scale), round(h * scale)))


def _round_robin(ds: ImageDataset, count: int) -> list[int]:
    """Indices taking one image of each class in turn, so a few samples cover many classes."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(ds.targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[int] = []
    depth = 0
    while len(picked) < min(count, len(ds)):
        for q in queues:
            if depth < len(q) and len(picked) < count:
                picked.append(q[depth])
        depth += 1
    return picked


def _classify_samples(ds: ImageDataset, out: Path, prefix: str, count: int) -> list[Path]:
    paths = []
    for n, i in enumerate(_round_robin(ds, count)):
        path = out / f"{prefix}-{ds.classes[int(ds.target(i))]}-{n}.png"
        _visible(ds.image(i)).save(path)
        paths.append(path)
    return paths


def _detect_samples(ds: ImageDataset, out: Path, prefix: str, count: int) -> list[Path]:
    paths = []
    for i in range(min(count, len(ds))):
        img = ds.image(i).convert("RGB")
        plain = out / f"{prefix}-{i}.png"
        img.save(plain)
        target = ds.target(i)
        # ground truth drawn the way `kiln predict --save` draws predictions (score 1), so they compare
        truth = {"boxes": [{"index": int(c), "label": ds.classes[int(c)], "score": 1.0,
                            "box": [float(v) for v in box]}
                           for box, c in zip(target["boxes"], target["labels"], strict=True)]}
        boxed = out / f"{prefix}-{i}-boxes.png"
        render(img, truth, ds.classes).save(boxed)
        paths += [plain, boxed]
    return paths
