"""What a dataset holds, before anything trains on it: counts per class and split, image sizes, skipped
files, class imbalance, steps per epoch and the input size a run would choose, plus a contact sheet.

``kiln data inspect DATA`` prints :meth:`DatasetSummary.format`; ``kiln train`` logs the same lines
before its first epoch. The public API, for any caller (the CLI, training, an application):

    summary = inspect_dataset("folder:photos", batch_size=16)
    summary.to_dict()                      # JSON-serialisable
    write_contact_sheet("folder:photos", "sheet.png")

Nothing here imports torch: the summary needs only the readers in :mod:`kiln.data`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kiln.data import DataSpec, ImageDataset, open_dataset
from kiln.data.dataset import AUTO_SIZE_MAX, AUTO_SIZE_MIN, SkippedImage, auto_side, collect_skipped
from kiln.draw import class_color
from kiln.fsutil import atomic_path, atomic_write_json
from kiln.processing import displayed_size

# Headers read for the size figures of sets whose readers did not decode every image (COCO, YOLO, VOC).
SIZE_SAMPLE = 2000
IMBALANCE_RATIO = 3.0  # the largest class over the smallest that earns a warning
FEW_IMAGES = 10  # fewer training images than this in a class earn a warning
MIN_STEPS = 10  # fewer optimizer steps per epoch than this earn a warning
MAX_CLASS_ROWS = 20  # past this many classes the printed table shows the largest and smallest ten


@dataclass(frozen=True)
class SizeStats:
    """Image sizes of a split in pixels: min / median / max of the width and of the height."""

    images: int  # how many images the figures are taken over (a sample on large sets)
    width: tuple[int, int, int]
    height: tuple[int, int, int]

    @classmethod
    def of(cls, sizes: Sequence[tuple[int, int]], total: int) -> SizeStats | None:
        """From ``(H, W)`` pairs; ``total`` is the split's size when ``sizes`` is a sample."""
        if not sizes:
            return None
        arr = np.asarray(sizes, dtype=np.int64)

        def mmm(col: np.ndarray) -> tuple[int, int, int]:
            return int(col.min()), int(np.median(col)), int(col.max())

        return cls(min(len(sizes), total), mmm(arr[:, 1]), mmm(arr[:, 0]))

    def format(self) -> str:
        same = self.width[0] == self.width[2] and self.height[0] == self.height[2]
        if same:
            return f"all {self.width[0]}x{self.height[0]}"
        return (f"W x H min {self.width[0]}x{self.height[0]}, median {self.width[1]}x{self.height[1]}, "
                f"max {self.width[2]}x{self.height[2]}")


@dataclass(frozen=True)
class SplitSummary:
    """One split: its images, images per class and (detection) boxes per class."""

    split: str
    images: int
    per_class: dict[str, int]  # classify: images of the class; detect: images holding at least one box of it
    boxes_per_class: dict[str, int] | None  # detect only
    sizes: SizeStats | None


