"""``kiln bench``: latency and throughput of a bundle's backends, or of a running server.

Two modes share one command:

* ``kiln bench BUNDLE``: every runnable (backend, precision, batch) combination, timed after a warm-up,
  with the PyTorch fp32 baseline measured batch by batch in the same run so speedups compare like with
  like. Inputs are random tensors of the bundle's input spec (standard normal, fixed seed: roughly what a
  normalized image looks like) or real images read through the bundle's own preprocessing (``--images``).
* ``kiln bench --url http://HOST:PORT --model NAME``: a load generator (closed-loop concurrency sweeps or
  open-loop Poisson arrivals) in :mod:`kiln.loadgen`.

Timing: on the CPU each ``infer()`` is timed with ``time.perf_counter_ns``. On CUDA the torch backend is
timed with ``torch.cuda.Event`` pairs recorded after a synchronize; a TensorRT backend reports its own
per-phase times (host-to-device copy, compute, device-to-host copy) like trtexec, read after each call.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.cli import HelpFormatter, choice, csv_of, non_negative_int, positive_float, positive_int
from kiln.errors import ConfigError, InputError, KilnError

log = logging.getLogger("kiln.bench")

BACKENDS = ("auto", "tensorrt", "onnxrt", "torch", "all")
ALL_BACKENDS = ("tensorrt", "onnxrt", "torch")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BASELINE = ("torch", "fp32")
PHASES = ("h2d", "compute", "d2h")
# A --duration run stops at whichever comes first: the time or this many calls.
MAX_ITERS = 1_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ---- statistics ----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linear interpolation (numpy's default)."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(samples_ms: Sequence[float], percentiles: Sequence[float] = (50, 90, 95, 99)) -> dict[str, float]:
    """count, mean, std, min, max and the given percentiles (keys ``p50`` ...) of latencies in ms."""
    if not samples_ms:
        raise ValueError("no samples to summarize")
    ordered = sorted(samples_ms)
    out: dict[str, float] = {
        "count": len(ordered),
        "mean": statistics.fmean(ordered),
        "std": statistics.pstdev(ordered) if len(ordered) > 1 else 0.0,
        "min": ordered[0],
        "max": ordered[-1],
    }
    for q in percentiles:
        out[f"p{q:g}"] = percentile(ordered, q)
    return out


# ---- environment ---------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name() -> str | None:
    """Name of CUDA device 0, or None without a GPU. Asks torch only if it is already imported."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name(0))
        except Exception:  # a broken driver must not break a CPU benchmark
            return None
    try:
        from kiln.runtime import cuda

        if cuda.device_count() > 0:
            return cuda.device_info(0).name
    except Exception:
        return None
    return None


def library_versions(names: Sequence[str] = ("kiln", "numpy", "torch", "onnxruntime", "tensorrt")) -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers; missing ones are left out."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- engine bench --------------------------------------------------------------------------------


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
                raise ConfigError(f"--backend: unknown backend '{b}'. Valid: {', '.join(BACKENDS)}")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ConfigError(f"--precision: unknown precision '{p}'. Valid: {', '.join(PRECISIONS)}")
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


def short_reason(message: str, backend: str) -> str:
    """The backend's own reason out of load()'s "no backend can run ...: NAME: why. The bundle has: ..."."""
    head, sep, rest = message.partition(f": {backend}: ")
    if sep and head.startswith("no backend can run"):
        message = rest
    return message.split(". The bundle has:")[0]


def _load(bundle: Any, backend: str, precision: str, cfg: BenchConfig) -> Any:
    from kiln.runtime import OPTIONS, load

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


def make_inputs(bundle: Any, batch: int, cfg: BenchConfig) -> dict[str, np.ndarray]:
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


