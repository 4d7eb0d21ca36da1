"""Compare model outputs, and the artifact table ``kiln eval BUNDLE`` prints.

:func:`compare` measures candidate outputs against reference outputs: the max absolute difference per
output, and for classification the top-1 agreement, for detection the detection-level match after
:func:`kiln.processing.detect_postprocess` (same class, box edges within ``BOX_TOL_PX`` original pixels).
With a :class:`Tolerance` it also judges each output as Polygraphy's simple comparator does (an
absolute and a relative tolerance per output, element by element), the relative part measured against
the output's scale in that image (its largest ``|reference|``), and adds the top-k agreement.
Neither may hinge on which side of a cut a rounding falls: images whose top-2 logits are within
``LOGIT_ATOL`` are left out of the top-1 agreement, and detections whose score is within ``SCORE_ATOL``
of the score threshold (or of the last score kept under the detection cap) are neither missing nor
extra; the raw outputs, compared within tolerance, cover them.
Export verifies each graph with it; :func:`artifact_table` runs every artifact in kiln.json (PyTorch,
fp32/fp16/int8 ONNX, TensorRT engines where runnable here) and lists its accuracy (top-1/top-5) or mAP,
its agreement with fp32 PyTorch and the max absolute output difference from fp32 PyTorch.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.bench import time_backend
from kiln.bundle import Bundle, Manifest
from kiln.errors import ConfigError, ExportError, KilnError
from kiln.evaluate import bundle_split, run_split, split_metrics
from kiln.metrics import HEADLINE, POINTS_PER_UNIT, numeric
from kiln.processing import Letterbox, detect_postprocess
from kiln.runtime import open_artifact

log = logging.getLogger(__name__)

BOX_TOL_PX = 0.5
LOGIT_ATOL = 1e-4  # logits closer than this are a tie: either may come out on top
SCORE_ATOL = 1e-4  # detection scores (in [0, 1]) closer than this to a cut may fall on either side
# fp32 ONNX Runtime vs PyTorch: the rounding of a deep network grows with its activations, so a 224 px
# ResNet's logits differ by ~2e-4 where lenet5's differ by 1e-6; an element passes within
# FP32_ATOL + FP32_RTOL * (the image's largest |logit|). 1e-5 is Polygraphy's default rtol.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-5
TOP_K = 5  # the top-k agreement's k (capped below the number of classes)
_ORDER = {"torch": 0, "onnx": 1, "tensorrt": 2}
_PREC = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3}


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate output may be from the reference, per output and element by element:
    ``|candidate - reference| <= atol + rtol * scale``, ``scale`` being the largest ``|reference|`` of
    that output in that image. Logits near zero accumulate the same rounding as the largest ones, so
    the relative part follows the output's scale rather than each element's own size."""

    atol: float = FP32_ATOL
    rtol: float = FP32_RTOL

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):
            raise ConfigError(f"tolerance: atol and rtol >= 0 expected, got {self}")

    def bound(self, reference: np.ndarray) -> np.ndarray:
        """The allowed absolute difference per image ``[N]`` of ``reference [N, ...]``."""
        return self.atol + self.rtol * image_scale(reference)


def image_scale(values: np.ndarray) -> np.ndarray:
    """The largest ``|value|`` of each image ``[N]`` in ``values [N, ...]``."""
    flat = np.abs(values.astype(np.float64)).reshape(len(values), -1)
    return flat.max(axis=1) if flat.shape[1] else np.zeros(len(values))


def output_errors(reference: np.ndarray, candidate: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """One output's differences ``[N, ...]``: the max and mean absolute difference, the max difference
    relative to the image's scale, the values out of tolerance, and whether it ``passed``."""
    if not reference.size:
        return {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "max_rel_diff": 0.0, "scale": 0.0, "mismatches": 0,
                "values": 0, "passed": True}
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(ref - cand).reshape(len(ref), -1)
    scale = image_scale(ref)
    worst = diff.max(axis=1)
    # NaN anywhere is a mismatch: a comparison with NaN is False, so count what is not within the bound
    mismatches = int((~(diff <= tol.bound(ref)[:, None])).sum())
    rel = worst / np.maximum(scale, np.finfo(np.float64).tiny)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_rel_diff": float(rel.max()),
            "scale": float(scale.max()), "mismatches": mismatches, "values": int(diff.size),
            "passed": mismatches == 0}