@dataclass(frozen=True)
class InputSize:
    """The input side a run uses, and why (``source``: option, model, data or default)."""

    size: int | None  # None: decided by the model at training time (detection sets without --image-size)
    source: str
    reason: str


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`inspect_dataset` found. Every field is JSON-serialisable through :meth:`to_dict`."""

    data: str
    task: str
    classes: list[str]
    channels: str
    split_source: str  # where val comes from: the dataset's own split or a held-out share
    train: SplitSummary
    val: SplitSummary
    input_size: InputSize
    batch_size: int | None
    steps_per_epoch: int | None
    skipped: list[SkippedImage] = field(default_factory=list)  # unreadable files left out (either split)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def format(self) -> list[str]:
        """Human-readable lines: counts, split, sizes, input size and why, steps per epoch, warnings."""
        t, v = self.train, self.val
        lines = [f"{self.data}: {self.task}, {len(self.classes)} classes, {self.channels}; "
                 f"{t.images} train + {v.images} val images ({self.split_source})"]
        what = "images with" if self.task == "detect" else "images"
        width = max([len("class"), *(len(c) for c in self.classes)])
        lines.append(f"  {'class':<{width}}  train  val   ({what} the class"
                     + ("; boxes in brackets)" if self.task == "detect" else ")"))
        shown = self.classes
        if len(shown) > MAX_CLASS_ROWS:  # the largest and the smallest classes; summary.json has them all
            ranked = sorted(self.classes, key=lambda c: -t.per_class.get(c, 0))
            shown = ranked[: MAX_CLASS_ROWS // 2] + ranked[-(MAX_CLASS_ROWS // 2):]
        for n, c in enumerate(shown):
            if len(shown) < len(self.classes) and n == MAX_CLASS_ROWS // 2:
                lines.append(f"  ... {len(self.classes) - len(shown)} more classes ...")
            row = f"  {c:<{width}}  {t.per_class.get(c, 0):>5}  {v.per_class.get(c, 0):>5}"
            if t.boxes_per_class is not None and v.boxes_per_class is not None:
                row += f"   [{t.boxes_per_class.get(c, 0)} / {v.boxes_per_class.get(c, 0)}]"
            lines.append(row)
        for s in (t, v):
            if s.sizes is not None:
                sample = f" (a sample of {s.sizes.images})" if s.sizes.images < s.images else ""
                lines.append(f"  {s.split} image sizes: {s.sizes.format()}{sample}")
        if self.skipped:
            lines.append(f"  {len(self.skipped)} unreadable file(s) skipped, e.g. {self.skipped[0].path}: "
                         f"{self.skipped[0].reason}")
        size = self.input_size
        lines.append(f"  input size: {size.size}x{size.size} ({size.reason})" if size.size
                     else f"  input size: {size.reason}")
        if self.batch_size and self.steps_per_epoch is not None:
            lines.append(
                f"  batch size {self.batch_size}: {self.steps_per_epoch} optimizer step(s) per epoch")
        lines += [f"  warning: {w}" for w in self.warnings]
        return lines


def data_image_size(train: ImageDataset) -> InputSize | None:
    """The input side the data suggests, or None when it suggests none (detection sets: the model decides).

    In-memory sets of one size (digits, MNIST, CIFAR-10) keep their side (at least 32). Folder sets
    take their median shorter side, rounded to a multiple of 16 and bounded to 32..224, so 64x64 crops
    train at 64 and camera photos at 224.
    """
    if train.task != "classify":
        return None
    if train.native_size:
        side = max(train.native_size)
        size = max(side, AUTO_SIZE_MIN)
        why = f"the images are {train.native_size[1]}x{train.native_size[0]}" + (
            f", raised to the {AUTO_SIZE_MIN} px minimum" if size != side else "")
        return InputSize(size, "data", why)
    sizes = _sizes(train)
    if not sizes:
        return None
    short, size = auto_side(sizes)
    return InputSize(size, "data", f"median shorter side of the training images is {short} px, "
                                   f"rounded and bounded to {AUTO_SIZE_MIN}..{AUTO_SIZE_MAX}")


def steps_per_epoch(images: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch as the training loop takes them (a last partial batch is dropped
    when there is more than one batch)."""
    per_step = batch_size * world
    return images // per_step if images > per_step else 1


def inspect_dataset(data: str | DataSpec, *, batch_size: int | None = None, image_size: int | None = None,
                    val_fraction: float = 0.2, seed: int = 0, skip_bad_images: bool = True) -> DatasetSummary:
    """Open ``data`` (any ``--data`` form) and summarise it.

    Parameters: ``batch_size`` gives steps per epoch; ``image_size`` is the ``--image-size`` a run would
    get (else the size is chosen from the data as :func:`data_image_size` says); ``val_fraction`` and
    ``seed`` split sets without their own val split as training does; unreadable files are skipped and
    listed unless ``skip_bad_images`` is False.

    Returns: a :class:`DatasetSummary`.

    Raises: :class:`~kiln.errors.DatasetError` when the dataset cannot be read (with the file and why).

    Thread-safety: holds no shared state (the skipped-file list is collected per context), so several
    threads may inspect datasets at once. It reads the whole dataset: call it off an event loop.
    """
    with collect_skipped() as skipped:
        train, val = open_dataset(data, val_fraction=val_fraction, seed=seed, skip_bad_images=skip_bad_images)
    if image_size is not None:
        size = InputSize(image_size, "option", "--image-size")
    else:
        size = data_image_size(train) or InputSize(
            None, "model", "set by the model (letterbox at its default side; --image-size changes it)")
    return summarize(str(data), train, val, size, batch_size, skipped)


