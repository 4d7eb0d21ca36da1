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

from kiln import processing
from kiln.bundle import Preprocess
from kiln.errors import DatasetError
from kiln.processing import (
    DRAFT_MARGIN,
    SOURCE_SIZE,
    ImageDecodeError,
    covering_size,
    displayed_size,
    load_image,
)

# The input side chosen from a folder set's images is bounded: below 32 px convolutional models run out
# of pixels; above 224 px (the usual ImageNet side) a step costs more without helping small sets.
AUTO_SIZE_MIN = 32
AUTO_SIZE_MAX = 224
AUTO_SIZE_STEP = 16

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("L", "1", "I;16", "I;16B", "I;16L", "I", "LA", "F")

# Decoded 8-bit pixels of a folder split are kept when they fit this many MiB (KILN_DECODE_CACHE_MB):
# small sets are then decoded once, by the pass that checks them, instead of once per epoch. The pass
# decodes each file as training will (a large JPEG at the DCT scale the input size takes, see
# kiln.processing.decode), so the cache holds those pixels and nothing decodes the file again.
DECODE_CACHE_MB = 512
HEADER_SAMPLE = 2000  # headers read to choose the decode of a large folder set


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
    """One split of a dataset. ``images`` is a uint8 array ``[N, H, W]`` / ``[N, H, W, 3]`` or a list
    of paths."""

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
    # the DCT scale each cached JPEG was decoded at (None: not a JPEG)
    scales: list[float | None] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int, spec: Preprocess | None = None) -> Image.Image:
        """Image ``i`` as 8-bit pixels, a file decoded for ``spec`` (:func:`kiln.processing.decode`)."""
        if isinstance(self.images, np.ndarray):
            arr = self.images[i]
            return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
        if self.decoded is not None and self.cache_fits(i, spec):
            img = Image.fromarray(self.decoded[i]).convert(self.channels)
            scale = self.scales[i] if self.scales is not None else None
            if scale is not None and scale != 1.0 and self.sizes is not None:
                img.info[SOURCE_SIZE] = (self.sizes[i][1], self.sizes[i][0], scale)  # as decode() records it
            return img
        return load_image(str(self.images[i]), spec=spec).convert(self.channels)

    def cache_fits(self, i: int, spec: Preprocess | None) -> bool:
        """Whether the cached pixels of file ``i`` are what :func:`kiln.processing.decode` computes for
        ``spec``: always for formats decoded in full, and for a JPEG when ``spec`` takes the DCT scale
        the cache was decoded at (else the file is decoded again, so training sees what serving sees)."""
        scale = None if self.scales is None else self.scales[i]
        if scale is None:
            return True
        if self.sizes is None:
            return False
        h, w = self.sizes[i]
        return dct_scale(spec, (w, h)) == scale

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
            None if self.scales is None else [self.scales[i] for i in idx],
        )


