"""Run a bundle with TensorRT, ONNX Runtime or PyTorch behind one :class:`Backend` protocol.

``load(bundle)`` picks the fastest runnable choice and says why it skipped the others::

    with load("runs/digits") as backend:          # auto: tensorrt -> onnxrt -> torch
        out = backend.infer({"images": batch})    # {"logits": float32[N, 10]}
        print(backend.describe())                 # backend, precision, device, artifact, skipped

Importing this package needs neither torch nor tensorrt; each backend imports its library when built.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from kiln.bundle import Artifact, Bundle
from kiln.errors import BackendUnavailable, BundleError, ConfigError, unknown_choice
from kiln.runtime import cuda, onnxrt, tensorrt
from kiln.runtime import torch as torch_backend
from kiln.runtime._common import Device, KilnBackend, installed, parse_device
from kiln.runtime.base import Backend, BackendClosed, BaseBackend
from kiln.runtime.onnxrt import OnnxRuntimeBackend
from kiln.runtime.tensorrt import TensorRTBackend, engine_compatible
from kiln.runtime.torch import TorchBackend
from kiln.vocab import BACKEND_CHOICES, PRECISIONS, BackendName

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendClosed",
    "BaseBackend",
    "KilnBackend",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "TorchBackend",
    "available_backends",
    "engine_compatible",
    "load",
    "preflight",
    "open_artifact",
]

log = logging.getLogger("kiln.runtime")

# The table load() chooses from, in "auto" order: fastest first.
BACKENDS: dict[BackendName, type[KilnBackend]] = {
    "tensorrt": TensorRTBackend,
    "onnxrt": OnnxRuntimeBackend,
    "torch": TorchBackend,
}
OPTIONS: dict[str, frozenset[str]] = {
    "tensorrt": tensorrt.OPTIONS,
    "onnxrt": onnxrt.OPTIONS,
    "torch": torch_backend.OPTIONS,
}
FORMAT_BACKEND: dict[str, type[KilnBackend]] = {
    "tensorrt": TensorRTBackend,
    "onnx": OnnxRuntimeBackend,
    "torch": TorchBackend,
}
_FORMAT_OF: dict[str, str] = {"tensorrt": "tensorrt", "onnxrt": "onnx", "torch": "torch"}
# With no precision asked for, an engine is picked in this order: fp16 is TensorRT's usual deployment
# precision (its accuracy is measured and recorded in kiln.json by export); ONNX and torch run fp32.
TENSORRT_DEFAULT_ORDER = ("fp16", "fp32", "int8")


def load(
    bundle: Bundle | str | os.PathLike[str],
    backend: str = "auto",
    precision: str | None = None,
    device: str | None = None,
    end_to_end: bool = False,
    **opts: Any,
) -> KilnBackend:
    """Open ``bundle`` with ``backend`` (``auto``, ``tensorrt``, ``onnxrt`` or ``torch``).

    ``auto`` tries a TensorRT engine built for this GPU and TensorRT version, then ONNX Runtime (CUDA
    provider if present, else CPU), then PyTorch (CUDA if present, else CPU). Each skipped choice is
    logged on the ``kiln.runtime`` logger and kept in ``backend.fallback_log``.

    ``precision=None`` means fp32 for onnxrt and torch, and for TensorRT the first engine found in the
    order fp16, fp32, int8. A precision the bundle has no artifact for raises BackendUnavailable
    listing what it has. ``opts`` are backend options (see docs/runtime.md); in auto mode each backend
    gets the ones it knows. ``end_to_end`` opens a detector's graph with NMS inside (``kiln export --nms``,
    outputs ``num_dets``, ``det_boxes``, ``det_scores``, ``det_classes``) instead of the raw graph.
    """
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if backend != "auto" and backend not in BACKENDS:
        raise unknown_choice("backend", backend, BACKEND_CHOICES, flag="--backend")
    if precision is not None and precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS, flag="--precision")
    dev = parse_device(device)
    order = list(BACKENDS) if backend == "auto" else [backend]
    known = frozenset().union(*(OPTIONS[n] for n in order))
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for backend {backend}. Valid: {', '.join(sorted(known))}"
        )

    skipped: list[str] = []
    for name in order:
        own = {k: v for k, v in opts.items() if k in OPTIONS[name]}
        try:
            if end_to_end and not any(a.format == _FORMAT_OF[name] for a in b.artifacts(end_to_end=True)):
                how = f"kiln export {b.root} --nms" if name == "onnxrt" else "--nms writes ONNX graphs only"
                raise BackendUnavailable(f"the bundle has no end-to-end {_FORMAT_OF[name]} graph ({how})")
            chosen = _OPENERS[name](b, precision, dev, device, {**own, "end_to_end": end_to_end})
        except BackendUnavailable as exc:
            reason = str(exc).removeprefix(f"{name}: ")
            skipped.append(f"{name}: {reason}")
            # Worth a warning only when the bundle has something this backend could have run.
            has_artifact = any(a.format == _FORMAT_OF[name] for a in b.manifest.artifacts.values())
            log.log(logging.WARNING if has_artifact and backend == "auto" else logging.DEBUG,
                    "runtime: skipping %s for %s: %s", name, b.name, reason)
            continue
        chosen.fallback_log = skipped
        log.info(
            "runtime: %s runs %s (%s, %s, %s)", b.name, name, chosen.artifact, chosen.precision, chosen.device
        )
        return chosen
    have = ", ".join(f"{a.file} ({a.format} {a.precision})" for a in b.manifest.artifacts.values()) or "none"
    what = f"{precision} " if precision else ""
    raise BackendUnavailable(
        f"no backend can run {what}{b.root}: " + "; ".join(skipped) + f". The bundle has: {have}"
    )


def open_artifact(
    bundle: Bundle | str | os.PathLike[str], artifact: Artifact | str, device: str | None = None, **opts: Any
) -> KilnBackend:
    """Open one specific artifact (a file listed in kiln.json) with the backend for its format.

    Used by export and eval to measure every variant. The sha256 is checked; a TensorRT engine must
    be compatible with this GPU and TensorRT version.
    """
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if isinstance(artifact, str):
        art = b.manifest.artifacts.get(artifact)
        if art is None:
            listed = ", ".join(sorted(b.manifest.artifacts)) or "none"
            raise BundleError(f"{artifact} is not an artifact of {b.root} (kiln.json lists: {listed})")
    else:
        art = artifact
    cls = FORMAT_BACKEND[art.format]
    if art.format == "tensorrt":
        ok, why = engine_compatible(art.engine, _index(parse_device(device)))
        if not ok:
            raise BackendUnavailable(f"tensorrt: cannot run {art.file}: {why}")
    return cls.from_artifact(b, art, device=device, **opts)


def available_backends() -> dict[str, dict[str, Any]]:
    """What can run here: per backend whether its library imports, its version, and devices.

    Cheap: torch is looked up, not imported.
    """
    gpus: list[str] = []
    if cuda.device_count() > 0:
        gpus = [cuda.device_info(i).name for i in range(cuda.device_count())]
    trt_reason = tensorrt.unavailable_reason()
    ort_info: dict[str, Any] = {"available": installed("onnxruntime"), "version": _version("onnxruntime")}
    if ort_info["available"]:
        import onnxruntime as ort

        ort_info["providers"] = list(ort.get_available_providers())
    else:
        ort_info["reason"] = onnxrt.unavailable_reason()
    torch_reason = torch_backend.unavailable_reason()
    return {
        "tensorrt": {
            "available": trt_reason is None,
            "version": tensorrt.tensorrt_version(),
            "reason": trt_reason,
            "cuda_library": _cuda_library(),
            "gpus": gpus,
        },
        "onnxrt": ort_info,
        "torch": {"available": torch_reason is None, "version": _version("torch"), "reason": torch_reason},
    }


def _open_tensorrt(b: Bundle, precision: str | None, dev: Device | None, device: str | None,
                   opts: dict[str, Any]) -> KilnBackend:
    order = [precision] if precision else list(TENSORRT_DEFAULT_ORDER)
    e2e = opts.pop("end_to_end", False)
    engines = [a for p in order for a in b.artifacts("tensorrt", p, end_to_end=e2e)]
    if not engines:
        return _missing("tensorrt", "TensorRT engine", precision, b)
    if (why := tensorrt.unavailable_reason(dev)) is not None:
        raise BackendUnavailable(why)
    reasons = []
    for art in engines:
        ok, why = engine_compatible(art.engine, _index(dev))
        if ok:
            return TensorRTBackend.from_artifact(b, art, device=device, **opts)
        reasons.append(f"{art.file}: {why}")
    raise BackendUnavailable("no engine fits this machine (" + "; ".join(reasons) + ")")


def _open_onnxrt(b: Bundle, precision: str | None, dev: Device | None, device: str | None,
                 opts: dict[str, Any]) -> KilnBackend:
    art = next(iter(b.artifacts("onnx", precision or "fp32", end_to_end=opts.pop("end_to_end", False))), None)
    if art is None:
        return _missing("onnxrt", "ONNX model", precision or "fp32", b)
    if (why := onnxrt.unavailable_reason(dev)) is not None:
        raise BackendUnavailable(why)
    return OnnxRuntimeBackend.from_artifact(b, art, device=device, **opts)


def _open_torch(b: Bundle, precision: str | None, dev: Device | None, device: str | None,
                opts: dict[str, Any]) -> KilnBackend:
    prec = precision or "fp32"
    # load() checked that there is an end-to-end graph for torch (there never is)
    opts.pop("end_to_end", None)
    if (why := torch_backend.unavailable_reason(dev, prec)) is not None:
        raise BackendUnavailable(why)
    art = b.artifact("torch", "fp32") or next(iter(b.artifacts("torch")), None)
    if art is not None:
        return TorchBackend.from_artifact(b, art, device=device, precision=prec, **opts)
    if b.path("model.pt").is_file():
        # Bundles written before the weights were listed as an artifact: no sha256 to check against.
        log.info("runtime: %s: model.pt is not listed in kiln.json; loading it unverified", b.name)
        return TorchBackend(b, file="model.pt", precision=prec, device=device, **opts)
    return _missing("torch", "PyTorch weights (model.pt)", None, b)


def _missing(name: str, what: str, precision: str | None, b: Bundle) -> KilnBackend:
    have = sorted({f"{a.format} {a.precision}" for a in b.manifest.artifacts.values()})
    prec = f"{precision} " if precision else ""
    raise BackendUnavailable(f"the bundle has no {prec}{what} (it has: {', '.join(have) or 'nothing'})")


_OPENERS: Mapping[str, Callable[[Bundle, str | None, Device | None, str | None, dict[str, Any]],
                                KilnBackend]] = {
    "tensorrt": _open_tensorrt,
    "onnxrt": _open_onnxrt,
    "torch": _open_torch,
}


def preflight(bundle: Bundle | str | os.PathLike[str], backend: str = "auto", precision: str | None = None,
              device: str | None = None, end_to_end: bool = False) -> None:
    """Raise BackendUnavailable, with the command that fixes it, when ``load(bundle, backend, precision)``
    cannot succeed here: checked from kiln.json and the installed libraries, without loading anything, so
    a server refuses to start before it binds a port."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if backend != "auto" and backend not in BACKENDS:
        raise unknown_choice("backend", backend, BACKEND_CHOICES, flag="--backend")
    dev = parse_device(device)
    if end_to_end and not b.artifacts(end_to_end=True):
        raise BackendUnavailable(
            f"{b.name}: the bundle has no end-to-end graph; write one: kiln export {b.root} --nms")
    reasons = []
    for name in list(BACKENDS) if backend == "auto" else [backend]:
        why = _cannot_open(b, name, precision, dev)
        if why is None:
            return
        reasons.append(f"{name}: {why}")
    raise BackendUnavailable(f"{b.name}: " + "; ".join(reasons))


