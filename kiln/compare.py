"""Compare model outputs, and the artifact table ``kiln eval BUNDLE`` prints.

:func:`compare` measures candidate outputs against reference outputs: the max absolute difference per
output, and for classification the top-1 agreement, for detection the detection-level match after
:func:`kiln.processing.detect_postprocess` (same class, box edges within ``BOX_TOL_PX`` original pixels).
Export verifies each graph with it; :func:`artifact_table` runs every artifact in kiln.json (PyTorch,
fp32/fp16/int8 ONNX, TensorRT engines where runnable here) and lists its accuracy (top-1/top-5) or mAP,
its agreement with fp32 PyTorch and the max absolute output difference from fp32 PyTorch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kiln.bundle import Bundle, Manifest
from kiln.errors import ExportError, KilnError
from kiln.evaluate import bundle_split, run_split, split_metrics
from kiln.metrics import numeric
from kiln.processing import Letterbox, detect_postprocess
from kiln.runtime import open_artifact

log = logging.getLogger(__name__)

BOX_TOL_PX = 0.5
_ORDER = {"torch": 0, "onnx": 1, "tensorrt": 2}
_PREC = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3}


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


def artifact_table(bundle: Bundle | str, split: str = "val", limit: int | None = None) -> list[dict[str, Any]]:
    """One row per artifact: file, format, precision, backend, device, metrics, agreement, max_abs_diff,
    or ``error`` when the artifact cannot run here (an engine without TensorRT, a modified file)."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    ds = bundle_split(b, split)
    arts = sorted(b.manifest.artifacts.values(), key=lambda a: (_ORDER.get(a.format, 9), _PREC.get(a.precision, 9), a.file))
    reference = None
    ref_art = next((a for a in arts if a.format == "torch" and a.precision == "fp32"), None)
    rows: list[dict[str, Any]] = []
    if ref_art is not None:
        try:
            with open_artifact(b, ref_art, device="cpu") as ref_backend:
                reference = run_split(b, ref_backend, ds, limit)
        except KilnError as exc:
            log.warning("fp32 PyTorch reference unavailable: %s", exc)
    for art in arts:
        row: dict[str, Any] = {"file": art.file, "format": art.format, "precision": art.precision}
        device = None if art.format == "tensorrt" else "cpu"
        try:
            with open_artifact(b, art, device=device) as backend:
                row.update(backend=backend.name, device=backend.device)
                # one pass over the split per artifact serves both its metrics and the comparison
                out = reference if art is ref_art and reference is not None else run_split(b, backend, ds, limit)
                row["metrics"] = numeric(split_metrics(b, out, ds))
                if reference is not None:
                    cmp = compare(b.manifest, reference.outputs, out.outputs, reference.letterboxes)
                    row["max_abs_diff"] = cmp["max_abs_diff"]
                    if b.manifest.task == "classify":
                        row["agreement"] = cmp["top1_agreement"]
                    else:
                        total = max(1, cmp["detections"])
                        row["agreement"] = round(100.0 * cmp["matched"] / total, 3)
        except KilnError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], task: str = "classify") -> str:
    """A fixed-width text table of :func:`artifact_table` rows."""
    keys = ("top1", "top5") if task == "classify" else ("map", "map50")
    agree = "top1 agree %" if task == "classify" else "dets agree %"
    header = ["file", "format", "precision", "backend", *keys, agree, "max |diff|"]
    lines = []
    for r in rows:
        m = r.get("metrics") or {}
        if "error" in r:
            cells = [r["file"], r["format"], r["precision"], "-", "-", "-", "-", f"not runnable: {r['error']}"]
        else:
            cells = [
                r["file"], r["format"], r["precision"], f"{r.get('backend', '-')}/{r.get('device', '-')}",
                *(f"{m[k]:.2f}" if k in m else "-" for k in keys),
                f"{r['agreement']:.2f}" if "agreement" in r else "-",
                _num(r.get("max_abs_diff")),
            ]
        lines.append(cells)
    runnable = [c for c, r in zip(lines, rows, strict=True) if "error" not in r]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *runnable, strict=True)]
    widths[:7] = [max(w, *(len(str(c[i])) for c in lines)) for i, w in enumerate(widths[:7])]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for cells in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cells[:7], widths[:7], strict=True)) + "  " + str(cells[7]))
    return "\n".join(out) + "\n"


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.3g}" if np.isfinite(x) else str(x)
