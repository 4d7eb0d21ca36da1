"""``kiln bench BUNDLE``: every (backend, precision, batch) combination of a bundle, timed in-process.

Every runnable (backend, precision, batch) combination is timed after a warm-up, with the PyTorch fp32
baseline measured batch by batch in the same run so speedups compare like with like. Inputs are random
tensors of the bundle's input spec (standard normal, fixed seed: roughly what a normalized image looks
like) or real images read through the bundle's own preprocessing.

Each combination is timed by :func:`kiln.bench.engine.time_backend`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.bench.engine import time_backend
from kiln.bench.environment import environment
from kiln.bench.stats import summarize
from kiln.bundle import Bundle
from kiln.errors import ConfigError, InputError, KilnError, unknown_choice
from kiln.runtime import OPTIONS, load
from kiln.vocab import BACKEND_CHOICES, BACKEND_NAMES, PRECISIONS

ALL_BACKENDS = BACKEND_NAMES
BACKENDS = (*BACKEND_CHOICES, "all")
BASELINE = ("torch", "fp32")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_IMAGES = 256


@dataclass
class BenchConfig:
    """What ``kiln bench BUNDLE`` measures. Validated on construction."""

    backends: list[str] = field(default_factory=lambda: ["auto"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    warmup: int = 10
    iters: int | None = 100
    duration: float | None = None
    threads: int | None = None
    device: str | None = None
    images: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for b in self.backends:
            if b not in BACKENDS:
                raise unknown_choice("backend", b, BACKENDS, flag="--backend")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise unknown_choice("precision", p, PRECISIONS, flag="--precision")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ConfigError(f"--batch: batch sizes must be >= 1, got {self.batches}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"--iters must be >= 1, got {self.iters}")
        if self.duration is not None and not self.duration > 0:
            raise ConfigError(f"--duration must be > 0, got {self.duration}")
        if (self.iters is None) == (self.duration is None):
            raise ConfigError("give exactly one of --iters and --duration")

    def combos(self) -> list[tuple[str, str]]:
        """(backend, precision) pairs to try, in the user's order, without duplicates."""
        names: list[str] = []
        for b in self.backends:
            for n in ALL_BACKENDS if b == "all" else (b,):
                if n not in names:
                    names.append(n)
        return [(b, p) for b in names for p in self.precisions]

    def to_json(self) -> dict[str, Any]:
        return {
            "backends": self.backends, "precisions": self.precisions, "batches": self.batches,
            "warmup": self.warmup, "iters": self.iters, "duration_s": self.duration, "threads": self.threads,
            "device": self.device,
            "inputs": f"images from {self.images}" if self.images else f"random normal, seed {self.seed}",
        }


@dataclass
class Result:
    """One (backend, precision, batch) row. ``status`` is ``ok`` or ``skipped`` (then ``reason``)."""

    backend: str
    precision: str
    batch: int
    status: str = "ok"
    reason: str | None = None
    requested: str | None = None  # "auto" when the backend was chosen by load()
    device: str | None = None
    artifact: str | None = None
    timer: str | None = None
    baseline: bool = False
    latency_ms: dict[str, float] | None = None
    throughput: float | None = None  # items (images) per second
    speedup: float | None = None  # throughput / torch fp32 throughput at the same batch
    speedup_p50: float | None = None  # torch fp32 p50 / this p50: steadier than the mean on a busy machine
    phases_ms: dict[str, dict[str, float]] | None = None
    samples_ms: list[float] | None = None
    wall_s: float | None = None  # wall time of the timed loop, timer overhead included

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k in ("reason",)}


@dataclass
class _Loaded:
    requested: str
    precision: str
    backend: Any | None
    reason: str | None
    baseline: bool
    same_as_baseline: bool = False  # "auto" chose torch fp32: the baseline's rows answer it


def short_reason(message: str, backend: str) -> str:
    """The backend's own reason out of load()'s "no backend can run ...: NAME: why. The bundle has: ..."."""
    head, sep, rest = message.partition(f": {backend}: ")
    if sep and head.startswith("no backend can run"):
        message = rest
    return message.split(". The bundle has:")[0]


