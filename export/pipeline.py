"""``kiln export``: fp32 ONNX (verified), fp16 and int8 variants, TensorRT engines, Triton repository.

Every file is written to a temporary name inside the bundle and renamed only after it has been
verified, and kiln.json is saved after each artifact: a failure at any step leaves the previous
artifacts and the manifest as they were, and everything that succeeded before it recorded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.bundle import BatchRange, Bundle, TensorSpec
from kiln.calib.onnxfile import check_onnx_file, onnx_errors
from kiln.calib.quantize import CalibSettings
from kiln.calib.run import calibrate_bundle, report_paths, write_reports
from kiln.compare import Tolerance, compare, detection_output_names
from kiln.errors import BackendUnavailable, BundleError, ConfigError, ExportError, unknown_choice
from kiln.evaluate import bundle_split, evaluate
from kiln.export.onnx2fp16 import onnx2fp16
from kiln.export.onnx2nms import NmsSettings, onnx2nms, verify_end_to_end
from kiln.export.torch2onnx import torch2onnx
from kiln.export.triton import TritonOptions, write_triton_repo
from kiln.export.verify import backend_outputs, verification_images, verify_fp32
from kiln.fsutil import atomic_path, remove_stale_temps, sha256_file
from kiln.metrics import headline
from kiln.runtime import open_artifact
from kiln.runtime.onnxrt import OnnxRuntimeBackend
from kiln.runtime.ortfile import OrtFileBackend
from kiln.runtime.tensorrt import unlist_superseded_engines
from kiln.vocab import GRAPH_PRECISIONS

log = logging.getLogger(__name__)

PRECISIONS = GRAPH_PRECISIONS
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# Detectors' end-to-end graphs (NMS inside), one per exported precision.
NMS_FILES = {"fp32": "model.nms.onnx", "fp16": "model.fp16.nms.onnx", "int8": "model.int8.nms.onnx"}
FP16_MIN_AGREEMENT = 98.0  # percent of verification images with the same top-1 as fp32
TRT_INSTALL = ("pip install '.[trt]' from the kiln checkout (pip install 'kiln-vision[trt]' from a package "
               "index) on a machine with an NVIDIA GPU and driver")


@dataclass
class ExportOptions:
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batch: BatchRange = field(default_factory=lambda: BatchRange(min=1, opt=8, max=32))
    opset: int | None = None
    simplify: bool = True
    engine: bool = False
    workspace_gib: float = 4.0
    timing_cache: Path | None = None
    hardware_compat: bool = False
    version_compat: bool = False
    tf32: bool = False
    triton_repo: Path | None = None
    triton_precision: str | None = None
    triton_max_delay_us: int = 1000
    # detectors: the raw graph in the Triton repository even when --nms wrote another
    triton_raw: bool = False
    calib: CalibSettings = field(default_factory=CalibSettings)
    calib_cache: Path | None = None
    verify_images: int = 64
    # --nms: also write detectors' end-to-end graphs; None values take kiln.json's postprocess defaults
    nms: bool = False
    nms_conf: float | None = None
    nms_iou: float | None = None
    nms_max_det: int | None = None
    nms_agnostic: bool | None = None
    # --max-accuracy-drop left at its default: at least one validation image's worth (see int8_budget)
    budget_follows_split: bool = False

    def __post_init__(self) -> None:
        for p in self.precisions:
            if p not in PRECISIONS:
                raise unknown_choice("precision", p, PRECISIONS, flag="--precision")
        if self.triton_precision and self.triton_precision not in self.precisions:
            raise ExportError(
                f"--triton-precision {self.triton_precision} is not among --precision "
                f"{','.join(self.precisions)}")


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """A bundle with PyTorch weights to export; a folder without them is a one-line error."""
    bundle = Bundle.load(path)
    if not bundle.path("model.pt").is_file():
        raise BundleError(
            f"{bundle.root} has no model.pt to export (train first: kiln train --out {bundle.root})")
    return bundle


def _record(bundle: Bundle, file: str, fmt: str, precision: str, **extra: Any) -> dict[str, Any]:
    art = bundle.add_artifact(file, fmt, precision, **extra)
    bundle.save()
    record = art.model_dump(mode="json")
    # the summary keeps an engine's provenance flat, as onnx2engine returns it
    engine = record.pop("engine", {})
    return {"path": str(bundle.path(file)), **record, **engine}


def _evaluate_file(bundle: Bundle, path: Path, precision: str) -> dict[str, float]:
    with OrtFileBackend(path, bundle.manifest, precision=precision) as backend:
        return evaluate(bundle, backend, "val")


def export_fp32(bundle: Bundle, opts: ExportOptions) -> dict[str, Any]:
    file = ONNX_FILES["fp32"]
    source = sha256_file(bundle.path("model.pt"))
    with atomic_path(bundle.path(file)) as tmp:
        info = torch2onnx(bundle, tmp, batch=opts.batch, opset=opts.opset, simplify=opts.simplify)
        verification = verify_fp32(bundle, tmp, count=opts.verify_images)
        metrics = _evaluate_file(bundle, tmp, "fp32")
    return _record(bundle, file, "onnx", "fp32", metrics=metrics, verification=verification,
                   source_sha256=source, batch=opts.batch.model_dump(), **info)


def export_fp16(bundle: Bundle, opts: ExportOptions, fp32_file: str) -> dict[str, Any]:
    file = ONNX_FILES["fp16"]
    with atomic_path(bundle.path(file)) as tmp:
        info = onnx2fp16(bundle.path(fp32_file), tmp)
        verification = compare_with_fp32(bundle, bundle.path(fp32_file), tmp, "fp16", opts.verify_images)
        if bundle.manifest.task == "classify" and verification["top1_agreement"] < FP16_MIN_AGREEMENT:
            verification["passed"] = False
            raise ExportError("fp16 verification failed: top-1 agrees with fp32 on "
                              f"{verification['top1_agreement']:.1f}% of {verification['images']} images (< "
                              f"{FP16_MIN_AGREEMENT}%); {file} was not written")
        verification["passed"] = True
        metrics = _evaluate_file(bundle, tmp, "fp16")
    return _record(bundle, file, "onnx", "fp16", metrics=metrics, verification=verification,
                   source_sha256=bundle.manifest.artifacts[fp32_file].sha256, **info)


def compare_with_fp32(bundle: Bundle, fp32: Path, candidate: Path, precision: str,
                      count: int) -> dict[str, Any]:
    """Outputs of a reduced-precision graph against the fp32 graph on the verification images."""
    x, boxes = verification_images(bundle, count)
    with (OrtFileBackend(fp32, bundle.manifest) as ref,
          OrtFileBackend(candidate, bundle.manifest, precision=precision) as cand):
        # the fp32 tolerance's figures (per output, top-k) are recorded; what fails a reduced precision is
        # its top-1 agreement and accuracy, not rounding that fp32 would not have
        report = compare(bundle.manifest, backend_outputs(ref, x), backend_outputs(cand, x), boxes,
                         tolerance=Tolerance() if bundle.manifest.task == "classify" else None)
    for errors in report.get("outputs", {}).values():
        errors["within_fp32_tolerance"] = errors.pop("passed")
    report["reference"] = "fp32 onnx (onnxruntime cpu)"
    return dict(report)


def int8_budget(bundle: Bundle, opts: ExportOptions) -> CalibSettings:
    """The calibration settings with the default accuracy budget raised to one validation image's worth
    of top-1 (100 / N points) when that is more: on a 48-image split one image is 2.08 points, so the
    default 1.0 would demand that no image change and keep most layers in float."""
    calib = opts.calib
    if not opts.budget_follows_split or bundle.manifest.task != "classify":
        return calib
    n = len(bundle_split(bundle, "val"))
    if calib.eval_limit is not None:
        n = min(n, calib.eval_limit)
    one_image = 100.0 / max(n, 1)
    if one_image <= calib.max_accuracy_drop:
        return calib
    log.info("int8: accuracy budget %.2f points, one of the %d validation images (--max-accuracy-drop %g "
             "would let no image change); give --max-accuracy-drop to choose", one_image, n,
             calib.max_accuracy_drop)
    return replace(calib, max_accuracy_drop=round(one_image, 4))


def export_int8(bundle: Bundle, opts: ExportOptions, fp32_file: str) -> dict[str, Any]:
    file = ONNX_FILES["int8"]
    calib = int8_budget(bundle, opts)
    fp32_art = bundle.manifest.artifacts[fp32_file]
    baseline = (headline(bundle, fp32_art.metrics)[1]
                if fp32_art.metrics and calib.eval_limit is None else None)
    out = bundle.path(file)
    # Quantize, compare and measure a temporary file; the old int8 model, its report and its kiln.json
    # entry stay as they were until the new one is complete.
    with atomic_path(out) as tmp:
        report = calibrate_bundle(bundle, bundle.path(fp32_file), tmp, calib, baseline=baseline,
                                  cache_root=opts.calib_cache, report_for=out, write_report=False)
        verification = compare_with_fp32(bundle, bundle.path(fp32_file), tmp, "int8", opts.verify_images)
        metrics = _evaluate_file(bundle, tmp, "int8")
    write_reports(report, out)
    verification.update(
        {"passed": True, "accuracy_drop": report["drop"], "max_accuracy_drop": report["max_accuracy_drop"]})
    json_report, _ = report_paths(out)
    calibration = {k: report[k] for k in ("method", "layout", "images", "excluded_layers", "fp32", "int8",
                                          "drop", "latency_ms_ort_cpu") if k in report}
    return _record(bundle, file, "onnx", "int8", metrics=metrics, verification=verification,
                   source_sha256=fp32_art.sha256, calibration=calibration,
                   calibration_report=json_report.name)


def export_nms(bundle: Bundle, opts: ExportOptions, precision: str, raw_file: str) -> dict[str, Any]:
    """The end-to-end graph (NMS inside) of ``raw_file``, verified against kiln's post-processing of the
    raw graph's outputs on the validation images, recorded with its NMS settings and outputs."""
    settings = nms_settings(bundle, opts)
    file = NMS_FILES[precision]
    boxes, scores = detection_output_names(bundle.manifest)
    x, letterboxes = verification_images(bundle, opts.verify_images)
    with atomic_path(bundle.path(file)) as tmp:
        info = onnx2nms(bundle.path(raw_file), tmp, boxes=boxes, scores=scores, settings=settings)
        raw = OrtFileBackend(bundle.path(raw_file), bundle.manifest, precision=precision)
        end_to_end = OnnxRuntimeBackend(tmp, inputs=[bundle.manifest.input],
                                        outputs=[TensorSpec.model_validate(o) for o in info["outputs"]],
                                        precision=precision, device="cpu", max_batch=len(x))
        with raw, end_to_end:
            verification = verify_end_to_end(bundle.manifest, raw, end_to_end, x, letterboxes, settings)
    return _record(bundle, file, "onnx", precision, verification=verification,
                   source_sha256=bundle.manifest.artifacts[raw_file].sha256, **info)


