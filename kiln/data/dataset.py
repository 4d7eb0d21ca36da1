"""What every dataset reader returns: :class:`ImageDataset`, plus the split and image checks they share.

Every dataset opens as an :class:`ImageDataset`: raw images (PIL, 8-bit L or RGB) and targets (an int
label for classification; ``{"boxes": float32[K, 4] xyxy pixels, "labels": int64[K]}`` for detection).
Training wraps it with augmentation; eval, export, calibration and serving go through
:mod:`kiln.processing`, so every stage preprocesses identically. Nothing is downloaded: a missing file
is a :class:`~kiln.errors.DatasetError` that says which file was expected where.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from kiln.bundle import Preprocess
from kiln.errors import DatasetError
from kiln.processing import ImageDecodeError, load_image

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageDataset:
    """One split of a dataset. ``images`` is a uint8 array ``[N, H, W]`` / ``[N, H, W, 3]`` or a list of paths."""

    name: str
    split: Split
    task: Literal["classify", "detect"]
    classes: list[str]
    channels: Literal["L", "RGB"]
    images: np.ndarray | Sequence[Path]
    targets: list[Any]
    native_size: tuple[int, int] | None = None  # (H, W) when every image has the same size
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int, spec: Preprocess | None = None) -> Image.Image:
        """Image ``i`` as 8-bit pixels, a file decoded for ``spec`` (:func:`kiln.processing.decode`)."""
        if isinstance(self.images, np.ndarray):
            arr = self.images[i]
            return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
        return load_image(str(self.images[i]), spec=spec).convert(self.channels)

    def target(self, i: int) -> Any:
        return self.targets[i]

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        idx = list(indices)
        images: np.ndarray | list[Path]
        if isinstance(self.images, np.ndarray):
            images = self.images[np.asarray(idx, dtype=np.int64)]
        else:
            images = [self.images[i] for i in idx]
        return ImageDataset(
            self.name, self.split, self.task, self.classes, self.channels, images,
            [self.targets[i] for i in idx], self.native_size, dict(self.info),
        )


def split_indices(n: int, val_fraction: float, seed: int, labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """A fixed, seeded split; stratified by label when labels are given."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    if labels is None:
        groups = [np.arange(n)]
    else:
        lab = np.asarray(labels)
        groups = [np.flatnonzero(lab == c) for c in np.unique(lab)]
    for g in groups:
        g = rng.permutation(g)
        k = max(1, round(len(g) * val_fraction)) if len(g) > 1 else 0
        val.extend(int(i) for i in g[:k])
        train.extend(int(i) for i in g[k:])
    if not train or not val:
        raise DatasetError(f"dataset of {n} images is too small to split with --val-fraction {val_fraction}")
    return sorted(train), sorted(val)


def check_images(paths: Sequence[Path], skip_bad: bool) -> list[int]:
    """Decode every image once before training; return the indices of the good ones.

    A bad image stops everything with its path unless ``skip_bad`` is set, then they are counted.
    """
    good, bad = [], []
    for i, p in enumerate(paths):
        try:
            load_image(str(p))
        except (ImageDecodeError, OSError) as exc:
            bad.append((p, exc))
            continue
        good.append(i)
    if bad and not skip_bad:
        first = "; ".join(f"{p}: {e}" for p, e in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} unreadable image(s): {first}{more}. Fix them or pass --skip-bad-images")
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0][0])
    return good

