"""INT8 calibration with onnxruntime on the digits bundle: Q/DQ form, budget paths, cache, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kiln.bundle import Bundle
from kiln.calib.data import CalibrationReader
from kiln.calib.quantize import CalibSettings, calibrate, weighted_layers
from kiln.calib.run import calibrate_bundle
from kiln.cli import main
from kiln.errors import ExportError
from kiln.fsutil import sha256_file


def reader_for(bundle: Bundle, n: int = 32, seed: int = 0) -> CalibrationReader:
    return CalibrationReader.from_bundle(bundle, n, seed)


def quantized_layers(path: Path) -> set[str]:
    """Weighted nodes whose weight comes through a DequantizeLinear (i.e. run in int8)."""
    model = onnx.load(str(path))
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
            and n.input[1] in dq_out}


def test_int8_is_symmetric_per_channel_qdq(fp32_bundle: Path) -> None:
    bundle = Bundle.load(fp32_bundle)
    out = fp32_bundle / "model.int8.onnx"
    report = calibrate_bundle(bundle, fp32_bundle / "model.onnx", out,
                              CalibSettings(method="minmax", images=32, max_accuracy_drop=2.0))
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
           and len(n.input) > 2 and n.input[2] in inits]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # symmetric: zero point 0
    assert any(inits[n.input[1]].size > 1 for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[1] in inits)  # per-channel weight scales
    assert report["images"] == 32 and report["method"] == "minmax"
    assert set(report["latency_ms_ort_cpu"]) == {"fp32", "int8"}
    text = (fp32_bundle / "model.int8.calib.txt").read_text()
    assert "minmax" in text and "32 images" in text
    saved = json.loads((fp32_bundle / "model.int8.calib.json").read_text())
    # lenet5 on digits loses well under 2 points
    assert saved["within_budget"] is True and saved["drop"] <= 2.0


def test_fake_evaluator_forces_sensitivity_search(fp32_bundle: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(fp32_bundle)
    fp32 = fp32_bundle / "model.onnx"
    from kiln.calib.quantize import prepare

    prepare(fp32, tmp_path / "prep.onnx")
    first, *_ = weighted_layers(tmp_path / "prep.onnx")

    def evaluate(path: Path) -> float:  # only keeping the first layer in float is good enough
        return 90.0 if first in quantized_layers(path) else 94.5

    out = tmp_path / "int8.onnx"
    outcome = calibrate(fp32, out, reader=reader_for(bundle), evaluate=evaluate, baseline=95.0,
                        settings=CalibSettings(method="minmax", images=32), cache_root=tmp_path / "cache")
    assert outcome.result.within_budget and outcome.result.excluded == (first,)
    assert outcome.report["sensitivity"][0]["layer"] == first
    assert first not in quantized_layers(out) and quantized_layers(out)


def test_budget_that_cannot_be_met_writes_report_not_model(fp32_bundle: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.load(fp32_bundle)
    import kiln.calib.run as run

    monkeypatch.setattr(run, "evaluate",
                        lambda b, backend, split="val", limit=None: {"top1": 50.0, "top5": 60.0})
    good_report = fp32_bundle / "model.int8.calib.json"  # the report of an int8 model exported earlier
    good_report.write_text('{"within_budget": true}')
    with pytest.raises(ExportError, match="cannot meet --max-accuracy-drop"):
        calibrate_bundle(bundle, fp32_bundle / "model.onnx", fp32_bundle / "model.int8.onnx",
                         CalibSettings(method="minmax", images=16), baseline=95.0)
    assert not (fp32_bundle / "model.int8.onnx").exists()
    assert good_report.read_text() == '{"within_budget": true}'
    good_report.unlink()
    report = json.loads((fp32_bundle / "model.int8.calib.failed.json").read_text())
    assert report["within_budget"] is False and len(report["sensitivity"]) == report["weighted_layers"]
    assert (fp32_bundle / "model.int8.calib.failed.txt").is_file()


def test_cache_hit_and_miss(fp32_bundle: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(fp32_bundle)
    fp32 = fp32_bundle / "model.onnx"
    cache = tmp_path / "cache"
    # the fake evaluator loses nothing
    settings = CalibSettings(method="minmax", images=32, max_accuracy_drop=0.0)
    evaluations: list[Path] = []

    def evaluate(path: Path) -> float:
        evaluations.append(path)
        return 95.0

    def run(model: Path, reader: CalibrationReader) -> dict:
        return calibrate(model, tmp_path / "out.onnx", reader=reader, evaluate=evaluate, baseline=95.0,
                         settings=settings, cache_root=cache).report

    first = run(fp32, reader_for(bundle))
    assert first["cache"]["calibrated_now"] == ["minmax"] and len(evaluations) == 1
    digest = sha256_file(tmp_path / "out.onnx")

    again = reader_for(bundle)
    hit = run(fp32, again)
    assert hit["cache"]["calibrated_now"] == [] and again.batches_served == 0  # no calibration inference
    assert len(evaluations) == 1 and hit["cache"]["key"] == first["cache"]["key"]
    assert sha256_file(tmp_path / "out.onnx") == digest

    other_data = reader_for(bundle, seed=1)
    miss = run(fp32, other_data)
    assert miss["cache"]["calibrated_now"] == ["minmax"] and other_data.batches_served > 0

    model = onnx.load(str(fp32))  # same graph, changed weights
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    miss2 = run(changed, reader_for(bundle))
    assert miss2["cache"]["calibrated_now"] == ["minmax"]
    assert len({first["cache"]["key"], miss["cache"]["key"], miss2["cache"]["key"]}) == 3


def test_reader_is_reiterable_and_rejects_empty_data(fp32_bundle: Path) -> None:
    reader = reader_for(Bundle.load(fp32_bundle), n=20)
    first = [b["images"].shape[0] for b in reader]
    assert first == [16, 4] and [b["images"].shape[0] for b in reader] == first
    served = []
    while (batch := reader.get_next()) is not None:
        served.append(len(batch["images"]))
    assert served == first and reader.get_next() is not None  # rewound for the next method
    with pytest.raises(ExportError, match="at least one image"):
        CalibrationReader("images", np.zeros((0, 1, 28, 28), np.float32))


def test_unreadable_calibration_images_fail_in_one_line(fp32_bundle: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    data = tmp_path / "imgs"
    for c in range(10):
        (data / str(c)).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 16 * i).save(data / str(c) / f"{i}.png")
    (data / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest = json.loads((fp32_bundle / "kiln.json").read_text())
    manifest["training"]["data"] = f"folder:{data}"
    (fp32_bundle / "kiln.json").write_text(json.dumps(manifest))
    before = {p.name: sha256_file(p) for p in fp32_bundle.iterdir() if p.is_file()}
    assert main(["calibrate", str(fp32_bundle), "--calib-images", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.png" in err and len(err.splitlines()) == 1
    assert {p.name: sha256_file(p) for p in fp32_bundle.iterdir() if p.is_file()} == before


def test_cpu_layout_is_integer_kernels_for_onnxruntime(fp32_bundle: Path) -> None:
    """--int8-layout cpu: uint8 activations, Q/DQ around the weighted layers' outputs too, int32 bias —
    the form ONNX Runtime's CPU provider fuses into integer kernels — within the same accuracy budget."""
    import onnxruntime as ort

    bundle = Bundle.load(fp32_bundle)
    out = fp32_bundle / "model.int8.onnx"
    report = calibrate_bundle(bundle, fp32_bundle / "model.onnx", out,
                              CalibSettings(method="minmax", images=32, max_accuracy_drop=2.0, layout="cpu"))
    assert report["layout"] == "cpu" and "uint8 activations" in report["format"]
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    act_zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"
               and n.input[2] in inits]
    assert act_zps and all(z.dtype == np.uint8 for z in act_zps)
    q_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert weighted and all(n.output[0] in q_inputs for n in weighted)  # outputs quantized as well
    assert any(inits[n.input[0]].dtype == np.int32 for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits)  # int32 bias
    assert report["within_budget"] and report["drop"] <= 2.0
    # ONNX Runtime fuses it into integer kernels: the optimized graph runs QLinearConv, not Conv.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(fp32_bundle / "optimized.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(fp32_bundle / "optimized.onnx")).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops


def test_cpu_layout_has_its_own_cache_and_is_recorded(fp32_bundle: Path) -> None:
    a = CalibSettings(method="minmax", images=8)
    b = CalibSettings(method="minmax", images=8, layout="cpu")
    from kiln.calib.quantize import CalibCache

    assert CalibCache(fp32_bundle / "c", "m", "d", a).key != CalibCache(fp32_bundle / "c", "m", "d", b).key
    with pytest.raises(Exception, match="--int8-layout"):
        CalibSettings(layout="gpu")


def test_cpu_layout_refused_with_an_engine_before_any_work(fp32_bundle: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in fp32_bundle.iterdir())
    code = main(["export", str(fp32_bundle), "--precision", "int8", "--int8-layout", "cpu", "--engine"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--int8-layout cpu" in err and "TensorRT" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in fp32_bundle.iterdir()) == before
