"""What every dataset reader returns: :class:`ImageDataset`, plus the split and image checks they share.

Every dataset opens as an :class:`ImageDataset`: raw images (PIL, 8-bit L or RGB) and targets (an int
label for classification; ``{"boxes": float32[K, 4] xyxy pixels, "labels": int64[K]}`` for detection).
Training wraps it with augmentation; eval, export, calibration and serving go through
:mod:`kiln.processing`, so every stage preprocesses identically. Nothing is downloaded: a missing file
is a :class:`~kiln.errors.DatasetError` that says which file was expected where.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from kiln.errors import DatasetError
from kiln.processing import ImageDecodeError, load_image, to_8bit

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("L", "1", "I;16", "I;16B", "I;16L", "I", "LA", "F")

# Decoded 8-bit pixels of a folder split are kept when they fit this many MiB (KILN_DECODE_CACHE_MB):
# small sets are then decoded once, by the pass that checks them, instead of once per epoch.
DECODE_CACHE_MB = 512


@dataclass(frozen=True)
class SkippedImage:
    """An image file that could not be decoded (and was skipped under ``--skip-bad-images``)."""

    path: str
    reason: str


_skipped: ContextVar[list[SkippedImage] | None] = ContextVar("kiln_skipped_images", default=None)


@contextlib.contextmanager
def collect_skipped() -> Iterator[list[SkippedImage]]:
    """Collect every image the readers skip while the block runs (:func:`kiln.data.inspect` lists them)."""
    found: list[SkippedImage] = []
    token = _skipped.set(found)
    try:
        yield found
    finally:
        _skipped.reset(token)


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
    sizes: list[tuple[int, int]] | None = None  # (H, W) of each image as decoded, when a pass has seen them
    decoded: list[np.ndarray] | None = None  # 8-bit pixels of each file, when they fit the decode cache

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        if isinstance(self.images, np.ndarray):
            arr = self.images[i]
            return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
        if self.decoded is not None:
            return Image.fromarray(self.decoded[i]).convert(self.channels)
        return to_8bit(load_image(str(self.images[i]))).convert(self.channels)

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
            None if self.sizes is None else [self.sizes[i] for i in idx],
            None if self.decoded is None else [self.decoded[i] for i in idx],
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
    return decode_images(paths, skip_bad, cache_bytes=0).good


@dataclass
class Decoded:
    """What one decoding pass over image files found (see :func:`decode_images`)."""

    good: list[int]  # indices of the readable files
    sizes: list[tuple[int, int]]  # (H, W) of each readable file, as displayed (EXIF-turned)
    gray: bool  # every readable file is single-channel
    pixels: list[np.ndarray] | None  # 8-bit L or RGB pixels of each readable file; None past the budget


def decode_cache_bytes() -> int:
    """The decode cache budget in bytes: ``KILN_DECODE_CACHE_MB`` MiB, else :data:`DECODE_CACHE_MB`."""
    text = os.environ.get("KILN_DECODE_CACHE_MB", "")
    try:
        mib = float(text) if text else DECODE_CACHE_MB
    except ValueError:
        raise DatasetError(f"KILN_DECODE_CACHE_MB: expected a number of MiB, got '{text}'") from None
    return max(0, int(mib * 2**20))


def decode_images(paths: Sequence[Path], skip_bad: bool, *, cache_bytes: int | None = None) -> Decoded:
    """Decode every file once: check it, note its size and keep its 8-bit pixels while they fit
    ``cache_bytes`` (default :func:`decode_cache_bytes`); past the budget every pixel is dropped and
    training decodes from the files. Unreadable files stop everything with their paths unless
    ``skip_bad``; then they are logged and reported to :func:`collect_skipped`."""
    budget = decode_cache_bytes() if cache_bytes is None else cache_bytes
    good: list[int] = []
    sizes: list[tuple[int, int]] = []
    pixels: list[np.ndarray] | None = [] if budget > 0 else None
    held = 0
    gray = True
    bad: list[tuple[Path, Exception]] = []
    for i, p in enumerate(paths):
        try:
            img = load_image(str(p))
        except (ImageDecodeError, OSError) as exc:
            bad.append((p, exc))
            continue
        good.append(i)
        sizes.append((img.height, img.width))
        is_gray = img.mode in GRAY_MODES
        gray = gray and is_gray
        if pixels is not None:
            arr = np.asarray(to_8bit(img).convert("L" if is_gray else "RGB"))
            held += arr.nbytes
            if held > budget:
                log.info("%d decoded images exceed the decode cache (%d MiB, KILN_DECODE_CACHE_MB): images are "
                         "decoded from their files in every epoch", len(paths), budget // 2**20)
                pixels = None
            else:
                pixels.append(arr)
    _report_bad(bad, skip_bad)
    return Decoded(good, sizes, gray and bool(good), pixels)


def _report_bad(bad: list[tuple[Path, Exception]], skip_bad: bool) -> None:
    if bad and not skip_bad:
        first = "; ".join(f"{p}: {e}" for p, e in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} unreadable image(s): {first}{more}. Fix them or pass --skip-bad-images")
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0][0])
        found = _skipped.get()
        if found is not None:
            found.extend(SkippedImage(str(p), str(e)) for p, e in bad)

