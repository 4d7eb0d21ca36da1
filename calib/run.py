"""Calibrate a bundle's fp32 ONNX into ``model.int8.onnx`` with a report (JSON and text)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kiln.bundle import Bundle
from kiln.calib.data import CalibrationReader
from kiln.calib.quantize import CalibSettings, calibrate
from kiln.errors import ExportError
from kiln.evaluate import evaluate
from kiln.fsutil import atomic_write_json, atomic_write_text
from kiln.metrics import headline
from kiln.runtime.ortfile import OrtFileBackend, latency_ms

log = logging.getLogger(__name__)

LATENCY_BATCHES = (1, 8)


def calibrate_bundle(
    bundle: Bundle,
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    settings: CalibSettings,
    *,
    baseline: float | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    reader: CalibrationReader | None = None,
    report_for: str | os.PathLike[str] | None = None,
    write_report: bool = True,
) -> dict[str, Any]:
    """Quantize within ``settings.max_accuracy_drop`` of the fp32 ONNX into ``out_path``.

    The report is named after ``report_for`` (default ``out_path``; the final artifact path when
    ``out_path`` is a temporary file): ``<stem>.calib.json`` / ``.txt`` on success (unless
    ``write_report`` is False, for a caller that writes it with :func:`write_reports` once the model is
    in place). When the budget cannot be met it writes ``<stem>.calib.failed.json`` / ``.txt`` — never
    over the report of an int8 model already there — and raises :class:`ExportError` without writing
    ``out_path``."""
    out = Path(out_path)
    if reader is None:
        reader = CalibrationReader.from_bundle(bundle, settings.images, settings.seed, settings.batch_size)
    metric_name = headline(bundle, {"top1": 0.0, "map": 0.0})[0]

    def evaluate_file(path: Path) -> float:
        with OrtFileBackend(path, bundle.manifest, precision="int8") as backend:
            return headline(bundle, evaluate(bundle, backend, "val", settings.eval_limit))[1]

    if baseline is None:
        baseline = evaluate_file(Path(fp32_path))
    root = Path(cache_root) if cache_root else bundle.root / ".cache" / "calib"
    outcome = calibrate(fp32_path, out, reader=reader, evaluate=evaluate_file, baseline=baseline,
                        settings=settings, cache_root=root, metric_name=metric_name)
    report = outcome.report
    report["model"] = {"fp32": str(Path(fp32_path).name), "int8": out.name}
    if outcome.result.within_budget:
        report["latency_ms_ort_cpu"] = measure_latency(bundle, Path(fp32_path), out, reader)
    final = Path(report_for) if report_for is not None else out
    report["model"]["int8"] = final.name
    if not outcome.result.within_budget:
        txt_path = write_reports(report, final, failed=True)
        raise ExportError(
            f"int8: cannot meet --max-accuracy-drop {settings.max_accuracy_drop}: the best int8 model "
            f"({report['method']}, {len(report['excluded_layers'])} of {report['weighted_layers']} layers in "
            f"float) has {metric_name} {report['int8']:.2f} vs fp32 {report['fp32']:.2f}; see {txt_path}. "
            f"{final.name} was not written"
        )
    if write_report:
        write_reports(report, final)
    return report


def write_reports(report: dict[str, Any], final: Path, *, failed: bool = False) -> Path:
    """Write the JSON and text report for the int8 model ``final``; returns the text report's path."""
    json_path, txt_path = report_paths(final, failed=failed)
    atomic_write_json(json_path, report)
    atomic_write_text(txt_path, format_report(report))
    log.info("calibration report: %s", txt_path)
    return txt_path


def report_paths(out: Path, *, failed: bool = False) -> tuple[Path, Path]:
    stem = out.name.removesuffix(".onnx") + (".calib.failed" if failed else ".calib")
    return out.with_name(f"{stem}.json"), out.with_name(f"{stem}.txt")


def measure_latency(bundle: Bundle, fp32: Path, int8: Path,
                    reader: CalibrationReader) -> dict[str, dict[str, float]]:
    """Median ONNX Runtime CPU latency (ms) of both graphs at batch 1 and 8, on calibration images."""
    out: dict[str, dict[str, float]] = {}
    example = reader.images[:8]
    for name, path in (("fp32", fp32), ("int8", int8)):
        with OrtFileBackend(path, bundle.manifest, precision=name) as backend:
            out[name] = {f"b{b}": latency_ms(backend, example, b) for b in LATENCY_BATCHES}
    return out


def format_report(r: dict[str, Any]) -> str:
    """The calibration report as text a person reads."""
    m = r["metric"]
    lines = [
        f"INT8 calibration report ({r.get('format', '')})",
        f"  method            {r['method']}  (tried: "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["methods_tried"].items()) + ")",
        f"  calibration data  {r['images']} images from the {r['calibration_data'].get('split', 'train')} "
        f"split of {r['calibration_data'].get('data', '?')}, seed {r['calibration_data'].get('seed', '?')}",
        f"  {m:<17} fp32 {r['fp32']:.2f}  int8 {r['int8']:.2f}  drop {r['drop']:.2f} "
        f"(budget {r['max_accuracy_drop']:.2f}) -> "
        f"{'within budget' if r['within_budget'] else 'OVER BUDGET'}",
        f"  float layers      {len(r['excluded_layers'])} of {r['weighted_layers']}"
        + (": " + ", ".join(r["excluded_layers"]) if r["excluded_layers"] else ""),
    ]
    if r.get("sensitivity"):
        top = r["sensitivity"][:8]
        lines.append("  most sensitive    " + ", ".join(f"{s['layer']} ({s['gain']:+.2f})" for s in top))
    lat = r.get("latency_ms_ort_cpu")
    if lat:
        for b in sorted({k for v in lat.values() for k in v}):
            f, i = lat["fp32"][b], lat["int8"][b]
            lines.append(f"  ORT CPU batch {b[1:]:<3} fp32 {f:.3f} ms  int8 {i:.3f} ms  ({f / i:.2f}x)")
    c = r.get("cache", {})
    lines.append(f"  cache             {c.get('dir')} (calibrated now: "
                 f"{', '.join(c.get('calibrated_now') or []) or 'none'}; trials reused "
                 f"{c.get('trial_hits', 0)}, measured {c.get('trial_misses', 0)})")
    return "\n".join(lines) + "\n"