def summarize(data: str, train: ImageDataset, val: ImageDataset, input_size: InputSize,
              batch_size: int | None, skipped: Sequence[SkippedImage] = (), world: int = 1) -> DatasetSummary:
    """The summary of splits already opened (what ``kiln train`` logs before its first epoch)."""
    t, v = _split_summary(train), _split_summary(val)
    steps = steps_per_epoch(len(train), batch_size, world) if batch_size else None
    source = ("the dataset's own val split" if _has_own_val(train, val)
              else "val held out from the training images")
    return DatasetSummary(data, train.task, list(train.classes), train.channels, source, t, v, input_size,
                          batch_size, steps, list(skipped),
                          _warnings(t, v, train.classes, steps, batch_size, len(skipped)))


def _has_own_val(train: ImageDataset, val: ImageDataset) -> bool:
    """A held-out val split is a subset of the same reader's output, so it carries the same info."""
    if "own_val" in val.info:
        return bool(val.info["own_val"])
    if train.name in ("mnist", "cifar10"):
        return True

    def key(info: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in info.items() if k not in ("image_ids", "dropped_boxes", "clipped_boxes")}

    return key(train.info) != key(val.info)


def _split_summary(ds: ImageDataset) -> SplitSummary:
    per_class = dict.fromkeys(ds.classes, 0)
    boxes: dict[str, int] | None = None
    if ds.task == "detect":
        boxes = dict.fromkeys(ds.classes, 0)
        for target in ds.targets:
            labels = [int(c) for c in target["labels"]]
            for c in labels:
                boxes[ds.classes[c]] += 1
            for c in set(labels):
                per_class[ds.classes[c]] += 1
    else:
        for label in ds.targets:
            per_class[ds.classes[int(label)]] += 1
    return SplitSummary(ds.split, len(ds), per_class, boxes, SizeStats.of(_sizes(ds), len(ds)))


def _sizes(ds: ImageDataset) -> list[tuple[int, int]]:
    """``(H, W)`` of the split's images (of a sample of :data:`SIZE_SAMPLE` headers on large file sets)."""
    if isinstance(ds.images, np.ndarray):
        return [tuple(ds.images.shape[1:3])] * len(ds) if len(ds) else []
    if ds.sizes is not None:
        return list(ds.sizes)
    n = len(ds.images)
    idx = range(n) if n <= SIZE_SAMPLE else np.random.default_rng(0).choice(n, SIZE_SAMPLE, replace=False)
    out = []
    for i in idx:
        try:
            with Image.open(ds.images[int(i)]) as im:
                w, h = displayed_size(im)
        except OSError:
            continue
        out.append((h, w))
    return out


def _warnings(t: SplitSummary, v: SplitSummary, classes: list[str], steps: int | None,
              batch_size: int | None, skipped: int) -> list[str]:
    out = []
    counts = {c: t.per_class.get(c, 0) for c in classes}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        out.append(f"no training images for class(es) {', '.join(empty[:8])}")
    missing_val = [c for c in classes if v.per_class.get(c, 0) == 0 and counts[c] > 0]
    if missing_val:
        out.append(
            f"no validation images for class(es) {', '.join(missing_val[:8])}: "
            "their accuracy is not measured")
    present = [n for n in counts.values() if n > 0]
    if len(present) > 1 and max(present) >= IMBALANCE_RATIO * min(present):
        big = max(counts, key=lambda c: counts[c])
        small = min((c for c in counts if counts[c] > 0), key=lambda c: counts[c])
        out.append(f"class imbalance: '{big}' has {counts[big]} training images, '{small}' {counts[small]} "
                   f"({counts[big] / counts[small]:.1f}x); accuracy favours the large classes")
    few = [c for c, n in counts.items() if 0 < n < FEW_IMAGES]
    if few:
        out.append(f"fewer than {FEW_IMAGES} training images in class(es) {', '.join(few[:8])}")
    if steps is not None and batch_size and steps < MIN_STEPS:
        out.append(f"only {steps} optimizer step(s) per epoch at batch size {batch_size}: "
                   "a smaller --batch-size gives more")
    if skipped:
        out.append(f"{skipped} unreadable image file(s) skipped")
    return out


# ---- contact sheet --------------------------------------------------------------------------------


