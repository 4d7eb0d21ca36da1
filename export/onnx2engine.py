"""onnx2engine: build a TensorRT plan from an ONNX graph with TensorRT 10 or 11 (other majors are refused).

Precision lives in the graph: the fp16 ONNX (float16 weights, fp32 I/O) and the int8 Q/DQ ONNX are
built as *strongly typed* networks, so the engine computes in the types the graph states:

- TensorRT 11: every network is strongly typed (``STRONGLY_TYPED`` is deprecated and ignored, the
  precision builder flags FP16/INT8 are removed), so no flag is set.
- TensorRT 10: the network is created with ``STRONGLY_TYPED`` and no precision flag (TensorRT 10
  rejects precision flags on a strongly typed network). ``strongly_typed=False`` builds the same graph
  weakly typed instead, with ``BuilderFlag.FP16`` / ``INT8`` so the builder may use those kernels;
  weak typing does not exist in TensorRT 11, where that option is refused.

TF32: TensorRT lets float32 layers compute in TF32 (10-bit mantissas) unless the TF32 builder flag is
cleared. kiln clears it, so an engine computes in the types its graph states (the fp32 graph in fp32,
the float layers an int8 graph kept in float in fp32); ``tf32=True`` (``kiln export --tf32``) allows it.
kiln.json records the choice.

One optimization profile covers the batch range; a timing cache file is reused and updated across
builds (a folder given as the cache holds one file per GPU model and TensorRT version);
hardware- and version-compatible builds are optional. The engine is a plain plan file (what trtexec and
C++ loaders read); the provenance this returns goes into kiln.json. TensorRT's messages go to Python
logging through the process-wide logger (:func:`kiln.runtime.tensorrt.trt_logger`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.bundle import BatchRange
from kiln.errors import BackendUnavailable, ConfigError, ExportError, unknown_choice
from kiln.fsutil import atomic_write
from kiln.runtime import cuda
from kiln.runtime.tensorrt import (
    dims_tuple,
    engine_compatible,
    engine_file_name,
    import_tensorrt,
    parse_capability,
    timing_cache_name,
    trt_logger,
)
from kiln.vocab import GRAPH_PRECISIONS

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["build_flags", "engine_compatible", "engine_file_here", "onnx2engine", "timing_cache_file"]
LEGACY_TIMING_CACHE = "timing.cache"  # the one file a cache folder held before caches were keyed

log = logging.getLogger("kiln.export.engine")
PRECISIONS = GRAPH_PRECISIONS


def build_flags(major: int, precision: str, strongly_typed: bool = True) -> tuple[list[str], list[str]]:
    """``(network creation flags, builder flags)`` by name for a build on TensorRT ``major`` (10 or 11)."""
    if major >= 11:
        if not strongly_typed:
            raise ConfigError(
                "onnx2engine: TensorRT 11 builds strongly typed networks only (weak typing and the FP16/INT8 "
                "builder flags were removed); build without strongly_typed=False"
            )
        return [], []
    if strongly_typed:
        return ["STRONGLY_TYPED"], []
    return [], {"fp16": ["FP16"], "int8": ["INT8"]}.get(precision, [])


def _builder_config(
    builder: Any, profile: Any, workspace_gib: float, builder_flags: list[str], hardware_compat: bool,
    version_compat: bool,
    tf32: bool,
) -> Any:
    import tensorrt as trt

    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in [*builder_flags, *(["VERSION_COMPATIBLE"] if version_compat else [])]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not tf32:  # on by default in TensorRT 10 and 11
        config.clear_flag(trt.BuilderFlag.TF32)
    if hardware_compat:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    return config


def onnx2engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    precision: str,
    batch: BatchRange,
    input_name: str,
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
    hardware_compat: bool = False,
    version_compat: bool = False,
    strongly_typed: bool = True,
    tf32: bool = False,
) -> dict[str, Any]:
    """Build ``engine_path`` from ``onnx_path`` on GPU 0 and return its provenance for kiln.json.

    ``timing_cache``: a file, or a folder that holds one cache per GPU model and TensorRT version
    (:func:`timing_cache_file`). ``tf32``: let float32 layers compute in TF32 (off: they compute in fp32).

    Raises BackendUnavailable when TensorRT (10 or 11) or a GPU is missing, ConfigError for options
    this TensorRT cannot honour, ExportError when the graph cannot be parsed (naming the node and
    operator) or built. The plan and the timing cache are written atomically: a failed build leaves
    earlier files as they were.
    """
    network_flags, builder_flags, gpu = _preflight(onnx_path, precision, workspace_gib, strongly_typed,
                                                   hardware_compat)
    import tensorrt as trt

    src = Path(onnx_path)
    # Process-wide: it registered the plugin library (the ONNX parser maps some operators onto it).
    logger = trt_logger()
    mark = logger.error_count
    builder = trt.Builder(logger)
    network = builder.create_network(_bits(trt.NetworkDefinitionCreationFlag, network_flags))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files (model.onnx.data) relative to the graph.
    if not parser.parse_from_file(os.fspath(src)):
        raise ExportError(f"TensorRT cannot parse {src}: " + "; ".join(_parser_errors(parser)))
    _check_precision(network, precision, src)
    profile = _profile(builder, network, src, input_name, batch)

    config = _builder_config(builder, profile, workspace_gib, builder_flags, hardware_compat, version_compat,
                             tf32)
    cache_path, seed = timing_cache_file(timing_cache, gpu.name, str(trt.__version__))
    _load_timing_cache(config, seed)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        detail = "; ".join(logger.errors_since(mark)[-3:]) or "see the TensorRT log"
        raise ExportError(f"TensorRT failed to build {precision} engine from {src}: {detail}")
    atomic_write(engine_path, lambda fh: fh.write(memoryview(plan)))
    if cache_path is not None:
        updated = config.get_timing_cache().serialize()
        atomic_write(cache_path, lambda fh: fh.write(memoryview(updated)))
    log.info("built %s (%s, %.1f s) on %s", engine_path, precision, seconds, gpu.name)
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "profile": {"min": batch.min, "opt": batch.opt, "max": batch.max},
        "precision": precision,
        "build_seconds": round(seconds, 2),
        "hardware_compat": hardware_compat,
        "version_compat": version_compat,
        "strongly_typed": strongly_typed,
        "tf32": tf32,
    }


def _preflight(onnx_path: str | os.PathLike[str], precision: str, workspace_gib: float, strongly_typed: bool,
               hardware_compat: bool) -> tuple[list[str], list[str], cuda.DeviceInfo]:
    """Check what a build needs before anything is built, cheapest first: the options, TensorRT, a GPU,
    the graph file, the GPU's compute capability. Returns the network and builder flags and GPU 0."""
    if precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS, flag="onnx2engine", ordered=True)
    if workspace_gib <= 0:
        raise ConfigError(f"onnx2engine: workspace must be > 0 GiB, got {workspace_gib}")
    major = import_tensorrt()
    network_flags, builder_flags = build_flags(major, precision, strongly_typed)
    if (why := cuda.no_gpu_reason()) is not None:
        raise BackendUnavailable(f"building a TensorRT engine needs an NVIDIA GPU and driver: {why}")
    src = Path(onnx_path)
    if not src.is_file():
        raise ExportError(f"onnx2engine: {src} does not exist")
    gpu = cuda.device_info(0)
    if hardware_compat and parse_capability(gpu.compute_capability) < (8, 0):
        raise ExportError(
            f"hardware-compatible engines (AMPERE_PLUS) need compute capability >= 8.0; {gpu.name} has "
            f"{gpu.compute_capability}"
        )
    return network_flags, builder_flags, gpu


