"""The Backend protocol every runtime implements, and a base class that checks inputs once.

Lifecycle: a backend is created ready to run (``load()`` builds one), ``infer()`` may be called any
number of times from the thread that owns it, ``close()`` releases it; backends are context managers.
Outputs returned by ``infer()`` belong to the caller (they are never reused buffers).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from kiln.bundle import TensorSpec
from kiln.errors import InputError, KilnError


class BackendClosed(KilnError, RuntimeError):
    """``infer()`` was called after ``close()``."""


@runtime_checkable
class Backend(Protocol):
    """What serve, bench, eval and predict use to run a model, whatever the runtime."""

    name: str
    precision: str
    device: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    min_batch: int
    max_batch: int

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class BaseBackend:
    """Validates feeds against ``inputs`` and the batch range, then calls ``_infer``.

    Subclasses set the attributes in ``__init__`` and implement ``_infer`` and ``_close``.
    """

    name: str = "base"
    precision: str = "fp32"
    device: str = "cpu"
    # Whether infer() may run on several threads at once. A server may then run a small request on its
    # own thread when the backend is idle, instead of handing it to the model's worker thread.
    thread_safe: bool = False
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    min_batch: int = 1
    max_batch: int = 1
    _closed: bool = False

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendClosed(f"{self.name} backend is closed")
        self.check_inputs(feeds)
        return self._infer(feeds)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> BaseBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": self.device,
            "batch": {"min": self.min_batch, "max": self.max_batch},
        }

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise :class:`InputError` naming the tensor, what came and what was expected."""
        expected = {s.name: s for s in self.inputs}
        missing = [n for n in expected if n not in feeds]
        extra = [n for n in feeds if n not in expected]
        if missing or extra:
            raise InputError(
                f"Input tensors: received {sorted(feeds)} | expected {sorted(expected)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unexpected {extra})" if extra else "")
            )
        for name, spec in expected.items():
            arr = feeds[name]
            if not isinstance(arr, np.ndarray):
                raise InputError(
                    f"Input tensor: {name} | received {type(arr).__name__} | expected numpy.ndarray")
            if arr.dtype != np.dtype(spec.dtype):
                raise InputError(f"Input tensor: {name} | received dtype {arr.dtype} | expected {spec.dtype}")
            want = (-1, *spec.shape)
            if arr.ndim != len(want):
                raise InputError(
                    f"Input tensor: {name} | received rank {arr.ndim} shape {tuple(arr.shape)} | "
                    f"expected rank {len(want)} shape {want}"
                )
            if tuple(arr.shape[1:]) != tuple(spec.shape):
                raise InputError(
                    f"Input tensor: {name} | received shape {tuple(arr.shape)} | "
                    f"expected a shape compatible with {want}"
                )
            n = arr.shape[0]
            if not self.min_batch <= n <= self.max_batch:
                raise InputError(
                    f"Input tensor: {name} | received batch {n} | expected a batch in "
                    f"[{self.min_batch}, {self.max_batch}] ({self.name} profile)"
                )

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        return None


def pad_batch(feeds: dict[str, np.ndarray], minimum: int) -> tuple[dict[str, np.ndarray], int]:
    """Zero-pad each feed [N, ...] up to ``minimum`` rows; returns the feeds and the rows added.

    An engine profile may start above batch 1. Callers drop the last ``pad`` rows of every output.
    """
    n = min(v.shape[0] for v in feeds.values())
    pad = max(0, minimum - n)
    if not pad:
        return feeds, 0
    return {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in feeds.items()}, pad
