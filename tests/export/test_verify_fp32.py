"""fp32 export verification end to end over fakes of the data, the PyTorch model and the ONNX session: the
first validation images in order, outputs run in batches and named as kiln.json names them, the ONNX
file and manifest the session is opened with, what the report records, and the error and log texts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kiln import models
from kiln.bundle import Bundle
from kiln.errors import ExportError
from kiln.export import verify
from kiln.processing import preprocess

from .test_verify_thresholds import classify_bundle, detect_bundle


class Split:
    """A validation split of ``n`` 28x28 grey images, image i filled with the value 10 * i (mod 256)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(np.full((28, 28), (10 * i) % 256, dtype=np.uint8), mode="L")


class Model(torch.nn.Module):
    """Logits: the image mean at class 0, each call's batch size at class 1, zeros elsewhere."""

    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        self.returns = returns
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> Any:
        self.calls.append(len(x))
        logits = torch.zeros((len(x), 10), dtype=torch.float64)
        logits[:, 0] = x.double().mean(dim=(1, 2, 3))
        logits[:, 1] = len(x)
        if self.returns == "dict":
            return {"logits": logits}
        if self.returns == "tuple":
            return (logits,)
        if self.returns == "two":
            return (logits, logits)
        return logits


class Spec:
    def __init__(self, name: str) -> None:
        self.name = name


class Backend:
    """The ONNX session: records how it was opened and the batches it ran; answers like ``Model``."""

    opened: list[tuple[Any, Any]] = []

    def __init__(self, path: Any, manifest: Any) -> None:
        Backend.opened.append((path, manifest))
        self.inputs = [Spec("images")]
        self.batches: list[tuple[int, bool]] = []

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *_: Any) -> None: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["images"]
        self.batches.append((len(x), x.flags["C_CONTIGUOUS"]))
        logits = np.zeros((len(x), 10))
        logits[:, 0] = x.astype(np.float64).mean(axis=(1, 2, 3))
        logits[:, 1] = len(x)
        return {"logits": logits}


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Model:
    model = Model()
    Backend.opened = []
    monkeypatch.setattr(verify, "bundle_split", lambda _b, split: Split(5) if split == "val" else Split(0))
    monkeypatch.setattr(models, "load_model", lambda _b: model)
    monkeypatch.setattr(verify, "OrtFileBackend", Backend)
    return model


def test_verification_images_are_the_first_validation_images(tmp_path: Path, fakes: Model) -> None:
    bundle = classify_bundle(tmp_path / "b")
    x, boxes = verify.verification_images(bundle, 3)
    expected, _ = preprocess([Split(5).image(i) for i in range(3)], bundle.manifest.preprocess)
    np.testing.assert_array_equal(x, expected)
    assert len(boxes) == 3
    assert len(verify.verification_images(bundle, 64)[0]) == 5
    assert len(verify.verification_images(bundle)[0]) == 5


def test_an_empty_validation_split_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "bundle_split", lambda _b, _s: Split(0))
    with pytest.raises(ExportError, match="^verification: the validation split has no images$"):
        verify.verification_images(classify_bundle(tmp_path / "b"), 8)


@pytest.mark.parametrize("returns", ["tensor", "dict", "tuple"])
def test_torch_outputs_in_batches_in_order(tmp_path: Path, fakes: Model, returns: str) -> None:
    fakes.returns = returns
    x = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)
    out = verify.torch_outputs(classify_bundle(tmp_path / "b"), x, batch=2)
    assert list(out) == ["logits"] and out["logits"].dtype == np.float32
    np.testing.assert_array_equal(out["logits"][:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(out["logits"][:, 1], [2, 2, 2, 2, 1])
    assert fakes.calls == [2, 2, 1]
    verify.torch_outputs(classify_bundle(tmp_path / "c"), np.zeros((40, 1, 2, 2), np.float32))
    assert fakes.calls[3:] == [32, 8]


def test_a_model_returning_more_outputs_than_named_is_an_error(tmp_path: Path, fakes: Model) -> None:
    fakes.returns = "two"
    with pytest.raises(ExportError, match=r"the model returns 2 outputs but kiln.json names 1: \['logits'\]"):
        verify.torch_outputs(classify_bundle(tmp_path / "b"), np.zeros((1, 1, 2, 2), np.float32))


def test_a_single_tensor_for_a_model_with_two_named_outputs_is_refused(tmp_path: Path, fakes: Model) -> None:
    bundle = detect_bundle(tmp_path / "b")  # kiln.json names boxes and scores
    with pytest.raises(ValueError, match="zip"):
        verify.torch_outputs(bundle, np.zeros((1, 1, 2, 2), np.float32))


def test_backend_outputs_in_contiguous_batches_in_order(fakes: Model) -> None:
    backend = Backend("m.onnx", None)
    x = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 4), np.float32)
    out = verify.backend_outputs(backend, x[..., ::2], batch=2)
    assert list(out) == ["logits"] and out["logits"].dtype == np.float32
    np.testing.assert_array_equal(out["logits"][:, 0], [0, 1, 2, 3, 4])
    assert backend.batches == [(2, True), (2, True), (1, True)]
    verify.backend_outputs(backend, np.zeros((40, 1, 2, 2), np.float32))
    assert [n for n, _ in backend.batches[3:]] == [32, 8]


