"""A fake ``tensorrt`` module for one major version (10 or 11), modelled on the TensorRT Python API.

Version differences it models (TensorRT 10.16 / 11.x Python bindings and their migration guide):
- ``NetworkDefinitionCreationFlag``: 10 has EXPLICIT_BATCH (ignored) and STRONGLY_TYPED; 11 has no
  EXPLICIT_BATCH and documents STRONGLY_TYPED as deprecated and ignored (every network is strongly typed).
- ``BuilderFlag``: 11 removed FP16, BF16, INT8, FP8, INT4, FP4 and the precision-constraint flags
  (``getattr`` fails, as on the real module). 10 refuses them on a strongly typed network at build time,
  and a weakly typed network with Q/DQ layers needs INT8.
- ``nptype`` raises TypeError for BF16, FP8, INT4, FP4 and E8M0; ``DataType.itemsize`` is 0.5 for the
  4-bit types and None for E8M0.
- Plans run only on the TensorRT version that built them, all four parts (major.minor.patch.build),
  unless built VERSION_COMPATIBLE: then on the same or a newer release of that major, and 10 plans on 11;
  a version-compatible plan needs ``engine_host_code_allowed``. A plan using plugins deserializes only
  after ``init_libnvinfer_plugins``.
- Plans run only on the compute capability that built them (an error naming both), unless built with
  ``hardware_compatibility_level = AMPERE_PLUS`` (then on 8.0 and newer); another GPU model of the same
  capability loads with a WARNING through the runtime's logger.
- ``trt.Logger`` prints to stdout, as the real one does ("Logs a message to `stdout`").
  ``init_libnvinfer_plugins`` is to be called once: the plugin library keeps the logger it was given and
  logs through it whenever a plugin is used; a second call, or a plugin used after that logger was
  released (a crash in the real library), is recorded in ``trt.violations``.
- ``BuilderFlag.TF32`` is set on a new builder config (enabled by default); a plan built with it
  computes float32 layers in TF32 (inputs rounded to 10-bit mantissas).

"ONNX files" are JSON graph descriptions (:func:`make_graph`) and plans are JSON (:func:`make_plan`).
The network's computation: each float output row is twice the first elements of the first input row.
"""

from __future__ import annotations

import enum
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

from .device import FakeDevice
from .trt_builder import install_builder
from .trt_runtime import install_runtime
from .trt_types import PRECISION_FLAGS, VERSIONS, DataType, Dims, make_graph, make_plan, nptype

__all__ = ["DataType", "Dims", "make_graph", "make_plan", "make_tensorrt", "nptype"]


def make_tensorrt(major: int, gpu: FakeDevice, *,
                  has_context: Callable[[], bool] = lambda: True) -> types.ModuleType:
    """The module; ``trt.calls`` records builder/config/runtime calls, ``trt.deprecations`` deprecated
    uses."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSIONS[major]  # type: ignore[attr-defined]
    calls: list[tuple[Any, ...]] = []
    trt.calls, trt.deprecations, trt.plugins_registered = calls, [], False  # type: ignore[attr-defined]
    trt.violations = []  # type: ignore[attr-defined]
    plugin_logger: list[weakref.ref[Any]] = []
    trt.DataType, trt.nptype, trt.Dims = DataType, nptype, Dims  # type: ignore[attr-defined]
    for alias, member in {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8",
                          "int32": "INT32",
                          "int64": "INT64", "bool": "BOOL", "uint8": "UINT8", "fp8": "FP8", "int4": "INT4",
                          "fp4": "FP4", "e8m0": "E8M0"}.items():
        setattr(trt, alias, DataType[member])
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")  # type: ignore[attr-defined]
    trt.LayerType = enum.Enum("LayerType", "CONVOLUTION ACTIVATION QUANTIZE DEQUANTIZE MATRIX_MULTIPLY CAST")  # type: ignore[attr-defined]
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")  # type: ignore[attr-defined]
    trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", "NONE AMPERE_PLUS")  # type: ignore[attr-defined]
    net_flags = {"STRONGLY_TYPED": 1, "PREFER_AOT_PYTHON_PLUGINS": 2, "PREFER_JIT_PYTHON_PLUGINS": 3}
    if major < 11:
        net_flags["EXPLICIT_BATCH"] = 0
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", net_flags)  # type: ignore[attr-defined]
    builder_flags = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
                     "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "STRIP_PLAN"]
    if major < 11:
        builder_flags += PRECISION_FLAGS
    trt.BuilderFlag = enum.Enum("BuilderFlag", builder_flags)  # type: ignore[attr-defined]

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

        def __init__(self) -> None:
            pass

        def log(self, severity: Any, msg: str) -> None:
            raise NotImplementedError("ILogger.log is pure virtual")

    class Logger(ILogger):
        """TensorRT's own logger: prints to stdout."""

        def __init__(self, min_severity: Any = ILogger.Severity.WARNING) -> None:
            self.min_severity = min_severity

        def log(self, severity: Any, msg: str) -> None:
            if severity <= self.min_severity:
                print(f"[TRT] [{severity.name[0]}] {msg}", file=sys.stdout)

    def init_libnvinfer_plugins(logger: ILogger, namespace: str) -> bool:
        calls.append(("init_libnvinfer_plugins", namespace))
        if plugin_logger:
            trt.violations.append("init_libnvinfer_plugins called again: the plugin library keeps the first "
                                  "logger")
        plugin_logger[:] = [weakref.ref(logger)]
        logger.log(ILogger.Severity.VERBOSE, "Registered plugin creator - ::EfficientNMS_TRT version 1")
        trt.plugins_registered = True  # type: ignore[attr-defined]
        return True

    def plugin_used(name: str) -> None:
        """The plugin library logs through the logger it was initialised with."""
        logger = plugin_logger[0]() if plugin_logger else None
        if logger is None:
            trt.violations.append(f"plugin {name} logged through a released logger (a crash in TensorRT)")
            return
        logger.log(ILogger.Severity.VERBOSE, f"Plugin creator found: {name}")

    trt.plugin_used = plugin_used  # type: ignore[attr-defined]

    trt.ILogger, trt.Logger, trt.init_libnvinfer_plugins = ILogger, Logger, init_libnvinfer_plugins  # type: ignore[attr-defined]
    install_builder(trt, major, gpu)
    install_runtime(trt, gpu, has_context)
    return trt