def split_indices(n: int, val_fraction: float, seed: int,
                  labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
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
    scales: list[float | None]  # the DCT scale of each readable JPEG's decode; None for other formats


def dct_scale(spec: Preprocess | None, size: tuple[int, int]) -> float:
    """The DCT scale (1, 2, 4 or 8) :func:`kiln.processing.decode` decodes a JPEG of displayed ``size``
    (W, H) at for ``spec``: libjpeg's draft picks the largest scale whose result still covers the request
    (Pillow's ``JpegImageFile.draft``), the request being :data:`DRAFT_MARGIN` times what the input needs."""
    if spec is None or spec.decode != "draft":
        return 1.0
    need_w, need_h = covering_size(spec, size)
    fits = min(size[0] // (need_w * DRAFT_MARGIN), size[1] // (need_h * DRAFT_MARGIN))
    return float(next(s for s in (8, 4, 2, 1) if fits >= s or s == 1))


def auto_side(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(median shorter side, input side)`` of images of ``sizes`` (H, W): the side rounded to a multiple of
    :data:`AUTO_SIZE_STEP` and bounded to :data:`AUTO_SIZE_MIN`..:data:`AUTO_SIZE_MAX`."""
    short = int(np.median([min(h, w) for h, w in sizes]))
    return short, int(min(AUTO_SIZE_MAX, max(AUTO_SIZE_MIN, round(short / AUTO_SIZE_STEP) * AUTO_SIZE_STEP)))


def training_decode(paths: Sequence[Path]) -> Preprocess | None:
    """The decode a run on these image files takes by default: a resize to :func:`auto_side` of their
    sizes, read from the headers only (no pixel decoded; of a seeded sample of :data:`HEADER_SAMPLE` on
    large sets, whose pixels do not fit the cache anyway); None when no header can be read."""
    sample = paths if len(paths) <= HEADER_SAMPLE else [
        paths[int(i)] for i in np.random.default_rng(0).choice(len(paths), HEADER_SAMPLE, replace=False)]
    sizes = []
    for p in sample:
        try:
            with Image.open(p) as im:
                w, h = displayed_size(im)
        except Exception:  # noqa: S112 - an unreadable file is reported by the decoding pass
            continue
        sizes.append((h, w))
    if not sizes:
        return None
    side = auto_side(sizes)[1]
    return Preprocess(mode="resize", size=(side, side), channels="RGB", mean=[0.0] * 3, std=[1.0] * 3)


def decode_cache_bytes() -> int:
    """The decode cache budget in bytes: ``KILN_DECODE_CACHE_MB`` MiB, else :data:`DECODE_CACHE_MB`."""
    text = os.environ.get("KILN_DECODE_CACHE_MB", "")
    try:
        mib = float(text) if text else DECODE_CACHE_MB
    except ValueError:
        raise DatasetError(f"KILN_DECODE_CACHE_MB: expected a number of MiB, got '{text}'") from None
    return max(0, int(mib * 2**20))


def decode_images(paths: Sequence[Path], skip_bad: bool, *, cache_bytes: int | None = None,
                  spec: Preprocess | None = None) -> Decoded:
    """Decode every file once, for ``spec`` (:func:`kiln.processing.decode`: a large JPEG at a DCT scale;
    None: in full): check it, note its displayed size and keep its 8-bit pixels while they fit
    ``cache_bytes`` (default :func:`decode_cache_bytes`); past the budget every pixel is dropped and
    training decodes from the files. Unreadable files stop everything with their paths unless
    ``skip_bad``; then they are logged and reported to :func:`collect_skipped`."""
    budget = decode_cache_bytes() if cache_bytes is None else cache_bytes
    good: list[int] = []
    sizes: list[tuple[int, int]] = []
    pixels: list[np.ndarray] | None = [] if budget > 0 else None
    scales: list[float | None] = []
    held = 0
    gray = True
    bad: list[tuple[Path, Exception]] = []
    for i, p in enumerate(paths):
        try:
            with open(p, "rb") as fh:
                opened = processing.open_image(fh.read())
            draftable = opened.format in ("JPEG", "MPO")  # what decode() may take at a DCT scale
            img = processing.decode(opened, spec)
        except (ImageDecodeError, OSError) as exc:
            bad.append((p, exc))
            continue
        good.append(i)
        w, h, scale = processing.source_size(img)
        sizes.append((h, w))
        scales.append(scale if draftable else None)
        is_gray = img.mode == "L"  # decode() gives 8-bit L for every single-channel mode
        gray = gray and is_gray
        if pixels is not None:
            arr = np.asarray(img)
            held += arr.nbytes
            if held > budget:
                log.info("%d decoded images exceed the decode cache (%d MiB, KILN_DECODE_CACHE_MB): images "
                         "are decoded from their files in every epoch", len(paths), budget // 2**20)
                pixels = None
            else:
                pixels.append(arr)
    _report_bad(bad, skip_bad)
    return Decoded(good, sizes, gray and bool(good), pixels, scales)


def _report_bad(bad: list[tuple[Path, Exception]], skip_bad: bool) -> None:
    if bad and not skip_bad:
        first = "; ".join(f"{p}: {e}" for p, e in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError(
            f"{len(bad)} unreadable image(s): {first}{more}. Fix them or pass --skip-bad-images")
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0][0])
        found = _skipped.get()
        if found is not None:
            found.extend(SkippedImage(str(p), str(e)) for p, e in bad)