def _load(bundle: Bundle, backend: str, precision: str, cfg: BenchConfig) -> Any:
    opts: dict[str, Any] = {}
    # --threads sets CPU thread pools; a TensorRT engine has none, so it is not passed there.
    # ("auto" is not in OPTIONS; load() hands each backend only the options it knows.)
    if cfg.threads is not None and "threads" in OPTIONS.get(backend, frozenset({"threads"})):
        opts["threads"] = cfg.threads
    if cfg.device is not None:
        opts["device"] = cfg.device
    if backend in ("onnxrt", "torch"):
        # Let the framework backends take the largest batch asked for, even above kiln.json's max;
        # an engine's profile is fixed and bounds its batches instead.
        opts["max_batch"] = max(max(cfg.batches), bundle.manifest.input.batch.max)
    return load(bundle, backend=backend, precision=precision, **opts)


def make_inputs(bundle: Bundle, batch: int, cfg: BenchConfig) -> dict[str, np.ndarray]:
    """Feeds for one call: ``{input name: [batch, *shape]}`` random normal, or real images tiled."""
    spec = bundle.manifest.input
    shape = (batch, *spec.shape)
    if cfg.images:
        x = _image_tensor(bundle, cfg.images)
        reps = math.ceil(batch / x.shape[0])
        arr = np.concatenate([x] * reps)[:batch]
    else:
        rng = np.random.default_rng(cfg.seed)
        arr = rng.standard_normal(shape, dtype=np.float32)
    return {spec.name: np.ascontiguousarray(arr.astype(np.dtype(spec.dtype), copy=False))}


_IMAGE_CACHE: dict[tuple[str, str], np.ndarray] = {}


def _image_tensor(bundle: Bundle, images: str) -> np.ndarray:
    """The images under ``images`` through the bundle's preprocessing, ``[N, *input.shape]``, cached."""
    key = (str(bundle.root), images)
    if key in _IMAGE_CACHE:
        return _IMAGE_CACHE[key]
    # PIL is loaded only when real images are asked for.
    from kiln.processing import load_image, preprocess

    root = Path(images)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGES]
    elif root.is_file():
        files = [root]
    else:
        raise InputError(f"--images: {images} is neither an image file nor a folder")
    if not files:
        raise InputError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")
    spec = bundle.manifest.preprocess
    x, _ = preprocess([load_image(str(f), spec=spec) for f in files], spec)
    _IMAGE_CACHE[key] = x
    return x


def _load_all(bundle: Bundle, cfg: BenchConfig) -> list[_Loaded]:
    """Every requested (backend, precision), the baseline first; failures keep their reason."""
    loaded: list[_Loaded] = []

    def try_load(backend: str, precision: str, baseline: bool) -> None:
        try:
            loaded.append(_Loaded(backend, precision, _load(bundle, backend, precision, cfg), None, baseline))
        except KilnError as exc:
            loaded.append(_Loaded(backend, precision, None, short_reason(str(exc), backend), baseline))
        except ModuleNotFoundError as exc:
            loaded.append(_Loaded(backend, precision, None, f"{exc.name} is not installed", baseline))

    # The baseline is always measured, first, even when --backend leaves torch out.
    try_load(*BASELINE, baseline=True)
    for backend, precision in cfg.combos():
        if (backend, precision) != BASELINE:
            try_load(backend, precision, baseline=False)
            last = loaded[-1].backend
            if last is not None and (last.name, last.precision) == BASELINE:
                last.close()  # "auto" chose torch fp32: that is the baseline row already
                loaded[-1] = _Loaded(backend, precision, None, None, baseline=False, same_as_baseline=True)
    return loaded


def _measure(entry: _Loaded, batch: int, feeds: dict[str, np.ndarray], cfg: BenchConfig,
             say: Callable[[str], None]) -> Result:
    """One row: timed, or skipped with the reason."""
    b = entry.backend
    name = b.name if b is not None else entry.requested
    row = Result(name, entry.precision, batch, baseline=entry.baseline,
                 requested=entry.requested if entry.requested != name else None)
    if b is None:
        row.status, row.reason = "skipped", entry.reason
        return row
    if not b.min_batch <= batch <= b.max_batch:
        row.status = "skipped"
        row.reason = f"batch {batch} is outside the backend's range [{b.min_batch}, {b.max_batch}]"
        return row
    say(f"{row.label} batch {batch}")
    try:
        samples, phases, wall, timer = time_backend(b, feeds, cfg.warmup, cfg.iters, cfg.duration)
    except KilnError as exc:
        row.status, row.reason = "skipped", str(exc)
        return row
    row.device = str(b.device)
    row.artifact = getattr(b, "artifact", None)
    row.timer = timer
    row.samples_ms = [round(s, 6) for s in samples]
    row.latency_ms = summarize(samples)
    # Items per second from the summed call times, so loop overhead is not counted.
    row.throughput = batch * len(samples) / (sum(samples) / 1000.0)
    row.wall_s = wall
    if phases:
        row.phases_ms = {k: summarize(v) for k, v in phases.items()}
    return row


