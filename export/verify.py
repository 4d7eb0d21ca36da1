"""Verify an exported graph against its source on real validation images.

fp32 ONNX vs PyTorch: classification logits within ``CLASSIFY_ATOL``. Detection: the raw outputs
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
from kiln.compare import BOX_TOL_PX, LOGIT_ATOL, SCORE_ATOL, compare, detection_output_names
from kiln.errors import ExportError
from kiln.evaluate import bundle_split
from kiln.processing import Letterbox, preprocess
from kiln.runtime.ortfile import OrtFileBackend

log = logging.getLogger(__name__)

CLASSIFY_ATOL = LOGIT_ATOL
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
            raise ExportError(f"the model returns {len(out)} outputs but kiln.json names {len(names)}: {names}")
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
        problems.append(f"{report['missing']} detection(s) missing or moved > {BOX_TOL_PX} px, {report['extra']} "
                        f"extra (of {report['detections']})")
    return problems


def verify_fp32(bundle: Bundle, onnx_path: Any, *, count: int = DEFAULT_IMAGES) -> dict[str, Any]:
    """Compare the fp32 ONNX at ``onnx_path`` with PyTorch; raise :class:`ExportError` with the report
    when it differs beyond tolerance. Returns the report (recorded in kiln.json)."""
    x, boxes = verification_images(bundle, count)
    reference = torch_outputs(bundle, x)
    with OrtFileBackend(onnx_path, bundle.manifest) as backend:
        candidate = backend_outputs(backend, x)
    report = compare(bundle.manifest, reference, candidate, boxes)
    report["reference"] = "pytorch fp32 (cpu)"
    if bundle.manifest.task == "classify":
        report["tolerance"] = CLASSIFY_ATOL
        ok = report["max_abs_diff"] <= CLASSIFY_ATOL
        why = f"max abs difference of logits {report['max_abs_diff']:.3g} > {CLASSIFY_ATOL:g}"
    else:
        report.update(tolerance_px=BOX_TOL_PX, score_tolerance=SCORE_ATOL)
        why = "; ".join(detection_problems(bundle, report))
        ok = not why
    report["passed"] = bool(ok)
    if not ok:
        raise ExportError(f"verification failed for {onnx_path} on {report['images']} validation images: {why}; "
                          "previous artifacts are untouched")
    log.info("verified fp32 ONNX against PyTorch on %d val images: max abs diff %.3g",
             report["images"], report["max_abs_diff"])
    return report