def write_contact_sheet(data: str | DataSpec | tuple[ImageDataset, ImageDataset],
                        path: str | os.PathLike[str], *,
                        per_class: int = 8, thumb: int = 96, split: str = "train", seed: int = 0,
                        val_fraction: float = 0.2) -> Path:
    """Write a PNG with one row per class: the class name and ``per_class`` sample images of it.

    Parameters: ``data`` is a ``--data`` string or already opened ``(train, val)`` splits; images are
    fitted into ``thumb`` x ``thumb`` cells (small images are scaled up with whole pixels kept sharp);
    ``split`` picks the split shown. Detection rows show images holding the class with its boxes drawn.

    Returns: the path written (atomically).
    """
    if isinstance(data, tuple):
        train, val = data
    else:
        with collect_skipped():
            train, val = open_dataset(data, val_fraction=val_fraction, seed=seed, skip_bad_images=True)
    ds = train if split == "train" else val
    rows = _rows_by_class(ds, per_class, seed)
    font = _font(max(11, thumb // 7))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [f"{name} ({_count(ds, ds.classes.index(name))})" for name, _ in rows]
    label_w = min(260, 16 + max((int(probe.textlength(t, font=font)) for t in texts), default=40))
    pad = 4
    sheet = Image.new("RGB",
                      (label_w + per_class * (thumb + pad) + pad, max(1, len(rows)) * (thumb + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, idx) in enumerate(rows):
        y = pad + r * (thumb + pad)
        c = ds.classes.index(name)
        draw.rectangle((0, y, 6, y + thumb), fill=class_color(c))
        draw.text((10, y + thumb // 2), texts[r], fill=(0, 0, 0), font=font, anchor="lm")
        for k, i in enumerate(idx):
            cell = _thumbnail(ds, i, c, thumb)
            x = label_w + pad + k * (thumb + pad)
            sheet.paste(cell, (x + (thumb - cell.width) // 2, y + (thumb - cell.height) // 2))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        sheet.save(tmp, format="PNG")
    return target


def save_inspection(summary: DatasetSummary, train: ImageDataset, val: ImageDataset,
                    folder: str | os.PathLike[str], *, per_class: int = 8) -> dict[str, Path]:
    """Write ``summary.json`` (the summary's counts) and ``contact_sheet.png`` into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "summary": atomic_write_json(out / "summary.json", summary.to_dict()),
        "contact_sheet": write_contact_sheet((train, val), out / "contact_sheet.png", per_class=per_class),
    }


def _count(ds: ImageDataset, c: int) -> int:
    if ds.task == "detect":
        return sum(1 for t in ds.targets if c in {int(x) for x in t["labels"]})
    return sum(1 for t in ds.targets if int(t) == c)


def _rows_by_class(ds: ImageDataset, per_class: int, seed: int) -> list[tuple[str, list[int]]]:
    holders: dict[int, list[int]] = {c: [] for c in range(len(ds.classes))}
    for i, t in enumerate(ds.targets):
        labels = {int(x) for x in t["labels"]} if ds.task == "detect" else {int(t)}
        for c in labels:
            holders[c].append(i)
    rng = np.random.default_rng(seed)
    rows = []
    for c, idx in holders.items():
        pick = sorted(rng.permutation(idx)[:per_class].tolist()) if idx else []
        rows.append((ds.classes[c], [int(i) for i in pick]))
    return rows


def _thumbnail(ds: ImageDataset, i: int, c: int, side: int) -> Image.Image:
    try:
        img = ds.image(i).convert("RGB")
    except Exception:  # an image the sheet cannot show must not stop the sheet
        return Image.new("RGB", (side, side), (200, 200, 200))
    scale = side / max(img.size)
    if scale >= 2:  # tiny images (digits are 8x8): whole factors keep the pixels sharp
        scale = float(int(scale))
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.NEAREST)
    else:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    if ds.task == "detect":  # drawn after resizing, so a box stays two pixels wide on the thumbnail
        draw = ImageDraw.Draw(img)
        target = ds.target(i)
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            if int(label) == c:
                xy = [float(v) * scale for v in box]
                draw.rectangle(xy, outline=(255, 255, 255), width=3)
                draw.rectangle(xy, outline=class_color(c), width=2)
    return img


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: one bitmap size
        return ImageFont.load_default()


__all__ = [
    "DatasetSummary",
    "InputSize",
    "SizeStats",
    "SplitSummary",
    "data_image_size",
    "inspect_dataset",
    "save_inspection",
    "steps_per_epoch",
    "summarize",
    "write_contact_sheet",
]