def test_verify_fp32_runs_both_graphs_on_the_first_images(tmp_path: Path, fakes: Model,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    bundle = classify_bundle(tmp_path / "b")
    onnx = tmp_path / "m.onnx"
    with caplog.at_level(logging.INFO, logger="kiln.export.verify"):
        report = verify.verify_fp32(bundle, onnx, count=3)
    assert Backend.opened == [(onnx, bundle.manifest)]
    assert fakes.calls == [3]
    assert report["images"] == 3 and report["passed"] is True and report["max_abs_diff"] == 0.0
    assert report["reference"] == "pytorch fp32 (cpu)"
    assert report["tolerance"] == {"atol": 1e-4, "rtol": 1e-5, "relative_to": "the image's largest |output|"}
    assert report["outputs"]["logits"]["passed"] and (report["top1_agreement"], report["topk_agreement"]) == (
        100,
        100,
    )
    assert ("verified fp32 ONNX against PyTorch on 3 val images: max abs diff 0 (0 of the outputs' scale; "
            "top-1 agreement 100%, top-5 100%)") in caplog.messages


def test_verify_fp32_uses_64_images_by_default(tmp_path: Path, fakes: Model,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "bundle_split", lambda _b, _s: Split(70))
    assert verify.verify_fp32(classify_bundle(tmp_path / "b"), tmp_path / "m.onnx")["images"] == 64


def fixed(monkeypatch: pytest.MonkeyPatch, reference: dict[str, np.ndarray],
          candidate: dict[str, np.ndarray]) -> None:
    from .test_verify_thresholds import fake_graphs

    fake_graphs(monkeypatch, reference, candidate, len(next(iter(reference.values()))))


def test_logits_differing_by_exactly_the_tolerance_pass(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's largest |logit| is 1: the tolerance is 1e-4 + 1e-5 x 1."""
    ref = np.zeros((2, 10))
    ref[:, 3] = 1.0
    cand = ref.copy()
    cand[1, 5] = 1e-4 + 1e-5 * 1.0
    fixed(monkeypatch, {"logits": ref}, {"logits": cand})
    assert verify.verify_fp32(classify_bundle(tmp_path / "b"), tmp_path / "m.onnx")["passed"] is True


def _dets(shift: float = 0.0, score: float = 0.8) -> dict[str, np.ndarray]:
    boxes = np.array([[[8.0, 8.0, 40.0, 40.0], [30.0, 30.0, 60.0, 60.0], [0.0, 0.0, 2.0, 2.0]]])
    boxes[0, 1] += shift
    return {"boxes": boxes, "scores": np.array([[[0.9, 0.1], [0.1, score], [0.01, 0.02]]])}


def test_detection_report_records_its_tolerances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed(monkeypatch, _dets(), _dets())
    report = verify.verify_fp32(detect_bundle(tmp_path / "b"), tmp_path / "m.onnx")
    assert report["passed"] is True and report["reference"] == "pytorch fp32 (cpu)"
    assert (report["tolerance_px"], report["score_tolerance"]) == (0.5, 1e-4)


def test_every_detection_problem_is_named_in_the_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fixed(monkeypatch, _dets(), _dets(shift=5.0, score=0.5))
    onnx = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        verify.verify_fp32(detect_bundle(tmp_path / "b"), onnx)
    assert str(info.value) == (
        f"verification failed for {onnx} on 1 validation images: raw boxes differ by up to 5 px > 0.5; "
        "raw scores differ by up to 0.3 > 0.0001; 1 detection(s) missing or moved > 0.5 px, 1 extra (of 2); "
        "previous artifacts are untouched")


def test_raw_differences_of_exactly_the_tolerances_are_no_problem(tmp_path: Path) -> None:
    bundle = detect_bundle(tmp_path / "b")
    report = {"max_abs_diff_by_output": {"boxes": 0.5, "scores": 1e-4}, "missing": 0, "extra": 0,
              "detections": 2}
    assert verify.detection_problems(bundle, report) == []
    report["max_abs_diff_by_output"] = {"boxes": 0.5000001, "scores": 1.000001e-4}
    assert len(verify.detection_problems(bundle, report)) == 2


def test_bundle_is_passed_to_each_step(tmp_path: Path, fakes: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(verify, "bundle_split", lambda b, _s: seen.append(b) or Split(2))
    monkeypatch.setattr(models, "load_model", lambda b: seen.append(b) or fakes)
    bundle = classify_bundle(tmp_path / "b")
    verify.verify_fp32(bundle, tmp_path / "m.onnx", count=2)
    assert seen == [bundle, bundle] and isinstance(seen[0], Bundle)
