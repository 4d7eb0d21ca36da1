"""torch2onnx + verification on the digits bundle: one file, dynamic batch, verified, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kiln.bundle import Bundle
from kiln.cli import main
from kiln.errors import ExportError
from kiln.fsutil import sha256_file


@torch.library.custom_op("kilntest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Odd(torch.nn.Module):
    """A model calling an operator the ONNX exporter cannot translate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(x).flatten(1)[:, :10]


def test_fp32_export_is_verified_single_file_with_dynamic_batch(exported: Path) -> None:
    bundle = Bundle.load(exported)
    art = bundle.manifest.artifacts["model.onnx"]
    assert art.format == "onnx" and art.precision == "fp32"
    extra = art.model_dump()
    assert extra["verification"]["passed"] is True
    assert extra["verification"]["max_abs_diff"] <= 1e-4
    assert extra["verification"]["images"] > 0
    assert art.metrics["top1"] > 80.0
    assert not list(exported.glob("*.data"))  # weights are inside the one .onnx file
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        (out,) = sess.run(None, {"images": np.zeros((n, 1, 28, 28), np.float32)})
        assert out.shape == (n, 10)


def test_fp16_variant_keeps_fp32_io_and_records_accuracy(exported: Path) -> None:
    bundle = Bundle.load(exported)
    art = bundle.manifest.artifacts["model.fp16.onnx"]
    assert art.precision == "fp16"
    fp32 = bundle.manifest.artifacts["model.onnx"].metrics["top1"]
    assert abs(art.metrics["top1"] - fp32) <= 1.0
    assert art.model_dump()["verification"]["top1_agreement"] >= 98.0
    model = onnx.load(str(exported / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_failed_verification_keeps_previous_artifacts(exported: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.export import verify
    from kiln.export.pipeline import ExportOptions, export_bundle

    before = {p.name: sha256_file(p) for p in exported.iterdir() if p.is_file()}
    # New weights, so a new export would differ from the file on disk...
    state = torch.load(exported / "model.pt", weights_only=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, exported / "model.pt")
    before["model.pt"] = sha256_file(exported / "model.pt")
    # ...and an ONNX graph whose logits are all 1 off, so verification fails.
    real = verify.backend_outputs
    monkeypatch.setattr(verify, "backend_outputs",
                        lambda *a, **k: {n: v + 1.0 for n, v in real(*a, **k).items()})
    with pytest.raises(ExportError, match="verification failed"):
        export_bundle(exported, ExportOptions(precisions=["fp32"]))
    after = {p.name: sha256_file(p) for p in exported.iterdir() if p.is_file()}
    assert after == before  # model.onnx and kiln.json untouched, no temp file left behind


def test_json_summary_on_stdout(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(exported), "--precision", "fp32", "--json", "--no-simplify"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    (art,) = summary["artifacts"]
    assert art["precision"] == "fp32" and art["path"].endswith("model.onnx")
    assert art["verification"]["passed"] is True and "top1" in art["metrics"]
    assert "model.onnx" in err  # the human summary goes to stderr


def test_unsupported_operator_names_node_and_op(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.bundle import BatchRange
    from kiln.export.torch2onnx import torch2onnx

    monkeypatch.setattr("kiln.models.load_model", lambda bundle: Odd().eval())
    with pytest.raises(ExportError) as info:
        torch2onnx(Bundle.load(bundle_copy), bundle_copy / "x.onnx", batch=BatchRange())
    msg = str(info.value)
    assert "unsupported operator" in msg and "mystery" in msg and "node 'mystery'" in msg
    assert "\n" not in msg
