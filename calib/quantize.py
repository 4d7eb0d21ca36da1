"""INT8 post-training quantization to a Q/DQ ONNX that TensorRT accepts, under an accuracy budget.

All the quantization work is onnxruntime's ``quantize_static``: calibration (minmax, entropy,
percentile), range caching (``calibration_cache_path``), and Q/DQ insertion. kiln adds the policy:

1. measure every allowed method on the validation split; take the best one within
   ``max_accuracy_drop`` of fp32;
2. if none is within budget, measure per-layer sensitivity (quantize with ONE weighted layer kept in
   float at a time, with the best method's cached ranges) and keep the most sensitive layers in float,
   one more at a time, until the model is within budget, or say that it cannot be.

Two layouts of the Q/DQ graph (``CalibSettings.layout``):

- ``tensorrt`` (the default): symmetric int8 activations and weights (zero point 0), per-channel
  weights, Q/DQ on the inputs of Conv/Gemm/MatMul with their outputs in float; biases stay float
  (TensorRT folds them into its int8 kernels and has no int32 DequantizeLinear). ONNX Runtime's CPU
  provider cannot fuse this into integer kernels: it runs float kernels behind the dequantization, so on a
  CPU this graph is *slower* than fp32.
- ``cpu``: what ONNX Runtime's CPU provider runs as integer kernels (``QLinearConv``, ``MatMulInteger``
  and the like): Q/DQ on the inputs and outputs of every op it can quantize, uint8 activations
  (asymmetric), symmetric int8 per-channel weights, int32 biases. TensorRT cannot build an engine from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.calib.onnxfile import load_onnx
from kiln.errors import ConfigError, ExportError, unknown_choice
from kiln.fsutil import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
LAYOUTS = ("tensorrt", "cpu")
FORMATS = {
    "tensorrt": "QDQ on Conv/Gemm/MatMul inputs, symmetric int8 activations and weights, per-channel "
                "weights, float bias and outputs",
    "cpu": "QDQ on the inputs and outputs of every quantizable op, uint8 activations, symmetric int8 "
           "per-channel weights, int32 bias",
}
# Layers the sensitivity search may keep in float: the ones with weights, where int8 pays off.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CACHE_VERSION = 2


@dataclass(frozen=True)
class CalibSettings:
    """Everything that decides the int8 graph; all of it goes into the cache key."""

    method: str = "auto"
    images: int = 512
    seed: int = 0
    max_accuracy_drop: float = 1.0
    percentile: float = 99.999
    per_channel: bool = True
    eval_limit: int | None = None  # validation images per candidate (None: the whole split)
    batch_size: int = 16
    layout: str = "tensorrt"  # see the module docstring

    def __post_init__(self) -> None:
        if self.method != "auto" and self.method not in METHODS:
            raise unknown_choice("calibration method", self.method, ("auto", *METHODS), flag="--calib-method")
        if self.layout not in LAYOUTS:
            raise unknown_choice("int8 layout", self.layout, LAYOUTS, flag="--int8-layout")
        if self.images < 1:
            raise ConfigError(f"--calib-images must be >= 1, got {self.images}")
        if self.max_accuracy_drop < 0:
            raise ConfigError(f"--max-accuracy-drop must be >= 0, got {self.max_accuracy_drop}")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}")

    def methods(self) -> tuple[str, ...]:
        return METHODS if self.method == "auto" else (self.method,)


# ---- the budget search: pure logic over a `measure(method, excluded) -> metric` function ------------

Measure = Callable[[str, tuple[str, ...]], float]


@dataclass
class Trial:
    method: str
    excluded: tuple[str, ...]
    metric: float


@dataclass
class SearchResult:
    method: str
    excluded: tuple[str, ...]
    metric: float
    baseline: float
    budget: float
    within_budget: bool
    trials: list[Trial] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # most sensitive first

    @property
    def drop(self) -> float:
        return round(self.baseline - self.metric, 4)


def search(methods: Sequence[str], layers: Sequence[str], measure: Measure, baseline: float,
           budget: float) -> SearchResult:
    """Pick the calibration method and the layers to keep in float.

    ``layers`` are the candidates in graph order (ties in sensitivity go to the earlier layer).
    """
    trials: list[Trial] = []

    def run(method: str, excluded: tuple[str, ...]) -> float:
        metric = float(measure(method, excluded))
        trials.append(Trial(method, excluded, metric))
        log.info("int8 %-10s float layers %-3d -> %.3f (fp32 %.3f, drop %.3f)", method, len(excluded), metric,
                 baseline, baseline - metric)
        return metric

    def within(metric: float) -> bool:
        return baseline - metric <= budget + 1e-9

    scores = {m: run(m, ()) for m in methods}
    best = max(methods, key=lambda m: (scores[m], -methods.index(m)))
    if within(scores[best]):
        return SearchResult(best, (), scores[best], baseline, budget, True, trials)

    quantized = scores[best]
    gains = []
    for order, layer in enumerate(layers):
        gains.append((run(best, (layer,)) - quantized, order, layer))
    gains.sort(key=lambda g: (-g[0], g[1]))
    sensitivity = [{"layer": layer, "gain": round(gain, 4)} for gain, _, layer in gains]

    excluded: tuple[str, ...] = ()
    metric = quantized
    result_excluded: tuple[str, ...] = ()
    result_metric = quantized
    for _gain, _order, layer in gains:
        excluded = (*excluded, layer)
        metric = run(best, excluded)
        if metric > result_metric:
            result_excluded, result_metric = excluded, metric
        if within(metric):
            return SearchResult(best, excluded, metric, baseline, budget, True, trials, sensitivity)
    return SearchResult(best, result_excluded, result_metric, baseline, budget, False, trials, sensitivity)


# ---- onnxruntime quantization ----------------------------------------------------------------------


def prepare(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> None:
    """onnxruntime's recommended pre-processing: shape inference and graph optimization (Conv+BN folding)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path))
    except Exception as exc:  # symbolic shape inference can fail on exotic graphs; it is only an aid
        log.warning("quant_pre_process failed (%s); quantizing the graph as exported", exc)
        shutil.copyfile(fp32_path, out_path)