def _cannot_open(b: Bundle, name: str, precision: str | None, dev: Device | None) -> str | None:
    if name == "tensorrt":
        order = [precision] if precision else list(TENSORRT_DEFAULT_ORDER)
        if not any(b.artifacts("tensorrt", p) for p in order):
            return (f"the bundle has no {precision + ' ' if precision else ''}TensorRT engine; build one on "
                    f"the GPU machine: kiln export {b.root} --engine"
                    + (f" --precision {precision}" if precision else ""))
        if (why := tensorrt.unavailable_reason(dev)) is not None:
            return why
        # The same rule load() applies: an engine from another GPU or TensorRT must fail here, before a
        # server binds its port, not when the model loads.
        reasons = []
        for art in (a for p in order for a in b.artifacts("tensorrt", p)):
            ok, why = engine_compatible(art.engine, _index(dev))
            if ok:
                return None
            reasons.append(f"{art.file}: {why}")
        return ("no engine fits this machine (" + "; ".join(reasons)
                + f"); rebuild on this GPU: kiln export {b.root} "
                "--engine" + (f" --precision {precision}" if precision else ""))
    if name == "onnxrt":
        prec = precision or "fp32"
        if b.artifact("onnx", prec) is None:
            return f"the bundle has no {prec} ONNX model; export it: kiln export {b.root} --precision {prec}"
        return onnxrt.unavailable_reason(dev)
    why = torch_backend.unavailable_reason(dev, precision or "fp32")
    if why is None and b.artifact("torch", "fp32") is None and not b.path("model.pt").is_file():
        why = "the bundle has no PyTorch weights (model.pt)"
    return why


def _index(dev: Device | None) -> int:
    return dev.index if dev is not None and dev.kind == "cuda" else 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_library() -> str | None:
    try:
        return cuda.library()
    except BackendUnavailable:
        return None