def engine_file_here(precision: str) -> str:
    """The bundle file name for a ``precision`` engine built here (GPU 0 and the installed TensorRT):
    ``model.fp16.nvidia-l4.trt-10.13.0.35.engine`` (:func:`kiln.runtime.engines.engine_file_name`)."""
    import_tensorrt()
    import tensorrt as trt

    return engine_file_name(precision, cuda.device_info(0).name, str(trt.__version__))


def _bits(enum: Any, names: list[str]) -> int:
    bits = 0
    for name in names:
        bits |= 1 << int(getattr(enum, name))
    return bits


def _profile(
    builder: trt.Builder, network: trt.INetworkDefinition, src: Path, input_name: str, batch: BatchRange
) -> trt.IOptimizationProfile:
    import tensorrt as trt

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if input_name not in inputs:
        raise ExportError(f"{src}: no input named {input_name} (graph inputs: {sorted(inputs)})")
    shape = dims_tuple(inputs[input_name].shape)
    if any(d < 0 for d in shape[1:]):
        raise ExportError(f"{src}: input {input_name} has shape {shape}; only the batch axis may be dynamic")
    if shape[0] >= 0 and not batch.min == batch.max == shape[0]:
        raise ExportError(
            f"{src}: input {input_name} has a fixed batch {shape[0]}, cannot build batch range {batch}")
    rest = shape[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, trt.Dims([batch.min, *rest]), trt.Dims([batch.opt, *rest]),
                      trt.Dims([batch.max, *rest]))
    return profile


def timing_cache_file(
    timing_cache: str | os.PathLike[str] | None, gpu_name: str, trt_version: str
) -> tuple[Path | None, Path | None]:
    """``(file to write, file to read)`` for ``timing_cache`` (a file, a folder, or None).

    A folder holds one cache per GPU model and TensorRT version (``timing.<gpu>.trt-<version>.cache``),
    so builders of several GPU types can share it; while this GPU has none yet, the folder's older
    single ``timing.cache`` is read (a cache that does not match is discarded when loaded).
    """
    if timing_cache is None:
        return None, None
    path = Path(timing_cache)
    if not path.is_dir():
        return path, path
    keyed = path / timing_cache_name(gpu_name, trt_version)
    legacy = path / LEGACY_TIMING_CACHE
    return keyed, (legacy if not keyed.is_file() and legacy.is_file() else keyed)


def _parser_errors(parser: trt.OnnxParser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node, name, op = err.node(), err.node_name(), err.node_operator()
        where = f"node {node}" + (f" '{name}'" if name else "") + (f" (op {op})" if op
                                                                   else "") if node >= 0 else "graph"
        out.append(f"{where}: {err.desc()}")
    return out or ["unknown parser error"]


def _check_precision(network: trt.INetworkDefinition, precision: str, src: Path) -> None:
    """A strongly typed network computes in the graph's types, so the graph must match ``precision``."""
    import tensorrt as trt

    quantized = half = False
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE):
            quantized = True
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                half = True
    if precision == "int8" and not quantized:
        raise ExportError(
            f"{src} has no Quantize/DequantizeLinear nodes: pass the int8 Q/DQ graph for an int8 engine")
    if precision == "fp16" and not half:
        raise ExportError(f"{src} has no float16 tensors: pass the fp16 graph (onnx2fp16) for an fp16 engine")
    if precision == "fp32" and (quantized or half):
        raise ExportError(f"{src} holds float16 or Q/DQ layers: pass the fp32 graph for an fp32 engine")


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, False):
            return
        # A cache from another GPU or TensorRT version is useless here; start a fresh one.
        log.warning("timing cache %s does not match this GPU / TensorRT; starting a new one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)
