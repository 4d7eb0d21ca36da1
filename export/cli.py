"""``kiln export`` and ``kiln calibrate``. Heavy imports (torch, onnx, onnxruntime) happen in run()."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from kiln.bundle import BatchRange
from kiln.calib.quantize import LAYOUTS, METHODS, CalibSettings
from kiln.cli import (
    HelpFormatter,
    batch_range,
    choice,
    csv_of,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from kiln.vocab import GRAPH_PRECISIONS as PRECISIONS

CALIB_METHODS = ("auto", *METHODS)


def _calibration_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("int8 calibration")
    g.add_argument("--calib-images", type=positive_int, default=512, metavar="N",
                   help="train-split images used to calibrate (drawn with --calib-seed)")
    g.add_argument("--calib-seed", type=non_negative_int, default=0,
                   help="seed for drawing calibration images")
    g.add_argument("--calib-method", type=choice("calibration method", CALIB_METHODS), default="auto",
                   help="auto measures minmax, entropy and percentile and keeps the best")
    g.add_argument("--max-accuracy-drop", type=non_negative_float, default=None, metavar="POINTS",
                   help="largest allowed drop of top-1 (classify) or mAP@[.5:.95] (detect) vs fp32, in "
                        "points; layers are kept in float, most sensitive first, until it holds (default: "
                        "1.0, or one validation image's worth when the split has under 100 images)")
    g.add_argument("--calib-eval-images", type=positive_int, default=None, metavar="N",
                   help="validation images per candidate during the search; None: the whole split")
    g.add_argument("--calib-cache", type=Path, default=None, metavar="DIR",
                   help="calibration cache folder; None: BUNDLE/.cache/calib")
    g.add_argument("--int8-layout", type=choice("int8 layout", LAYOUTS), default="tensorrt",
                   help="tensorrt: Q/DQ on weighted layers' inputs, what TensorRT builds engines from (ONNX "
                        "Runtime runs it in float on a CPU, slower than fp32); cpu: what ONNX Runtime's CPU "
                        "provider runs as integer kernels (no TensorRT engine from it)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="RUN_OR_BUNDLE",
                   help="bundle folder written by kiln train (has kiln.json)")
    p.add_argument("--batch", type=batch_range, default=BatchRange(min=1, opt=8, max=32),
                   metavar="MIN:OPT:MAX", help="dynamic batch range (engine profile, Triton max_batch_size)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset; None: the exporter's own")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim graph simplification")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout (logs stay on stderr)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX (fp32/fp16/int8), TensorRT engines and a Triton repository",
        formatter_class=HelpFormatter,
        description=(
            "Export a trained bundle. fp32 ONNX is verified against PyTorch on validation images; fp16 and\n"
            "int8 are measured with ONNX Runtime and recorded in kiln.json.\n\n"
            "example:\n"
            "  kiln export runs/digits --precision fp32,fp16,int8 --batch 1:8:32\n"
            "  kiln export runs/digits --precision int8 --engine --triton-repo models/"
        ),
    )
    _common(p)
    p.add_argument("--precision", type=csv_of(choice("precision", PRECISIONS)), default=["fp32"],
                   help="comma-separated subset of fp32,fp16,int8")
    n = p.add_argument_group("detectors: NMS in the graph")
    n.add_argument("--nms", action="store_true",
                   help="also write an end-to-end graph per precision (model.nms.onnx, ...) with NMS inside "
                        "and EfficientNMS-style outputs num_dets, det_boxes, det_scores, det_classes")
    n.add_argument("--nms-conf", type=non_negative_float, default=None, metavar="SCORE",
                   help="score threshold in the graph; None: kiln.json's postprocess score_threshold")
    n.add_argument("--nms-iou", type=non_negative_float, default=None, metavar="IOU",
                   help="IoU threshold in the graph; None: kiln.json's postprocess iou_threshold")
    n.add_argument("--nms-max-det", type=positive_int, default=None, metavar="K",
                   help="detections per image K (outputs padded to K); None: kiln.json's max_detections")
    n.add_argument("--nms-agnostic", action="store_true", default=None,
                   help="NMS across classes; default: per class, or kiln.json's class_agnostic")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--engine", action="store_true", help="also build a TensorRT engine per precision")
    g.add_argument("--workspace-gib", type=positive_float, default=4.0, help="builder workspace limit")
    g.add_argument("--timing-cache", type=Path, default=None, metavar="FILE_OR_DIR",
                   help="timing cache reused across builds (a folder keeps one per "
                        "GPU model and TensorRT version)")
    g.add_argument("--hardware-compat", action="store_true", help="engine runs on Ampere and newer GPUs")
    g.add_argument("--version-compat", action="store_true", help="engine runs on later TensorRT versions")
    g.add_argument("--tf32", action="store_true",
                   help="let float32 layers compute in TF32 (faster on Ampere and newer, 10-bit mantissas); "
                        "default: float32 layers compute in fp32")
    t = p.add_argument_group("Triton")
    t.add_argument("--triton-repo", type=Path, default=None, metavar="DIR",
                   help="write a Triton model repository")
    t.add_argument("--triton-precision", type=choice("precision", PRECISIONS), default=None,
                   help="precision served by Triton; None: the first of --precision")
    t.add_argument("--triton-raw", action="store_true",
                   help="detectors: put the raw graph (boxes, scores) in the repository; default: the "
                        "end-to-end graph when --nms writes one")
    t.add_argument("--triton-max-delay-us", type=positive_int, default=1000,
                   help="dynamic_batching max_queue_delay_microseconds")
    _calibration_flags(p)
    p.set_defaults(func=run)

    c = sub.add_parser(
        "calibrate",
        help="INT8 calibration only (writes model.int8.onnx and its report)",
        formatter_class=HelpFormatter,
        description=(
            "Calibrate the bundle's fp32 ONNX (exported first if missing or stale) to a Q/DQ int8 ONNX\n"
            "within --max-accuracy-drop, and write model.int8.calib.{json,txt}.\n\n"
            "example:\n"
            "  kiln calibrate runs/digits --calib-images 512 --max-accuracy-drop 0.5"
        ),
    )
    _common(c)
    _calibration_flags(c)
    c.set_defaults(func=run_calibrate, precision=["int8"], engine=False, workspace_gib=4.0, timing_cache=None,
                   hardware_compat=False, version_compat=False, tf32=False, triton_repo=None,
                   triton_precision=None, triton_max_delay_us=1000, triton_raw=False, nms=False,
                   nms_conf=None, nms_iou=None, nms_max_det=None, nms_agnostic=None)


def _options(args: argparse.Namespace) -> Any:
    # The pipeline loads onnxruntime (calibration subclasses its data reader): only a command that
    # exports pays for it, not `kiln --help` or the other commands.
    from kiln.export.pipeline import ExportOptions

    return ExportOptions(
        precisions=list(dict.fromkeys(args.precision)),
        batch=args.batch,
        opset=args.opset,
        simplify=not args.no_simplify,
        engine=args.engine,
        workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache,
        hardware_compat=args.hardware_compat,
        version_compat=args.version_compat,
        tf32=args.tf32,
        triton_repo=args.triton_repo,
        triton_precision=args.triton_precision,
        triton_max_delay_us=args.triton_max_delay_us,
        triton_raw=args.triton_raw,
        calib=CalibSettings(method=args.calib_method, images=args.calib_images, seed=args.calib_seed,
                            max_accuracy_drop=(
                                CalibSettings.max_accuracy_drop if args.max_accuracy_drop is None
                                               else args.max_accuracy_drop),
                            eval_limit=args.calib_eval_images, layout=args.int8_layout),
        calib_cache=args.calib_cache,
        nms=args.nms,
        nms_conf=args.nms_conf,
        nms_iou=args.nms_iou,
        nms_max_det=args.nms_max_det,
        nms_agnostic=args.nms_agnostic,
        budget_follows_split=args.max_accuracy_drop is None,
    )


def run(args: argparse.Namespace) -> int:
    from kiln.export.pipeline import EngineStepFailed, export_bundle

    try:
        # Libraries print progress on stdout (the exporter, onnxruntime's calibrators); --json owns it.
        with contextlib.redirect_stdout(sys.stderr):
            summary = export_bundle(args.bundle, _options(args))
    except EngineStepFailed as exc:
        _print(exc.summary, args.json)
        raise
    _print(summary, args.json)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from kiln.export.pipeline import calibrate_only

    with contextlib.redirect_stdout(sys.stderr):
        summary = calibrate_only(args.bundle, _options(args))
    _print(summary, args.json)
    return 0


def _print(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        rows = [
            {"path": a["path"], "format": a["format"], "precision": a["precision"], "sha256": a["sha256"],
             "metrics": a.get("metrics", {}), "verification": a.get("verification"),
             **({"calibration": a["calibration"]} if "calibration" in a else {})}
            for a in summary["artifacts"]
        ]
        json.dump({**summary, "artifacts": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    from kiln.metrics import POINTS_PER_UNIT

    points = POINTS_PER_UNIT.get(summary.get("task", ""), 1.0)  # mAP in points: 76.48, not 0.76
    for a in summary["artifacts"]:
        m = a.get("metrics") or {}
        acc = ", ".join(
            f"{k} {v * points:.2f}" for k, v in m.items() if k in ("top1", "top5", "map", "map50"))
        v = a.get("verification") or {}
        check = "verified" if v.get("passed") else ("not verified" if v else "")
        diff = f", max diff {v['max_abs_diff']:.2g}" if "max_abs_diff" in v else ""
        print(f"{a['precision']:>5} {a['format']:<9} {a['path']}  {acc}  {check}{diff}", file=sys.stderr)
    if summary.get("triton"):
        print(f"Triton model repository: {summary['triton']}", file=sys.stderr)