def _image_tensor(bundle: Any, images: str) -> np.ndarray:
    key = (str(bundle.root), images)
    if key in _IMAGE_CACHE:
        return _IMAGE_CACHE[key]
    from kiln.processing import load_image, preprocess

    root = Path(images)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:256]
    elif root.is_file():
        files = [root]
    else:
        raise InputError(f"--images: {images} is neither an image file nor a folder")
    if not files:
        raise InputError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")
    x, _ = preprocess([load_image(str(f)) for f in files], bundle.manifest.preprocess)
    _IMAGE_CACHE[key] = x
    return x


def _phase_times(backend: Any) -> dict[str, float] | None:
    """Per-phase milliseconds of the last infer() if the backend measures them (TensorRT)."""
    timings = getattr(backend, "last_timings", None)
    if callable(timings):
        timings = timings()
    if not timings:
        return None
    out: dict[str, float] = {}
    for phase in PHASES:
        for key in (phase, f"{phase}_ms"):
            if key in timings and timings[key] is not None:
                out[phase] = float(timings[key])
                break
    return out or None


def _timer(backend: Any) -> tuple[str, Callable[[dict[str, np.ndarray]], float]]:
    """(timer name, a function running one infer and returning its milliseconds)."""
    device = str(getattr(backend, "device", "cpu"))
    if backend.name == "torch" and device.startswith("cuda"):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_timed(feeds: dict[str, np.ndarray]) -> float:
            torch.cuda.synchronize()
            start.record()
            backend.infer(feeds)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return "cuda-event", cuda_timed

    def wall(feeds: dict[str, np.ndarray]) -> float:
        t0 = time.perf_counter_ns()
        backend.infer(feeds)
        return (time.perf_counter_ns() - t0) / 1e6

    return "perf_counter", wall


def time_backend(backend: Any, feeds: dict[str, np.ndarray], warmup: int, iters: int | None,
                 duration: float | None) -> tuple[list[float], dict[str, list[float]], float, str]:
    """Warm up, then time calls: (samples ms, phase samples ms, wall seconds of the timed loop, timer)."""
    name, timed = _timer(backend)
    for _ in range(warmup):
        backend.infer(feeds)
    samples: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    limit = iters if iters is not None else MAX_ITERS
    deadline = time.perf_counter() + duration if duration is not None else math.inf
    t0 = time.perf_counter()
    while len(samples) < limit and (not samples or time.perf_counter() < deadline):
        samples.append(timed(feeds))
        if (ph := _phase_times(backend)) is not None:
            for k, v in ph.items():
                phases[k].append(v)
    wall = time.perf_counter() - t0
    return samples, {k: v for k, v in phases.items() if v}, wall, name