def _add_speedups(rows: list[Result]) -> None:
    """Speedups against the baseline row of the same batch, when it ran."""
    base = next((r for r in rows if r.baseline and r.status == "ok"), None)
    if base is None or not base.throughput or not base.latency_ms:
        return
    for row in rows:
        if row.throughput is not None and row.latency_ms:
            row.speedup = row.throughput / base.throughput
            row.speedup_p50 = base.latency_ms["p50"] / row.latency_ms["p50"]


def run_bench(bundle_path: str | os.PathLike[str], cfg: BenchConfig,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every combination of ``cfg``; returns the report (``environment``, ``config``, ``results``)."""
    bundle = Bundle.load(bundle_path)
    say = progress or (lambda _msg: None)
    loaded = _load_all(bundle, cfg)
    results: list[Result] = []
    produced: list[list[Result]] = [[] for _ in loaded]
    try:
        for batch in cfg.batches:
            feeds = make_inputs(bundle, batch, cfg)
            rows = []
            for entry, mine in zip(loaded, produced, strict=True):
                if not entry.same_as_baseline:
                    mine.append(_measure(entry, batch, feeds, cfg, say))
                    rows.append(mine[-1])
            _add_speedups(rows)
            results.extend(rows)
    finally:
        for entry in loaded:
            if entry.backend is not None:
                entry.backend.close()
    # A baseline the user did not ask for is marked, so the table can say so.
    if BASELINE not in set(cfg.combos()):
        for row in results:
            if row.baseline:
                row.requested = "baseline"
    return {
        "mode": "engine",
        "bundle": str(Path(bundle_path)),
        "model": {"task": bundle.manifest.task, "architecture": bundle.manifest.architecture.name,
                  "input": bundle.manifest.input.model_dump(mode="json")},
        "environment": environment(),
        "config": cfg.to_json(),
        "results": [r.to_json() for r in results],
        "unmet": unmet_requests(cfg, loaded, produced),
    }


def unmet_requests(cfg: BenchConfig, loaded: list[_Loaded],
                   produced: list[list[Result]]) -> list[dict[str, str]]:
    """Each requested (backend, precision) that produced no timed row, with the reasons.

    A backend named in ``--backend`` (or ``auto``) must run; ``all`` means whichever can run here, so
    it asks only that each precision ran on at least one backend.
    """
    rows_of = {id(e): rows for e, rows in zip(loaded, produced, strict=True)}
    baseline_rows = next((rows for e, rows in zip(loaded, produced, strict=True) if e.baseline), [])

    def rows(entry: _Loaded) -> list[Result]:
        return baseline_rows if entry.same_as_baseline else rows_of[id(entry)]

    def ran(entry: _Loaded) -> bool:
        return any(r.status == "ok" for r in rows(entry))

    def why(entry: _Loaded) -> str:
        reasons = dict.fromkeys(r.reason for r in rows(entry) if r.reason)
        return entry.reason or "; ".join(str(r) for r in reasons) or "no batch was timed"

    unmet = [{"backend": e.requested, "precision": e.precision, "reason": why(e)} for e in loaded
             if e.requested in cfg.backends and e.precision in cfg.precisions and not ran(e)]
    if "all" in cfg.backends:
        for precision in cfg.precisions:
            pool = [e for e in loaded if e.precision == precision and e.requested in ALL_BACKENDS]
            if not any(ran(e) for e in pool):
                unmet.append({"backend": "all", "precision": precision,
                              "reason": "; ".join(f"{e.requested}: {why(e)}" for e in pool) or "no backend"})
    return unmet