def nms_settings(bundle: Bundle, opts: ExportOptions) -> NmsSettings:
    """kiln.json's detection defaults with the --nms-* flags given (ExportError for a value out of range)."""
    return NmsSettings.from_post(bundle.manifest.detect_post(), score_threshold=opts.nms_conf,
                                 iou_threshold=opts.nms_iou, max_detections=opts.nms_max_det,
                                 class_agnostic=opts.nms_agnostic)


def build_engines(bundle: Bundle, opts: ExportOptions,
                  onnx_files: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Build one engine per exported precision; returns (artifacts, errors) so ONNX results stand."""
    try:  # TensorRT is an optional extra: without it the ONNX artifacts still stand
        from kiln.export.onnx2engine import engine_file_here, onnx2engine
    except ModuleNotFoundError as exc:
        if exc.name not in ("kiln.export.onnx2engine", "tensorrt"):
            raise
        return [], [f"TensorRT support is not installed: {TRT_INSTALL}"]
    done, errors = [], []
    for precision, onnx_file in onnx_files.items():
        try:
            file = engine_file_here(precision)  # keyed by GPU model and TensorRT version
            with atomic_path(bundle.path(file)) as tmp:
                provenance = onnx2engine(
                    bundle.path(onnx_file), tmp, precision=precision, batch=opts.batch,
                    input_name=bundle.manifest.input.name, workspace_gib=opts.workspace_gib,
                    timing_cache=opts.timing_cache, hardware_compat=opts.hardware_compat,
                    version_compat=opts.version_compat, tf32=opts.tf32,
                )
        except BackendUnavailable as exc:
            errors.append(f"--engine: {exc}")
            break  # the same reason applies to every precision
        except ExportError as exc:
            errors.append(f"--engine {precision}: {exc}")
            continue
        provenance = {
            k: v for k, v in dict(provenance).items() if k not in ("file", "format", "precision", "sha256")}
        entry = _record(bundle, file, "tensorrt", precision,
                        source_sha256=bundle.manifest.artifacts[onnx_file].sha256, **provenance)
        if replaced := unlist_superseded_engines(bundle, file):
            log.info("%s replaces %s (same GPU model and TensorRT)", file, ", ".join(replaced))
            bundle.save()
        entry["metrics"] = _engine_metrics(bundle, file)
        if entry["metrics"]:
            bundle.manifest.artifacts[file].metrics = entry["metrics"]
            bundle.save()
        done.append(entry)
    return done, errors


def _engine_metrics(bundle: Bundle, file: str) -> dict[str, float]:
    try:
        with open_artifact(bundle, bundle.manifest.artifacts[file]) as backend:
            return evaluate(bundle, backend, "val")
    except (ImportError, BackendUnavailable) as exc:
        log.warning("engine %s built but not measured here: %s", file, exc)
        return {}


def export_bundle(path: str | os.PathLike[str], opts: ExportOptions) -> dict[str, Any]:
    """Run the export; return the summary (``--json``). Raises ExportError after the ONNX artifacts
    are written when only the engine step failed."""
    bundle = open_bundle(path)
    # A killed export leaves its temporary files behind; this run is the next one on the bundle.
    remove_stale_temps(bundle.root)
    if opts.calib_cache is not None:
        remove_stale_temps(opts.calib_cache)
    preflight(bundle, opts)
    with onnx_errors():  # anything onnx/onnxruntime raise past the file checks: one line, not a traceback
        return _export(bundle, opts)


def preflight(bundle: Bundle, opts: ExportOptions) -> None:
    """Check what can be checked before any work, so a missing requirement costs seconds, not an export."""
    if opts.engine and "int8" in opts.precisions and opts.calib.layout == "cpu":
        raise ConfigError("--int8-layout cpu is for ONNX Runtime on a CPU; TensorRT builds int8 engines from "
                          "--int8-layout tensorrt (the default)")
    if opts.engine:
        engine_requirements()
    if opts.nms and bundle.manifest.task != "detect":
        raise ConfigError(f"--nms puts a detector's NMS inside its graph; {bundle.root} is a "
                          f"{bundle.manifest.task} model")
    if opts.nms:
        nms_settings(bundle, opts)
    if opts.triton_repo is not None and opts.triton_repo.exists() and not opts.triton_repo.is_dir():
        raise ExportError(f"--triton-repo {opts.triton_repo} is a file; give a folder")


def engine_requirements() -> None:
    """Raise BackendUnavailable in one line when TensorRT or a GPU is missing, saying how to get it."""
    from kiln.runtime import cuda
    from kiln.runtime.tensorrt import INSTALL_HINT, import_tensorrt

    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        why = str(exc).removesuffix(INSTALL_HINT).rstrip(": ")
        raise BackendUnavailable(f"--engine: {why}: {TRT_INSTALL}; or leave out --engine") from None
    if (no_gpu := cuda.no_gpu_reason()) is not None:
        raise BackendUnavailable("--engine: building a TensorRT engine needs an NVIDIA GPU and driver "
                                 f"({no_gpu}); run the export on a GPU machine, or leave out --engine")


def _fp32_is_fresh(bundle: Bundle, opts: ExportOptions) -> bool:
    """Whether model.onnx is the export of the current model.pt with the options asked for."""
    fp32_file = ONNX_FILES["fp32"]
    existing = bundle.manifest.artifacts.get(fp32_file)
    return (existing is not None and bundle.path(fp32_file).is_file()
            and existing.source_sha256 == sha256_file(bundle.path("model.pt"))
            and sha256_file(bundle.path(fp32_file)) == existing.sha256
            # a different --opset or simplification asked for means a different graph
            and (opts.opset is None or existing.opset == opts.opset)
            and not (existing.simplified and not opts.simplify))


def _export(bundle: Bundle, opts: ExportOptions) -> dict[str, Any]:
    artifacts: list[dict[str, Any]] = []
    fp32_file = ONNX_FILES["fp32"]
    if "fp32" in opts.precisions or not _fp32_is_fresh(bundle, opts):
        log.info("exporting %s to %s", bundle.root / "model.pt", fp32_file)
        artifacts.append(export_fp32(bundle, opts))
        drop_stale_artifacts(bundle)
    else:  # reused as the source of fp16/int8: a damaged file stops here, before minutes of calibration
        check_onnx_file(bundle.path(fp32_file),
                        hint=f"re-export it: kiln export {bundle.root} --precision fp32")
    onnx_files = {"fp32": fp32_file}
    if "fp16" in opts.precisions:
        log.info("converting to fp16")
        artifacts.append(export_fp16(bundle, opts, fp32_file))
        onnx_files["fp16"] = ONNX_FILES["fp16"]
    if "int8" in opts.precisions:
        log.info("calibrating int8")
        artifacts.append(export_int8(bundle, opts, fp32_file))
        onnx_files["int8"] = ONNX_FILES["int8"]
    onnx_files = {p: f for p, f in onnx_files.items() if p in opts.precisions}
    nms_files: dict[str, str] = {}
    if opts.nms:
        for precision, raw_file in onnx_files.items():
            log.info("writing the end-to-end %s graph (NMS inside)", precision)
            artifacts.append(export_nms(bundle, opts, precision, raw_file))
            nms_files[precision] = NMS_FILES[precision]
        drop_other_nms(bundle, nms_files)

    errors: list[str] = []
    engines: dict[str, str] = {}
    if opts.engine:
        built, errors = build_engines(bundle, opts, onnx_files)
        artifacts.extend(built)
        engines = {a["precision"]: a["file"] for a in built}
    triton = None
    if opts.triton_repo:
        precision = opts.triton_precision or opts.precisions[0]
        triton = str(write_triton_repo(bundle, opts.triton_repo, onnx_file=onnx_files[precision],
                                       engine_file=engines.get(precision), batch=opts.batch,
                                       options=TritonOptions(max_queue_delay_us=opts.triton_max_delay_us),
                                       end_to_end_file=None if opts.triton_raw
                                       else end_to_end_of(bundle, onnx_files[precision])))
    summary = {"bundle": str(bundle.root), "task": bundle.manifest.task, "artifacts": artifacts,
               "triton": triton, "errors": errors}
    if errors:
        raise EngineStepFailed(summary, "; ".join(errors) + " (the ONNX artifacts were written)")
    return summary


def drop_stale_artifacts(bundle: Bundle) -> list[str]:
    """Unlist artifacts derived from a file that is no longer what kiln.json records.

    fp16/int8 graphs record the sha256 of the fp32 ONNX they came from, engines that of their ONNX;
    after a re-export of model.onnx they describe another graph, and serving must not pick them.
    The files stay on disk; the next export of that precision replaces them.
    """
    dropped: list[str] = []
    changed = True
    while changed:
        changed = False
        current = {a.sha256 for a in bundle.manifest.artifacts.values()}
        for name, art in list(bundle.manifest.artifacts.items()):
            source = art.source_sha256
            if art.format != "torch" and source is not None and source not in current:
                del bundle.manifest.artifacts[name]
                dropped.append(name)
                changed = True
    if dropped:
        log.warning("unlisted %s: made from an earlier model.onnx; re-export them (--precision ...)",
                    ", ".join(dropped))
        bundle.save()
    return dropped


def end_to_end_of(bundle: Bundle, raw_file: str) -> str | None:
    """The end-to-end graph made from ``raw_file`` as it is now (this export's or an earlier one's),
    or None."""
    source = bundle.manifest.artifacts[raw_file].sha256
    return next((name for name, art in bundle.manifest.artifacts.items()
                 if art.nms is not None and art.source_sha256 == source), None)


def drop_other_nms(bundle: Bundle, written: dict[str, str]) -> None:
    """Unlist end-to-end graphs this export did not rewrite when their NMS settings differ from the new
    ones: a bundle's end-to-end graphs answer with one set of thresholds (what serving reports)."""
    if not written:
        return
    current = bundle.manifest.artifacts[next(iter(written.values()))].nms
    stale = [name for name, art in bundle.manifest.artifacts.items()
             if name not in written.values() and art.nms not in (None, current)]
    for name in stale:
        del bundle.manifest.artifacts[name]
    if stale:
        log.warning("unlisted %s: end-to-end graphs with other NMS settings; re-export them with --nms",
                    ", ".join(stale))
        bundle.save()


class EngineStepFailed(ExportError):
    """The ONNX artifacts were written but the engine step could not run."""

    def __init__(self, summary: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.summary = summary


def calibrate_only(path: str | os.PathLike[str], opts: ExportOptions) -> dict[str, Any]:
    """``kiln calibrate``: int8 from the bundle's fp32 ONNX (exported first if missing or stale)."""
    opts.precisions = ["int8"]
    return export_bundle(path, opts)