def compare(manifest: Manifest, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            letterboxes: list[Letterbox], *, atol: float = LOGIT_ATOL, score_tol: float = SCORE_ATOL,
            tolerance: Tolerance | None = None) -> dict[str, Any]:
    """Differences of ``candidate`` from ``reference`` outputs: max abs diff per output, and for
    classification the top-1 agreement over images without a top-2 tie (within ``atol``), for
    detection the detection-level match (see :func:`compare_detections`).

    With ``tolerance``: ``outputs`` holds :func:`output_errors` per output, and for classification a
    tie is a gap within twice the image's tolerance (each side may move by one) and the top-k
    agreement (:func:`topk_agreement`) is added."""
    report: dict[str, Any] = {"images": len(letterboxes)}
    diffs = {}
    for spec in manifest.outputs:
        a, b = reference[spec.name], candidate[spec.name]
        if a.shape != b.shape:
            raise ExportError(f"output {spec.name}: shape {b.shape} differs from the reference {a.shape}")
        diffs[spec.name] = (float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                            if a.size else 0.0)
    report["max_abs_diff"] = max(diffs.values()) if diffs else 0.0
    report["max_abs_diff_by_output"] = diffs
    if tolerance is not None:
        report["outputs"] = {
            s.name: output_errors(reference[s.name], candidate[s.name], tolerance) for s in manifest.outputs}
    if manifest.task == "classify":
        ref, cand = reference[manifest.outputs[0].name], candidate[manifest.outputs[0].name]
        if tolerance is None:
            report.update(top1_agreement(ref, cand, atol))
        else:
            tie = 2.0 * tolerance.bound(ref)
            report.update(top1_agreement(ref, cand, tie))
            report.update(topk_agreement(ref, cand, topk_for(manifest), tie))
    else:
        report.update(compare_detections(manifest, reference, candidate, letterboxes, score_tol))
    return report


def top1_agreement(reference: np.ndarray, candidate: np.ndarray,
                   atol: float | np.ndarray = LOGIT_ATOL) -> dict[str, Any]:
    """Percent of images ``[N, C]`` with the same top-1, over the images where neither side has its
    top two logits within ``atol`` (a number, or one per image ``[N]``): a tie decided by rounding says
    nothing about the export."""
    tie = (_kth_gap(reference, 1) <= atol) | (_kth_gap(candidate, 1) <= atol)
    agree = (np.argmax(reference, axis=1) == np.argmax(candidate, axis=1))[~tie]
    return {"top1_agreement": round(100.0 * float(agree.mean()), 3) if agree.size else 100.0,
            "top1_ties": int(tie.sum())}


def topk_for(manifest: Manifest) -> int:
    """The k of the top-k agreement: ``TOP_K``, below the number of classes (the top-C set is every class)."""
    return max(1, min(TOP_K, len(manifest.classes) - 1))


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int,
                   tie: float | np.ndarray = LOGIT_ATOL) -> dict[str, Any]:
    """Percent of images ``[N, C]`` whose ``k`` highest classes are the same set on both sides, over
    the images where neither side has its k-th and (k+1)-th logits within ``tie`` (one per image or one
    for all): ``{"top_k": k, "topk_agreement": percent, "topk_ties": images left out}``."""
    k = min(k, reference.shape[1]) if reference.ndim == 2 else k
    if reference.ndim != 2 or not len(reference):
        return {"top_k": k, "topk_agreement": 100.0, "topk_ties": 0}
    ties = (_kth_gap(reference, k) <= tie) | (_kth_gap(candidate, k) <= tie)
    ref_sets = np.sort(np.argsort(-reference.astype(np.float64), axis=1, kind="stable")[:, :k], axis=1)
    cand_sets = np.sort(np.argsort(-candidate.astype(np.float64), axis=1, kind="stable")[:, :k], axis=1)
    agree = np.all(ref_sets == cand_sets, axis=1)[~ties]
    return {"top_k": k, "topk_agreement": round(100.0 * float(agree.mean()), 3) if agree.size else 100.0,
            "topk_ties": int(ties.sum())}


def _kth_gap(logits: np.ndarray, k: int) -> np.ndarray:
    """The gap between the k-th and (k+1)-th highest logit of each image (inf when there is no (k+1)-th)."""
    if logits.shape[1] <= k:
        return np.full(len(logits), np.inf)
    top = np.sort(logits.astype(np.float64), axis=1)[:, ::-1]
    return top[:, k - 1] - top[:, k]


def detection_output_names(manifest: Manifest) -> tuple[str, str]:
    """The names of a detector's ``boxes`` and ``scores`` outputs."""
    names = [o.name for o in manifest.outputs]
    return ("boxes" if "boxes" in names else names[0]), ("scores" if "scores" in names else names[1])