def run_bench(bundle_path: str | os.PathLike[str], cfg: BenchConfig,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every combination of ``cfg``; returns the report (``environment``, ``config``, ``results``)."""
    from kiln.bundle import Bundle

    bundle = Bundle.load(bundle_path)
    say = progress or (lambda _msg: None)
    loaded: list[_Loaded] = []

    def try_load(backend: str, precision: str, baseline: bool) -> None:
        try:
            loaded.append(_Loaded(backend, precision, _load(bundle, backend, precision, cfg), None, baseline))
        except KilnError as exc:
            loaded.append(_Loaded(backend, precision, None, short_reason(str(exc), backend), baseline))
        except ModuleNotFoundError as exc:
            loaded.append(_Loaded(backend, precision, None, f"{exc.name} is not installed", baseline))

    combos = cfg.combos()
    # The baseline is always measured, first, even when --backend leaves torch out.
    try_load(*BASELINE, baseline=True)
    for backend, precision in combos:
        if (backend, precision) != BASELINE:
            try_load(backend, precision, baseline=False)
            last = loaded[-1].backend
            if last is not None and (last.name, last.precision) == BASELINE:
                last.close()  # "auto" chose torch fp32: that is the baseline row already
                loaded.pop()
    results: list[Result] = []
    try:
        for batch in cfg.batches:
            feeds = make_inputs(bundle, batch, cfg)
            base_tp: float | None = None
            base_p50: float | None = None
            for entry in loaded:
                b = entry.backend
                name = b.name if b is not None else entry.requested
                row = Result(name, entry.precision, batch, baseline=entry.baseline,
                             requested=entry.requested if entry.requested != name else None)
                if b is None:
                    row.status, row.reason = "skipped", entry.reason
                elif not b.min_batch <= batch <= b.max_batch:
                    row.status = "skipped"
                    row.reason = f"batch {batch} is outside the backend's range [{b.min_batch}, {b.max_batch}]"
                if row.status == "ok" and b is not None:
                    say(f"{row.label} batch {batch}")
                    try:
                        samples, phases, wall, timer = time_backend(b, feeds, cfg.warmup, cfg.iters, cfg.duration)
                    except KilnError as exc:
                        row.status, row.reason = "skipped", str(exc)
                    else:
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
                if entry.baseline and row.status == "ok" and row.latency_ms is not None:
                    base_tp, base_p50 = row.throughput, row.latency_ms["p50"]
                results.append(row)
            for row in results:
                if row.batch == batch and row.throughput is not None and base_tp and row.latency_ms and base_p50:
                    row.speedup = row.throughput / base_tp
                    row.speedup_p50 = base_p50 / row.latency_ms["p50"]
    finally:
        for entry in loaded:
            if entry.backend is not None:
                entry.backend.close()

    # The baseline row stays in the table only if the user asked for it or it is needed for context.
    wanted = set(combos)
    for row in results:
        if row.baseline and BASELINE not in wanted:
            row.requested = "baseline"
    return {
        "mode": "engine",
        "bundle": str(Path(bundle_path)),
        "model": {"task": bundle.manifest.task, "architecture": bundle.manifest.architecture.name,
                  "input": bundle.manifest.input.model_dump(mode="json")},
        "environment": environment(),
        "config": {
            "backends": cfg.backends, "precisions": cfg.precisions, "batches": cfg.batches,
            "warmup": cfg.warmup, "iters": cfg.iters, "duration_s": cfg.duration, "threads": cfg.threads,
            "device": cfg.device,
            "inputs": f"images from {cfg.images}" if cfg.images else f"random normal, seed {cfg.seed}",
        },
        "results": [r.to_json() for r in results],
    }


# ---- output --------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    """Three significant digits below 100, whole numbers (with separators) above."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def engine_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of an engine report; notes list the skipped combinations once each."""
    header = ["backend", "precision", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s", "speedup"]
    rows: list[list[str]] = []
    notes: list[str] = []
    phase_rows = False
    for r in report["results"]:
        if r["status"] != "ok":
            note = f"skipped {r['backend']} {r['precision']}" + (
                f" batch {r['batch']}" if "batch" in (r.get("reason") or "") else "") + f": {r.get('reason')}"
            if note not in notes:
                notes.append(note)
            continue
        lat = r["latency_ms"]
        name = r["backend"] + (" (baseline)" if r.get("requested") == "baseline" else "")
        speed = "1.00x (ref)" if r.get("baseline") else (f"{r['speedup']:.2f}x" if r.get("speedup") else "-")
        rows.append([name, r["precision"], r.get("device") or "-", str(r["batch"]), _fmt(lat["p50"]),
                     _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(lat["mean"]), _fmt(r["throughput"]), speed])
        phase_rows = phase_rows or bool(r.get("phases_ms"))
    if phase_rows:
        for r in report["results"]:
            if r.get("phases_ms"):
                ph = r["phases_ms"]
                notes.append(f"{r['backend']} {r['precision']} batch {r['batch']} phases (p50 ms): " + ", ".join(
                    f"{k} {_fmt(ph[k]['p50'])}" for k in PHASES if k in ph))
    return header, rows, notes


def render_table(title: str, header: list[str], rows: list[list[str]], notes: Sequence[str] = (),
                 use_rich: bool | None = None, left: int = 3) -> str:
    """The table as text: rich's rendering when rich is installed (and not disabled), else plain columns.

    The first ``left`` columns are labels (left-aligned); the others are numbers (right-aligned).
    """
    if use_rich is None:
        use_rich = _has_rich()
    if use_rich:
        import io

        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < left else "right")
        for row in rows:
            table.add_row(*row)
        buf = io.StringIO()
        Console(file=buf, width=160, force_terminal=False).print(table)
        text = buf.getvalue()
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = [title, "  ".join(h.ljust(w) if i < left else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
        lines.append("  ".join("-" * w for w in widths))
        for row in rows:
            lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        text = "\n".join(lines) + "\n"
    if notes:
        text += "".join(f"  {n}\n" for n in notes)
    return text


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def engine_title(report: dict[str, Any]) -> str:
    env = report["environment"]
    where = env.get("gpu") or env.get("cpu")
    cfg = report["config"]
    timed = f"{cfg['iters']} iters" if cfg.get("iters") else f"{cfg['duration_s']} s"
    return f"kiln bench {report['bundle']} on {where} ({timed} after {cfg['warmup']} warm-up, {cfg['inputs']})"


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    from kiln.fsutil import atomic_write_json

    atomic_write_json(Path(path), report)


def plot_engine(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Latency (p50, with p90..p99 as a band) and throughput against batch size, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kiln.fsutil import atomic_path

    series: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        if r["status"] == "ok":
            series.setdefault(f"{r['backend']} {r['precision']} ({r.get('device')})", []).append(r)
    if not series:
        raise KilnError("nothing to plot: every combination was skipped")
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = sorted({r["batch"] for rows in series.values() for r in rows})
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rows]
        line = ax_lat.plot(xs, [r["latency_ms"]["p50"] for r in rows], marker="o", label=f"{label} p50")[0]
        ax_lat.plot(xs, [r["latency_ms"]["p99"] for r in rows], linestyle="--", linewidth=1,
                    color=line.get_color(), label=f"{label} p99")
        ax_tp.plot(xs, [r["throughput"] for r in rows], marker="o", label=label, color=line.get_color())
    for ax, ylabel in ((ax_lat, "latency ms (solid p50, dashed p99)"), (ax_tp, "throughput items/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_tp.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"{Path(report['bundle']).name} on {env.get('gpu') or env.get('cpu')}", fontsize=10)
    fig.tight_layout()
    suffix = Path(path).suffix or ".png"
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format=suffix.lstrip("."), dpi=110)
    plt.close(fig)


# ---- CLI -----------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="latency/throughput of a bundle's backends, or load-test a running server",
        formatter_class=HelpFormatter,
        description=(
            "Benchmark a bundle's backends, or load-test a running kiln server.\n\n"
            "Engine mode (BUNDLE): every runnable backend x precision x batch, p50/p90/p99/mean latency, items/s\n"
            "and the speedup against PyTorch fp32 measured in the same run. Inputs: random tensors of the\n"
            "bundle's input spec (standard normal, fixed seed), or real images with --images.\n"
            "  kiln bench runs/digits\n"
            "  kiln bench runs/digits --backend all --precision fp32,int8 --batch 1,8,32 --json bench.json --plot bench.png\n\n"
            "Server mode (--url): closed-loop concurrency sweeps or open-loop Poisson arrivals against\n"
            "POST /v1/models/NAME/predict (native) or /v2/models/NAME/infer (v2); latency percentiles, requests/s,\n"
            "errors by status code and the server's batch size distribution from /metrics.\n"
            "  kiln bench --url http://127.0.0.1:8000 --model digits --concurrency 1,8,32,64 --duration 10\n"
            "  kiln bench --url http://127.0.0.1:8000 --model digits --rate 200 --duration 20"
        ),
    )
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="bundle folder (engine mode)")
    e = p.add_argument_group("engine mode")
    e.add_argument("--backend", type=csv_of(choice("backend", BACKENDS)), default=["auto"],
                   help="auto | tensorrt | onnxrt | torch | all (comma-separated)")
    e.add_argument("--precision", type=csv_of(choice("precision", PRECISIONS)), default=["fp32"],
                   help="comma-separated: fp32,fp16,bf16,int8 (int8/fp16 need those artifacts)")
    e.add_argument("--batch", type=csv_of(positive_int), default=[1, 8, 32], help="batch sizes, comma-separated")
    e.add_argument("--warmup", type=non_negative_int, default=None,
                   help="warm-up calls per combination (engine, default 10) or requests per level (server, default 20)")
    e.add_argument("--iters", type=positive_int, default=None, help="timed calls per combination (default 100)")
    e.add_argument("--duration", type=positive_float, default=None,
                   help="seconds per combination (engine, instead of --iters) or per level (server, default 10)")
    e.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (ONNX Runtime, torch)")
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: what each backend picks)")
    e.add_argument("--images", metavar="PATH", default=None,
                   help="real inputs: an image file or folder, read through the bundle's preprocessing")
    e.add_argument("--plot", metavar="FILE.png", default=None, help="plot latency and throughput against batch size")
    s = p.add_argument_group("server mode")
    s.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", default=None, help="model name on the server")
    s.add_argument("--concurrency", type=csv_of(positive_int), default=None,
                   help="closed loop: requests in flight, one level after another (default 1,8,32,64)")
    s.add_argument("--rate", type=positive_float, default=None, help="open loop: mean requests/s (Poisson arrivals)")
    s.add_argument("--image", metavar="FILE", default=None,
                   help="image to send (native protocol; default: a generated noise PNG)")
    s.add_argument("--protocol", type=choice("protocol", ("native", "v2")), default="native",
                   help="native: POST /v1/models/NAME/predict; v2: POST /v2/models/NAME/infer (random tensor)")
    s.add_argument("--encoding", type=choice("encoding", ("json", "multipart")), default="json",
                   help="native request body: JSON base64 or multipart file")
    s.add_argument("--images-per-request", type=positive_int, default=1, help="native: images in one request")
    s.add_argument("--timeout", type=positive_float, default=30.0, help="per-request timeout in seconds")
    s.add_argument("--max-requests", type=positive_int, default=100_000, help="cap on requests per level")
    s.add_argument("--max-inflight", type=positive_int, default=512, help="open loop: cap on requests in flight")
    s.add_argument("--api-key", default=None, help="Bearer token; $KILN_API_KEY when not given")
    s.add_argument("--batch-metric", default=None,
                   help="name of the server's batch size histogram (default: the first histogram named *batch_size*)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the full report (environment, config, samples)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random inputs / Poisson arrivals seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.url is not None:
        if args.bundle is not None:
            raise ConfigError("give either BUNDLE (engine mode) or --url (server mode), not both")
        from kiln.loadgen import run_cli

        return run_cli(args)
    if args.bundle is None:
        raise ConfigError("give a BUNDLE folder to benchmark its backends, or --url URL --model NAME for a server")
    server_only = [f for f in ("model", "concurrency", "rate", "image") if getattr(args, f) is not None]
    if server_only:
        raise ConfigError(f"--{server_only[0]} is a server-mode option (it needs --url)")
    if args.iters is not None and args.duration is not None:
        raise ConfigError("give either --iters or --duration, not both")
    cfg = BenchConfig(
        backends=list(args.backend), precisions=list(args.precision), batches=list(args.batch),
        warmup=10 if args.warmup is None else args.warmup,
        iters=None if args.duration is not None else (args.iters or 100),
        duration=args.duration, threads=args.threads, device=args.device, images=args.images, seed=args.seed,
    )
    report = run_bench(args.bundle, cfg, progress=lambda m: log.info("timing %s", m))
    header, rows, notes = engine_table(report)
    print(render_table(engine_title(report), header, rows, notes), end="")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_engine(report, args.plot)
        print(f"wrote {args.plot}")
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1

