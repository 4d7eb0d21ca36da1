"""load(): fallback order with logged reasons, unknown names, missing precisions, sha256 checks,
open_artifact and available_backends."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import Bundle
from kiln.errors import BackendUnavailable, BundleError, ConfigError
from kiln.runtime import BACKENDS, available_backends, cuda, load, open_artifact

pytestmark = pytest.mark.skipif(cuda.device_count() > 0, reason="fallback expectations assume no GPU")


def _add_fake_engine(root: Path, precision: str = "fp16") -> None:
    """An engine entry as export writes it (the bytes do not matter: it is skipped before opening)."""
    (root / f"model.{precision}.engine").write_bytes(b"not a real plan")
    b = Bundle.load(root)
    b.add_artifact(
        f"model.{precision}.engine", "tensorrt", precision, tensorrt_version="10.13.0.35",
        gpu_name="NVIDIA L4",
        compute_capability="8.9", profile={"min": 1, "opt": 4, "max": 8}, hardware_compat=False,
        version_compat=False,
    )
    b.save()


def test_table_order() -> None:
    assert list(BACKENDS) == ["tensorrt", "onnxrt", "torch"]


def test_auto_picks_onnxrt_on_cpu_and_says_why(lenet_bundle: Path, images: np.ndarray, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="kiln.runtime")
    with load(lenet_bundle) as b:
        assert (b.name, b.device, b.precision, b.artifact) == ("onnxrt", "cpu", "fp32", "model.onnx")
        assert b.fallback_log == ["tensorrt: the bundle has no TensorRT engine (it has: onnx fp32, torch "
                                  "fp32)"]
        assert b.describe()["skipped"] == b.fallback_log
        assert b.infer({"images": images})["logits"].shape == (3, 10)
    messages = [r.getMessage() for r in caplog.records if r.name == "kiln.runtime"]
    assert any("skipping tensorrt" in m and "no TensorRT engine" in m for m in messages)
    assert any("runs onnxrt" in m for m in messages)
    # A bundle that never had an engine is not worth a warning on every start.
    skips = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert skips and all(r.levelno == logging.DEBUG for r in skips)


def test_auto_skips_an_engine_when_tensorrt_is_missing(lenet_bundle: Path, caplog) -> None:
    _add_fake_engine(lenet_bundle)
    caplog.set_level(logging.INFO, logger="kiln.runtime")
    with load(lenet_bundle) as b:
        assert b.name == "onnxrt"
        assert len(b.fallback_log) == 1
        assert b.fallback_log[0].startswith("tensorrt: TensorRT is not installed")
        assert "pip install '.[trt]' in the kiln checkout" in b.fallback_log[0]
    # An engine that exists but cannot run here is worth a warning.
    skips = [r for r in caplog.records if "skipping tensorrt" in r.getMessage()]
    assert skips and all(r.levelno == logging.WARNING for r in skips)


def test_auto_falls_back_to_torch_without_onnx(lenet_bundle: Path, images: np.ndarray) -> None:
    b = Bundle.load(lenet_bundle)
    del b.manifest.artifacts["model.onnx"]
    b.save()
    with load(lenet_bundle) as backend:
        assert (backend.name, backend.artifact) == ("torch", "model.pt")
        assert [s.split(":")[0] for s in backend.fallback_log] == ["tensorrt", "onnxrt"]
        assert "no fp32 ONNX model" in backend.fallback_log[1]
        assert backend.infer({"images": images})["logits"].shape == (3, 10)


def test_unknown_backend_lists_known_ones(lenet_master: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'onnx'. Valid: auto, onnxrt, tensorrt, torch"):
        load(lenet_master, "onnx")
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        load(lenet_master, precision="fp8")
    with pytest.raises(ConfigError, match="unknown option"):
        load(lenet_master, warp_speed=True)


def test_missing_precision_lists_what_the_bundle_has(lenet_master: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        load(lenet_master, precision="int8")
    msg = str(info.value)
    assert "no backend can run int8" in msg
    assert "no int8 ONNX model" in msg and "torch runs fp32, fp16, bf16" in msg
    assert "model.onnx (onnx fp32)" in msg and "model.pt (torch fp32)" in msg
    with pytest.raises(BackendUnavailable, match=r"no fp16 ONNX model \(it has: onnx fp32, torch fp32\)"):
        load(lenet_master, "onnxrt", precision="fp16")


def test_explicit_tensorrt_says_what_to_install(lenet_bundle: Path) -> None:
    with pytest.raises(BackendUnavailable,
                       match="no backend can run .*tensorrt: the bundle has no TensorRT engine"):
        load(lenet_bundle, "tensorrt")
    _add_fake_engine(lenet_bundle)
    with pytest.raises(BackendUnavailable,
                       match=r"pip install '\.\[trt\]' in the kiln checkout on a machine with an NVIDIA GPU"):
        load(lenet_bundle, "tensorrt")
    with pytest.raises(BackendUnavailable, match=r"pip install '\.\[trt\]' in the kiln checkout"):
        open_artifact(lenet_bundle, "model.fp16.engine")


def test_sha256_mismatch_is_refused(lenet_bundle: Path) -> None:
    with open(lenet_bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="does not match its sha256"):
        load(lenet_bundle)
    with pytest.raises(BundleError, match="does not match its sha256"):
        open_artifact(lenet_bundle, "model.onnx")
    (lenet_bundle / "model.pt").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="model.pt .*does not match its sha256"):
        load(lenet_bundle, "torch")


def test_open_artifact(lenet_master: Path, images: np.ndarray) -> None:
    with open_artifact(lenet_master, "model.onnx", device="cpu") as b:
        assert (b.name, b.artifact) == ("onnxrt", "model.onnx")
        ref = b.infer({"images": images})["logits"]
    art = Bundle.load(lenet_master).manifest.artifacts["model.pt"]
    with open_artifact(lenet_master, art) as b:
        assert b.name == "torch"
        np.testing.assert_allclose(b.infer({"images": images})["logits"], ref, atol=1e-4)
    with pytest.raises(BundleError,
                       match=r"model.int8.onnx is not an artifact .*lists: model.onnx, model.pt"):
        open_artifact(lenet_master, "model.int8.onnx")


def test_available_backends() -> None:
    info = available_backends()
    assert set(info) == {"tensorrt", "onnxrt", "torch"}
    assert info["onnxrt"]["available"] is True and "CPUExecutionProvider" in info["onnxrt"]["providers"]
    assert info["torch"]["available"] is True
    assert info["tensorrt"]["available"] is False and "'.[trt]'" in info["tensorrt"]["reason"]
    assert info["tensorrt"]["gpus"] == []