def _det_outputs(manifest: Manifest, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    boxes, scores = detection_output_names(manifest)
    return out[boxes], out[scores]


def _score(det: dict[str, Any]) -> float:
    return float(det["score"])


def compare_detections(manifest: Manifest, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                       letterboxes: list[Letterbox], score_tol: float = SCORE_ATOL) -> dict[str, Any]:
    """Post-process both and match detections per image: same class, every box edge within BOX_TOL_PX.

    An unmatched detection scoring within ``score_tol`` of a cut (the score threshold; the lowest
    score kept when an image reaches ``max_detections``) is counted as ``borderline``, not as missing
    or extra: which side of the cut it lands on is rounding.
    """
    post = manifest.detect_post()
    ref = detect_postprocess(*_det_outputs(manifest, reference), letterboxes, post, manifest.classes)
    cand = detect_postprocess(*_det_outputs(manifest, candidate), letterboxes, post, manifest.classes)
    matched = missing = extra = borderline = 0
    worst = 0.0
    for r_img, c_img in zip(ref, cand, strict=True):
        cuts = [post.score_threshold, *(min(_score(d) for d in dets) for dets in (r_img, c_img)
                                        if dets and len(dets) >= post.max_detections)]
        free = list(c_img)
        for det in r_img:
            best, best_err = None, float("inf")
            for i, other in enumerate(free):
                if other["index"] != det["index"]:
                    continue
                err = float(
                    np.max(np.abs(np.asarray(other["box"], np.float64) - np.asarray(det["box"], np.float64))))
                if err < best_err:
                    best, best_err = i, err
            if best is None or best_err > BOX_TOL_PX:
                near = _near_cut(det, cuts, score_tol)
                borderline, missing = borderline + near, missing + (not near)
                continue
            worst = max(worst, best_err)
            matched += 1
            free.pop(best)
        near_free = sum(_near_cut(d, cuts, score_tol) for d in free)
        borderline, extra = borderline + near_free, extra + len(free) - near_free
    return {"detections": matched + missing, "matched": matched, "missing": missing, "extra": extra,
            "borderline": borderline, "max_box_diff_px": round(worst, 4)}


def _near_cut(det: dict[str, Any], cuts: list[float], tol: float) -> bool:
    return any(abs(float(det["score"]) - c) <= tol for c in cuts)


@dataclass(frozen=True)
class Timing:
    """How :func:`artifact_table` times each artifact: p50 latency at batch 1 and the best items/s over
    ``batches`` (those outside an artifact's batch range are left out), through
    :func:`kiln.bench.time_backend` on random inputs of the bundle's input spec."""

    batches: tuple[int, ...] = (1, 8, 32)
    warmup: int = 5
    iters: int = 50

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1 or self.warmup < 0 or self.iters < 1:
            raise ConfigError(f"timing: batches >= 1, warmup >= 0 and iters >= 1 expected, got {self}")


def artifact_table(bundle: Bundle | str, split: str = "val", limit: int | None = None,
                   timing: Timing | None = None) -> list[dict[str, Any]]:
    """One row per artifact: file, format, precision, backend, device, size_mb, metrics, agreement,
    max_abs_diff, and with ``timing`` its speed (see :func:`time_artifact`); or ``error`` when the
    artifact cannot run here (an engine without TensorRT, a modified file)."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    ds = bundle_split(b, split)
    arts = sorted(b.artifacts(),
                  key=lambda a: (_ORDER.get(a.format, 9), _PREC.get(a.precision, 9), a.file))  # raw graphs
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
        with contextlib.suppress(OSError):
            row["size_mb"] = b.path(art.file).stat().st_size / 1e6
        device = None if art.format == "tensorrt" else "cpu"
        try:
            with open_artifact(b, art, device=device) as backend:
                row.update(backend=backend.name, device=backend.device)
                # one pass over the split per artifact serves both its metrics and the comparison
                out = (reference if art is ref_art and reference is not None
                       else run_split(b, backend, ds, limit))
                row["metrics"] = numeric(split_metrics(b, out, ds))
                if reference is not None:
                    cmp = compare(b.manifest, reference.outputs, out.outputs, reference.letterboxes)
                    row["max_abs_diff"] = cmp["max_abs_diff"]
                    if b.manifest.task == "classify":
                        row["agreement"] = cmp["top1_agreement"]
                    else:
                        total = max(1, cmp["detections"])
                        row["agreement"] = round(100.0 * cmp["matched"] / total, 3)
                if timing is not None:
                    row.update(time_artifact(b, backend, timing))
        except KilnError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


def time_artifact(bundle: Bundle, backend: Any, timing: Timing) -> dict[str, Any]:
    """``p50_ms_b1`` (median ms of one batch-1 call, when batch 1 is in range), ``items_per_s`` and
    ``best_batch`` (the batch of ``timing.batches`` with the most items per second)."""
    spec = bundle.manifest.input
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for batch in sorted(set(timing.batches)):
        if not backend.min_batch <= batch <= backend.max_batch:
            continue
        feeds = {spec.name: rng.standard_normal((batch, *spec.shape), dtype=np.float32)
                 .astype(np.dtype(spec.dtype))}
        samples, _, _, _ = time_backend(backend, feeds, timing.warmup, timing.iters, None)
        if batch == 1:
            out["p50_ms_b1"] = float(np.median(samples))
        rate = batch * len(samples) / (sum(samples) / 1000.0)  # summed call times: loop overhead left out
        if rate > out.get("items_per_s", 0.0):
            out.update(items_per_s=rate, best_batch=batch)
    return out


_METRIC_HEADERS = {"top1": "top1 %", "top5": "top5 %", "map": "mAP %", "map50": "mAP50 %"}


def metric_cell(task: str, key: str, metrics: dict[str, Any]) -> str:
    """A metric in points (percent) with two decimals: mAP 0.7648 shows as 76.48, so precisions that
    differ by a tenth of a point do not print the same."""
    return f"{metrics[key] * POINTS_PER_UNIT[task]:.2f}" if key in metrics else "-"


def format_table(rows: list[dict[str, Any]], task: str = "classify") -> str:
    """A fixed-width text table of :func:`artifact_table` rows."""
    keys = ("top1", "top5") if task == "classify" else ("map", "map50")
    agree = "top1 agree %" if task == "classify" else "dets agree %"
    header = ["file", "format", "precision", "backend", *(_METRIC_HEADERS[k] for k in keys), agree,
              "max |diff|"]
    lines = []
    for r in rows:
        m = r.get("metrics") or {}
        if "error" in r:
            cells = [r["file"], r["format"], r["precision"], "-", "-", "-", "-",
                     f"not runnable: {r['error']}"]
        else:
            cells = [
                r["file"], r["format"], r["precision"], f"{r.get('backend', '-')}/{r.get('device', '-')}",
                *(metric_cell(task, k, m) for k in keys),
                f"{r['agreement']:.2f}" if "agreement" in r else "-",
                _num(r.get("max_abs_diff")),
            ]
        lines.append(cells)
    return _render(header, lines, [("error" in r) for r in rows])


def format_speed_table(rows: list[dict[str, Any]], task: str = "classify") -> str:
    """Accuracy and speed per artifact (rows of :func:`artifact_table` with ``timing``): format,
    precision, size on disk, top-1 or mAP, p50 latency at batch 1 and items/s at the best batch."""
    key = HEADLINE[task]
    header = ["file", "format", "precision", "size MB", _METRIC_HEADERS[key], "p50 ms (b1)",
              "items/s (batch)"]
    lines = []
    for r in rows:
        size = f"{r['size_mb']:.2f}" if "size_mb" in r else "-"
        if "error" in r:
            lines.append(
                [r["file"], r["format"], r["precision"], size, "-", "-", f"not runnable: {r['error']}"])
            continue
        rate = f"{r['items_per_s']:.0f} ({r['best_batch']})" if "items_per_s" in r else "-"
        p50 = f"{r['p50_ms_b1']:.3f}" if "p50_ms_b1" in r else "-"
        lines.append(
            [r["file"], r["format"], r["precision"], size, metric_cell(task, key, r.get("metrics") or {}),
             p50, rate])
    return _render(header, lines, [("error" in r) for r in rows])


def _render(header: list[str], lines: list[list[str]], errors: list[bool]) -> str:
    """Fixed-width columns; an error row's last cell (a sentence) does not widen its column."""
    last = len(header) - 1
    runnable = [c for c, bad in zip(lines, errors, strict=True) if not bad]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *runnable, strict=True)]
    widths[:last] = [max(w, *(len(str(c[i])) for c in lines)) for i, w in enumerate(widths[:last])]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for cells in lines:
        out.append(("  ".join(str(c).ljust(w) for c, w in zip(cells[:last], widths[:last], strict=True))
                    + "  " + str(cells[last])).rstrip())
    return "\n".join(out) + "\n"


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.3g}" if np.isfinite(x) else str(x)
