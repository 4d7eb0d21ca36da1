"""Which TensorRT engine runs where: the provenance check (TensorRT version, compute capability,
hardware and version compatibility) and the engine and timing-cache file names that carry the GPU model
and TensorRT version. Pure functions over kiln.json records; nothing here imports TensorRT."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kiln.bundle import ENGINE_KEYS, Artifact, Bundle, EngineProvenance
from kiln.runtime import cuda

PROVENANCE_KEYS = ("tensorrt_version", "gpu_name", "compute_capability")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


def parse_capability(text: str) -> tuple[int, int]:
    """``"8.9"`` -> ``(8, 9)``."""
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def _version_compatible_runs(built: tuple[int, ...], here: tuple[int, ...]) -> bool:
    # A version-compatible plan runs on the same or a newer release of its major version, and
    # TensorRT 11 runtimes run version-compatible TensorRT 10 plans (11.x support matrix).
    if here < built:
        return False
    return built[:1] == here[:1] or (built[:1], here[:1]) == ((10,), (11,))


def check_provenance(provenance: EngineProvenance | Mapping[str, Any] | None, version: str,
                     gpu: cuda.DeviceInfo) -> tuple[bool, str]:
    """Whether an engine built as ``provenance`` says can run on TensorRT ``version`` and ``gpu``.

    A plan runs only on the TensorRT version that built it, unless built version-compatible
    (``version_compat`` in kiln.json): then on the same or a newer release of its major version, and a
    TensorRT 10 plan also on TensorRT 11. It runs only on GPUs of its compute capability, unless built
    hardware-compatible (AMPERE_PLUS: compute capability 8.0 or newer).
    """
    if not isinstance(provenance, EngineProvenance):  # a mapping may hold more (onnx2engine's precision)
        provenance = EngineProvenance.model_validate(
            {k: v for k, v in (provenance or {}).items() if k in ENGINE_KEYS})
    prov = provenance
    missing = [k for k in PROVENANCE_KEYS if not getattr(prov, k)]
    if missing:
        return False, (f"engine has no build provenance in kiln.json (missing {', '.join(missing)}); "
                       "rebuild it")
    built_v, here_v = str(prov.tensorrt_version), version
    if prov.version_compat:
        if not _version_compatible_runs(version_tuple(built_v), version_tuple(here_v)):
            return False, (f"version-compatible engine built with TensorRT {built_v} cannot run on "
                           f"TensorRT {here_v}")
    elif version_tuple(built_v) != version_tuple(here_v):  # major.minor.patch.build: a plan names all four
        return False, f"engine built with TensorRT {built_v}, this is TensorRT {here_v} (rebuild it here)"
    built_cc = parse_capability(str(prov.compute_capability))
    here_cc = parse_capability(gpu.compute_capability)
    built_gpu = prov.gpu_name
    if prov.hardware_compat:
        if here_cc < (8, 0):
            return False, (f"hardware-compatible engine needs compute capability >= 8.0, {gpu.name} has "
                           f"{gpu.compute_capability}")
        return True, f"hardware-compatible engine built on {built_gpu} runs on {gpu.name}"
    if built_cc != here_cc:
        return False, (
            f"engine built for {built_gpu} (compute capability {prov.compute_capability}), "
            f"this GPU is {gpu.name} ({gpu.compute_capability})"
        )
    if built_gpu != gpu.name:
        return True, f"engine built on {built_gpu}, running on {gpu.name} (same compute capability)"
    return True, f"engine built here ({gpu.name}, TensorRT {built_v})"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def engine_file_name(precision: str, gpu_name: str, trt_version: str) -> str:
    """The engine file for ``precision`` built on ``gpu_name`` with TensorRT ``trt_version``.

    ``model.fp16.nvidia-l4.trt-10.13.0.35.engine``: a plan runs only on the GPU model and TensorRT that
    built it, so engines from several GPU types or TensorRT versions can sit side by side in one bundle
    (replicas sharing a volume) without overwriting each other. kiln.json lists each with its provenance;
    engines listed under the older name ``model.<precision>.engine`` are still read.
    """
    return f"model.{precision}.{_slug(gpu_name)}.trt-{_slug(trt_version)}.engine"


def timing_cache_name(gpu_name: str, trt_version: str) -> str:
    """A timing cache file name keyed like :func:`engine_file_name` (a cache is per GPU model and
    TensorRT)."""
    return f"timing.{_slug(gpu_name)}.trt-{_slug(trt_version)}.cache"


def unlist_superseded_engines(bundle: Bundle, file: str) -> list[str]:
    """Unlist the engines that ``file`` replaces: same precision, GPU model and TensorRT version (an engine
    kiln.json lists under an older name, such as ``model.fp16.engine``). Returns their names; the
    caller saves the bundle. Engines for other GPUs or TensorRT versions stay listed."""
    new = bundle.manifest.artifacts[file]

    def built_with(art: Artifact) -> tuple[str | None, str | None]:
        return (art.engine.gpu_name, art.engine.tensorrt_version) if art.engine else (None, None)

    gone = [name for name, art in bundle.manifest.artifacts.items()
            if name != file and art.format == "tensorrt" and art.precision == new.precision
            and built_with(art) == built_with(new)]
    for name in gone:
        del bundle.manifest.artifacts[name]
    return gone
