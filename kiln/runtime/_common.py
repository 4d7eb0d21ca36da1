"""What the three backends share beyond :class:`~kiln.runtime.base.BaseBackend`: the artifact they
run, the reasons ``load()`` skipped other backends, device strings and the batch range."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Self

from kiln.bundle import Artifact, BatchRange, Bundle, TensorSpec
from kiln.errors import ConfigError
from kiln.runtime.base import BaseBackend


class KilnBackend(BaseBackend):
    """BaseBackend plus the provenance ``load()`` records: which artifact, and why others were skipped."""

    artifact: str | None = None

    def __init__(self) -> None:
        self.fallback_log: list[str] = []

    @classmethod
    def from_artifact(cls, bundle: Bundle, art: Artifact, *, device: str | None = None, **opts: Any) -> Self:
        """Open ``art`` of ``bundle`` (sha256 checked), with tensor specs from its manifest."""
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info["artifact"] = self.artifact
        if self.fallback_log:
            info["skipped"] = list(self.fallback_log)
        return info


@dataclass(frozen=True)
class Device:
    """A parsed ``device`` argument: ``kind`` is ``cpu`` or ``cuda``; ``index`` only for cuda."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_device(device: str | None) -> Device | None:
    """``None``/``"auto"`` -> None (the backend picks); ``"cpu"``, ``"cuda"``, ``"cuda:N"`` -> Device."""
    if device is None or device == "auto":
        return None
    text = device.strip().lower()
    if text == "cpu":
        return Device("cpu")
    if text == "cuda" or text == "gpu":
        return Device("cuda", 0)
    if text.startswith("cuda:") and text[5:].isdigit():
        return Device("cuda", int(text[5:]))
    raise ConfigError(f"--device: unknown device '{device}'. Valid: auto, cpu, cuda, cuda:N")


def batch_limits(batch: BatchRange, max_batch: int | None) -> tuple[int, int]:
    """(min, max) batch for torch/onnx: 1 .. the manifest's max, unless ``max_batch`` overrides it."""
    if max_batch is None:
        return 1, batch.max
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    return 1, max_batch


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (torch takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def spec_names(specs: list[TensorSpec]) -> list[str]:
    return [s.name for s in specs]
