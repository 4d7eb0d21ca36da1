"""Verify an exported graph against its source on real validation images.

fp32 ONNX vs PyTorch, classification: every logit within ``CLASSIFY_ATOL + CLASSIFY_RTOL`` times the
image's largest ``|logit|`` (:class:`kiln.compare.Tolerance`, per output as Polygraphy compares, the
relative part against the output's scale), and the same top-1 and the same top-k set on every image
without a tie (a gap within twice the tolerance). Detection: the raw outputs
within tolerance (boxes ``BOX_TOL_PX`` model-input pixels, scores ``SCORE_ATOL``), and the same
detections after :func:`kiln.processing.detect_postprocess` (same classes, boxes within ``BOX_TOL_PX``
original pixels) apart from those scoring within ``SCORE_ATOL`` of a cut, which rounding may put on
either side; as measured by :func:`kiln.compare.compare`. Reduced precisions are compared with the fp32
graph the same way and reported (their accuracy is what the budget judges).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kiln.bundle import Bundle
from kiln.compare import (
    BOX_TOL_PX,
    FP32_ATOL,
    FP32_RTOL,
    SCORE_ATOL,
    Tolerance,
    compare,
    detection_output_names,
)
from kiln.errors import ExportError
from kiln.evaluate import bundle_split
from kiln.processing import Letterbox, preprocess
from kiln.runtime.ortfile import OrtFileBackend

log = logging.getLogger(__name__)

CLASSIFY_ATOL = FP32_ATOL
CLASSIFY_RTOL = FP32_RTOL
DEFAULT_IMAGES = 64


def verification_images(bundle: Bundle, count: int = DEFAULT_IMAGES) -> tuple[np.ndarray, list[Letterbox]]:
    """The first ``count`` validation images (deterministic), preprocessed as the server does."""
    val = bundle_split(bundle, "val")
    n = min(count, len(val))
    if n == 0:
        raise ExportError("verification: the validation split has no images")
    return preprocess([val.image(i) for i in range(n)], bundle.manifest.preprocess)


def torch_outputs(bundle: Bundle, x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """Run ``model.pt`` on the CPU in fp32 and name its outputs as kiln.json does."""
    # torch (and the model registry, which needs it) only when PyTorch outputs are asked for
    import torch

    from kiln.models import load_model

    model = load_model(bundle)
    names = [o.name for o in bundle.manifest.outputs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out = model(torch.from_numpy(x[start : start + batch]))
            for name, value in zip(names, _as_list(out, names), strict=True):
                parts[name].append(value.detach().float().numpy())
    return {n: np.concatenate(v) for n, v in parts.items()}


def _as_list(out: Any, names: list[str]) -> list[Any]:
    if isinstance(out, dict):
        return [out[n] for n in names]
    if isinstance(out, list | tuple):
        if len(out) != len(names):
            raise ExportError(
                f"the model returns {len(out)} outputs but kiln.json names {len(names)}: {names}")
        return list(out)
    return [out]


def backend_outputs(backend: Any, x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    name = backend.inputs[0].name
    for start in range(0, len(x), batch):
        for k, v in backend.infer({name: np.ascontiguousarray(x[start : start + batch])}).items():
            parts.setdefault(k, []).append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def detection_problems(bundle: Bundle, report: dict[str, Any]) -> list[str]:
    """What is out of tolerance in a detection :func:`~kiln.compare.compare` report (empty: it passes)."""
    boxes, scores = detection_output_names(bundle.manifest)
    diffs = report["max_abs_diff_by_output"]
    problems = []
    if diffs[boxes] > BOX_TOL_PX:
        problems.append(f"raw {boxes} differ by up to {diffs[boxes]:.3g} px > {BOX_TOL_PX}")
    if diffs[scores] > SCORE_ATOL:
        problems.append(f"raw {scores} differ by up to {diffs[scores]:.3g} > {SCORE_ATOL:g}")
    if report["missing"] or report["extra"]:
        problems.append(f"{report['missing']} detection(s) missing or moved > {BOX_TOL_PX} px, "
                        f"{report['extra']} extra (of {report['detections']})")
    return problems


def classify_problems(report: dict[str, Any]) -> list[str]:
    """What is out of tolerance in a classification :func:`~kiln.compare.compare` report made with a
    :class:`~kiln.compare.Tolerance` (empty: it passes)."""
    tol = report["tolerance"]
    problems = []
    for name, err in report["outputs"].items():
        if not err["passed"]:
            problems.append(f"{name}: {err['mismatches']} of {err['values']} values differ by more than "
                            f"{tol['atol']:g} + {tol['rtol']:g} x the image's largest |{name}| (max abs "
                            f"difference {err['max_abs_diff']:.3g}, {err['max_rel_diff']:.3g} of the scale)")
    if report["top1_agreement"] < 100.0:
        problems.append(f"top-1 agrees on {report['top1_agreement']:.1f}% of the images without a tie")
    if report["topk_agreement"] < 100.0:
        problems.append(
            f"top-{report['top_k']} set agrees on {report['topk_agreement']:.1f}% of the images "
            "without a tie")
    return problems


def verify_fp32(bundle: Bundle, onnx_path: Any, *, count: int = DEFAULT_IMAGES,
                tolerance: Tolerance | None = None) -> dict[str, Any]:
    """Compare the fp32 ONNX at ``onnx_path`` with PyTorch; raise :class:`ExportError` with the report
    when it differs beyond tolerance (``tolerance``: classification, default ``CLASSIFY_ATOL`` and
    ``CLASSIFY_RTOL``). Returns the report (recorded in kiln.json)."""
    x, boxes = verification_images(bundle, count)
    reference = torch_outputs(bundle, x)
    with OrtFileBackend(onnx_path, bundle.manifest) as backend:
        candidate = backend_outputs(backend, x)
    if bundle.manifest.task == "classify":
        tol = tolerance or Tolerance(CLASSIFY_ATOL, CLASSIFY_RTOL)
        report = compare(bundle.manifest, reference, candidate, boxes, tolerance=tol)
        report["tolerance"] = {"atol": tol.atol, "rtol": tol.rtol,
                               "relative_to": "the image's largest |output|"}
        why = "; ".join(classify_problems(report))
    else:
        report = compare(bundle.manifest, reference, candidate, boxes)
        report.update(tolerance_px=BOX_TOL_PX, score_tolerance=SCORE_ATOL)
        why = "; ".join(detection_problems(bundle, report))
    report["reference"] = "pytorch fp32 (cpu)"
    report["passed"] = not why
    if why:
        raise ExportError(f"verification failed for {onnx_path} on {report['images']} validation images: "
                          f"{why}; previous artifacts are untouched")
    log.info("verified fp32 ONNX against PyTorch on %d val images: max abs diff %.3g%s", report["images"],
             report["max_abs_diff"], _relative(report))
    return report


def _relative(report: dict[str, Any]) -> str:
    if "outputs" not in report:
        return ""
    rel = max(e["max_rel_diff"] for e in report["outputs"].values())
    return (f" ({rel:.2g} of the outputs' scale; top-1 agreement {report['top1_agreement']:g}%, "
            f"top-{report['top_k']} {report['topk_agreement']:g}%)")
