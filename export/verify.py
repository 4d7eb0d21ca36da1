"""Verify an exported graph against its source on real validation images.

fp32 ONNX vs PyTorch: classification logits within ``CLASSIFY_ATOL``; detection must give the same
detections after :func:`kiln.processing.detect_postprocess` (same classes, boxes within
``BOX_TOL_PX`` original pixels). Reduced precisions are compared with the fp32 graph the same way and
reported (their accuracy is what the budget judges).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kiln.bundle import Bundle, Manifest
from kiln.errors import ExportError
from kiln.processing import Letterbox, preprocess

log = logging.getLogger(__name__)

CLASSIFY_ATOL = 1e-4
BOX_TOL_PX = 0.5
DEFAULT_IMAGES = 64


def verification_images(bundle: Bundle, count: int = DEFAULT_IMAGES) -> tuple[np.ndarray, list[Letterbox]]:
    """The first ``count`` validation images (deterministic), preprocessed as the server does."""
    from kiln.calib.data import open_split

    val = open_split(bundle, "val")
    n = min(count, len(val))
    if n == 0:
        raise ExportError("verification: the validation split has no images")
    return preprocess([val.image(i) for i in range(n)], bundle.manifest.preprocess)


def torch_outputs(bundle: Bundle, x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """Run ``model.pt`` on the CPU in fp32 and name its outputs as kiln.json does."""
    import torch

    from kiln.train.models import load_model

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


def compare(manifest: Manifest, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            letterboxes: list[Letterbox]) -> dict[str, Any]:
    """Differences of ``candidate`` from ``reference`` outputs: max abs diff per output, and for
    classification the top-1 agreement, for detection the detection-level match."""
    report: dict[str, Any] = {"images": len(letterboxes)}
    diffs = {}
    for spec in manifest.outputs:
        a, b = reference[spec.name], candidate[spec.name]
        if a.shape != b.shape:
            raise ExportError(f"output {spec.name}: shape {b.shape} differs from the reference {a.shape}")
        diffs[spec.name] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    report["max_abs_diff"] = max(diffs.values()) if diffs else 0.0
    report["max_abs_diff_by_output"] = diffs
    if manifest.task == "classify":
        logits = manifest.outputs[0].name
        agree = np.argmax(reference[logits], axis=1) == np.argmax(candidate[logits], axis=1)
        report["top1_agreement"] = round(100.0 * float(agree.mean()), 3)
    else:
        report.update(compare_detections(manifest, reference, candidate, letterboxes))
    return report


def _det_outputs(manifest: Manifest, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    names = [o.name for o in manifest.outputs]
    boxes = out["boxes"] if "boxes" in out else out[names[0]]
    scores = out["scores"] if "scores" in out else out[names[1]]
    return boxes, scores


def compare_detections(manifest: Manifest, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                       letterboxes: list[Letterbox]) -> dict[str, Any]:
    """Post-process both and match detections per image: same class, every box edge within BOX_TOL_PX."""
    from kiln.processing import detect_postprocess  # type: ignore[attr-defined]

    post = manifest.detect_post()
    ref = detect_postprocess(*_det_outputs(manifest, reference), letterboxes, post, manifest.classes)
    cand = detect_postprocess(*_det_outputs(manifest, candidate), letterboxes, post, manifest.classes)
    matched = missing = extra = 0
    worst = 0.0
    for r_img, c_img in zip(ref, cand, strict=True):
        free = list(c_img)
        for det in r_img:
            best, best_err = None, float("inf")
            for i, other in enumerate(free):
                if other["index"] != det["index"]:
                    continue
                err = float(np.max(np.abs(np.asarray(other["box"], np.float64) - np.asarray(det["box"], np.float64))))
                if err < best_err:
                    best, best_err = i, err
            if best is None or best_err > BOX_TOL_PX:
                missing += 1
                continue
            worst = max(worst, best_err)
            matched += 1
            free.pop(best)
        extra += len(free)
    return {"detections": matched + missing, "matched": matched, "missing": missing, "extra": extra,
            "max_box_diff_px": round(worst, 4)}


def verify_fp32(bundle: Bundle, onnx_path: Any, *, count: int = DEFAULT_IMAGES) -> dict[str, Any]:
    """Compare the fp32 ONNX at ``onnx_path`` with PyTorch; raise :class:`ExportError` with the report
    when it differs beyond tolerance. Returns the report (recorded in kiln.json)."""
    from kiln.export.ortfile import OrtFileBackend

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
        report["tolerance_px"] = BOX_TOL_PX
        ok = report["missing"] == 0 and report["extra"] == 0
        why = (f"{report['missing']} detection(s) missing or moved > {BOX_TOL_PX} px, {report['extra']} extra "
               f"(of {report['detections']})")
    report["passed"] = bool(ok)
    if not ok:
        raise ExportError(f"verification failed for {onnx_path} on {report['images']} validation images: {why}; "
                          "previous artifacts are untouched")
    log.info("verified fp32 ONNX against PyTorch on %d val images: max abs diff %.3g",
             report["images"], report["max_abs_diff"])
    return report
