"""Calibration and evaluation images, read through the serving preprocessing.

Calibration draws from the TRAIN split (the validation split measures the result, so it must not
shape the quantization ranges); every image goes through :func:`kiln.processing.preprocess`, the
same function the server calls, so the ranges match what the model sees in production.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from kiln.bundle import Bundle
from kiln.errors import ExportError, KilnError
from kiln.evaluate import bundle_split
from kiln.processing import preprocess

log = logging.getLogger(__name__)


class CalibrationReader(CalibrationDataReader):
    """A re-iterable of ``{input_name: float32[B, C, H, W]}`` batches, preprocessed once and kept.

    ``get_next()`` is what onnxruntime's calibrators call; after it returns ``None`` the reader
    rewinds, so the same object can calibrate several methods. ``iter(reader)`` is an independent pass.
    """

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 16,
                 info: dict[str, Any] | None = None) -> None:
        if images.ndim != 4 or len(images) == 0:
            raise ExportError(f"calibration needs at least one image; got an array of shape {images.shape}")
        if images.dtype != np.float32:
            raise ExportError(f"calibration images must be float32, got {images.dtype}")
        self.input_name = input_name
        self.images = np.ascontiguousarray(images)
        self.batch_size = batch_size
        self.info = dict(info or {})
        self._cursor = 0
        self.batches_served = 0  # lets tests prove a cache hit did not calibrate

    @classmethod
    def from_bundle(cls, bundle: Bundle, count: int = 512, seed: int = 0,
                    batch_size: int = 16) -> CalibrationReader:
        """``count`` train-split images drawn with ``seed``; unreadable images are an error, not skipped."""
        if count < 1:
            raise ExportError(f"--calib-images must be >= 1, got {count}")
        train = bundle_split(bundle, "train")
        n = len(train)
        if n == 0:
            raise ExportError(
                f"calibration: the train split of {bundle.manifest.training.get('data')} has no images")
        if count > n:
            log.warning("calibration: %d images asked, the train split has %d; using all of them", count, n)
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=min(count, n), replace=False))
        spec = bundle.manifest.preprocess
        arrays = []
        for i in idx:
            try:
                img = train.image(int(i), spec)
            except (KilnError, OSError) as exc:
                where = train.images[int(i)] if not isinstance(train.images, np.ndarray) else f"#{int(i)}"
                raise ExportError(f"calibration image {where} is unreadable: {exc}") from None
            x, _ = preprocess([img], spec)
            arrays.append(x)
        images = np.concatenate(arrays)
        info = {"split": "train", "count": len(images), "seed": seed,
                "data": str(bundle.manifest.training.get("data"))}
        return cls(bundle.manifest.input.name, images, batch_size, info)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._cursor >= len(self.images):
            self._cursor = 0
            return None
        batch = self.images[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        self.batches_served += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._cursor = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.images), self.batch_size):
            yield {self.input_name: self.images[start : start + self.batch_size]}

    def digest(self) -> str:
        """sha256 of the preprocessed tensors: any change of images, count, seed or preprocessing shows."""
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        h.update(self.images.tobytes())
        return h.hexdigest()