def weighted_layers(onnx_path: str | os.PathLike[str]) -> list[str]:
    """Names of the nodes with weights, in graph order: the candidates to keep in float."""
    model = load_onnx(onnx_path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in inits:
            out.append(node.name)
    if len(set(out)) != len(out):
        raise ExportError("the graph has duplicate node names; layers cannot be excluded by name")
    return out


def quantize(prepared: str | os.PathLike[str], out_path: str | os.PathLike[str], *, method: str,
             settings: CalibSettings, ranges: Path, reader: Any, excluded: Sequence[str] = ()) -> None:
    """One ``quantize_static`` call. ``ranges`` is onnxruntime's calibration cache: read if present
    (no calibration inference), written otherwise."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    cpu = settings.layout == "cpu"
    extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True} if cpu else {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        # Q/DQ on the inputs (activation and weight) of weighted layers only, outputs left in float:
        # the placement TensorRT's explicit quantization fuses, and the one that keeps precision in
        # box regression (kiln-det-s on shapes: mAP 58 with every tensor quantized, 81 like fp32 here).
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
    }
    # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMaxCalibrater drops the batches it
    # clears instead of merging them. minmax keeps only per-batch ReduceMin/ReduceMax scalars anyway.
    if method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    if reader is not None and hasattr(reader, "rewind"):
        reader.rewind()
    try:
        # The histogram calibrators print progress on stdout: keep it for -v, never on stdout (--json).
        progress = sys.stderr if log.isEnabledFor(logging.DEBUG) else io.StringIO()
        with contextlib.redirect_stdout(progress):
            quantize_static(
                str(prepared),
                str(out_path),
                calibration_data_reader=reader,
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                reduce_range=False,
                # uint8 activations: what the x86 integer kernels (VNNI) multiply with int8 weights.
                activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=None if cpu else list(WEIGHTED_OPS),
                nodes_to_exclude=list(excluded),
                calibrate_method=calib_method,
                extra_options=extra,
                calibration_cache_path=str(ranges),
            )
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"int8 quantization ({method}) failed: {type(exc).__name__}: {exc}") from exc


# ---- the cache -------------------------------------------------------------------------------------


class CalibCache:
    """``ROOT/<key>/``: onnxruntime's range files per method and the measured trials.

    The key is sha256 of (fp32 ONNX bytes, calibration tensors, settings, onnxruntime version): new
    weights, other images, another seed or count, or other settings give a new folder.
    """

    def __init__(self, root: str | os.PathLike[str], model_sha256: str, data_sha256: str,
                 settings: CalibSettings) -> None:
        import onnxruntime

        payload = {
            "v": CACHE_VERSION,
            "model": model_sha256,
            "data": data_sha256,
            # The default layout is left out: caches made before layouts existed stay valid.
            "settings": {k: v for k, v in asdict(settings).items()
                         if k != "max_accuracy_drop" and not (k == "layout" and v == "tensorrt")},
            "onnxruntime": onnxruntime.__version__,
        }
        self.key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(root) / self.key
        self.payload = payload
        self._trials_file = self.dir / "trials.json"
        self.trials: dict[str, float] = {}
        if self._trials_file.is_file():
            try:
                self.trials = {
                    k: float(v) for k, v in json.loads(self._trials_file.read_text())["trials"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable calibration cache %s", self._trials_file)
        self.hits = 0
        self.misses = 0

    def ranges(self, method: str) -> Path:
        return self.dir / f"ranges.{method}.json"

    def has_ranges(self, method: str) -> bool:
        return self.ranges(method).is_file()

    @staticmethod
    def trial_key(method: str, excluded: Sequence[str]) -> str:
        return f"{method}|{','.join(sorted(excluded))}"

    def get(self, method: str, excluded: Sequence[str]) -> float | None:
        value = self.trials.get(self.trial_key(method, excluded))
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, method: str, excluded: Sequence[str], metric: float) -> None:
        self.trials[self.trial_key(method, excluded)] = metric
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._trials_file, {"key": self.payload, "trials": self.trials})


# ---- the whole step --------------------------------------------------------------------------------


@dataclass
class CalibOutcome:
    result: SearchResult
    report: dict[str, Any]


def calibrate(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    reader: Any,
    evaluate: Callable[[Path], float],
    baseline: float,
    settings: CalibSettings,
    cache_root: str | os.PathLike[str],
    metric_name: str = "top1",
) -> CalibOutcome:
    """Quantize ``fp32_path`` into ``out_path`` within the budget, or raise :class:`ExportError`.

    ``evaluate(onnx_path)`` returns the headline validation metric (points) of a candidate graph.
    ``out_path`` is written only when the budget is met.
    """
    cache = CalibCache(cache_root, sha256_file(fp32_path), reader.digest(), settings)
    calibrated_now: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        prepare(fp32_path, prepared)
        layers = weighted_layers(prepared)

        def build(method: str, excluded: tuple[str, ...], dest: Path) -> None:
            ranges = cache.ranges(method)
            if not ranges.is_file():
                calibrated_now.append(method)
                log.info("calibrating %s on %d images", method, len(reader.images))
            cache.dir.mkdir(parents=True, exist_ok=True)
            quantize(prepared, dest, method=method, settings=settings, ranges=ranges,
                     reader=None if ranges.is_file() else reader, excluded=excluded)

        def measure(method: str, excluded: tuple[str, ...]) -> float:
            cached = cache.get(method, excluded)
            if cached is not None and cache.has_ranges(method):
                return cached
            candidate = Path(tmp) / "candidate.onnx"
            build(method, excluded, candidate)
            metric = float(evaluate(candidate))
            cache.put(method, excluded, metric)
            return metric

        result = search(settings.methods(), layers, measure, baseline, settings.max_accuracy_drop)
        report = {
            "method": result.method,
            "methods_tried": {t.method: t.metric for t in result.trials if not t.excluded},
            "images": int(len(reader.images)),
            "calibration_data": reader.info,
            "data_sha256": reader.digest(),
            "metric": metric_name,
            "fp32": round(baseline, 4),
            "int8": round(result.metric, 4),
            "drop": result.drop,
            "max_accuracy_drop": settings.max_accuracy_drop,
            "within_budget": result.within_budget,
            "excluded_layers": list(result.excluded),
            "weighted_layers": len(layers),
            "sensitivity": result.sensitivity,
            "trials": len(result.trials),
            "settings": asdict(settings),
            "cache": {"key": cache.key, "dir": str(cache.dir), "calibrated_now": calibrated_now,
                      "trial_hits": cache.hits, "trial_misses": cache.misses},
            "layout": settings.layout,
            "format": FORMATS[settings.layout],
        }
        if not result.within_budget:
            return CalibOutcome(result, report)
        final = Path(tmp) / "final.onnx"
        build(result.method, result.excluded, final)
        _move(final, Path(out_path))
    return CalibOutcome(result, report)


def _move(src: Path, dest: Path) -> None:
    """Copy into place atomically (the temp folder may be on another filesystem)."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
