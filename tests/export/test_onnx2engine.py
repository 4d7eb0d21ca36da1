"""onnx2engine: clear errors where TensorRT or a GPU is missing (runs everywhere), and on a GPU with
TensorRT (marked trt/gpu): fp32 / fp16 / int8 engines for lenet5 and kiln-det-s compared with ONNX
Runtime on the same graph, provenance in kiln.json, load() choosing the engine, timing cache reuse."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess
from kiln.errors import BackendUnavailable, ConfigError
from kiln.export import onnx2engine as onnx2engine_module
from kiln.export.onnx2engine import onnx2engine
from kiln.runtime import cuda, load
from kiln.runtime.tensorrt import engine_compatible, unavailable_reason

BATCH = BatchRange(min=1, opt=2, max=4)


def test_engine_compatible_is_the_runtime_rule() -> None:
    assert onnx2engine_module.engine_compatible is engine_compatible


def test_bad_arguments_fail_before_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown precision 'fp8'. Valid: fp32, fp16, int8"):
        onnx2engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp8", batch=BATCH, input_name="images")
    with pytest.raises(ConfigError, match="workspace must be > 0"):
        onnx2engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp32", batch=BATCH, input_name="images",
                    workspace_gib=0)


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are present")
def test_without_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    engine = tmp_path / "m.engine"
    with pytest.raises(BackendUnavailable, match=r"pip install 'kiln\[trt\]' on a machine with an NVIDIA GPU|needs an NVIDIA GPU"):
        onnx2engine(tmp_path / "m.onnx", engine, precision="fp32", batch=BATCH, input_name="images")
    assert not engine.exists()


# ---- with TensorRT and a GPU -------------------------------------------------------------------


@pytest.fixture
def trt_gpu() -> Any:
    """Skip unless the real TensorRT and a GPU are here (tensorrt-stubs alone imports as an empty
    namespace package, so importorskip is not enough)."""
    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "Builder"):
        pytest.skip("only tensorrt-stubs is installed, not TensorRT")
    if cuda.device_count() == 0:
        pytest.skip(f"no CUDA GPU: {cuda.no_gpu_reason()}")
    return trt


def _detector_bundle(root: Path) -> Path:
    import torch

    from kiln.train.models import build_model
    from kiln.train.tasks import make_task

    arch = Architecture(name="kiln-det-s", args={"num_classes": 3, "in_channels": 3, "image_size": 256})
    try:
        model = build_model(arch).eval()
        task = make_task("detect", 3)
    except (ImportError, KeyError, ValueError, ConfigError) as exc:
        pytest.skip(f"kiln-det-s is not available yet: {exc}")
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / "model.pt")
    manifest = Manifest(
        kiln_version="test", task="detect", classes=["a", "b", "c"],
        input=InputSpec(name="images", shape=[3, 256, 256], batch=BATCH),
        outputs=task.outputs(model, 3), postprocess=task.postprocess(),
        preprocess=Preprocess(mode="letterbox", size=(256, 256), mean=[0.5] * 3, std=[0.25] * 3), architecture=arch,
    )
    b = Bundle(root, manifest)
    b.add_artifact("model.pt", "torch", "fp32")
    b.save()
    return root


def _onnx_variants(bundle: Bundle, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _RandomReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, name: str, shape: list[int]) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{name: rng.standard_normal((2, *shape)).astype(np.float32)} for _ in range(8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    from kiln.export.onnx2fp16 import onnx2fp16
    from kiln.export.torch2onnx import torch2onnx

    paths = {"fp32": bundle.path("model.onnx"), "fp16": bundle.path("model.fp16.onnx"), "int8": bundle.path("model.int8.onnx")}
    torch2onnx(bundle, paths["fp32"], batch=BATCH)
    onnx2fp16(paths["fp32"], paths["fp16"])
    quantize_static(
        str(paths["fp32"]), str(paths["int8"]), _RandomReader(bundle.manifest.input.name, bundle.manifest.input.shape),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
        calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    for precision, path in paths.items():
        bundle.add_artifact(path.name, "onnx", precision)
    bundle.save()
    return paths


TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2, "int8": 0.15}  # of the largest |output|; TF32 is on for fp32


# A mark, not only the fixture: session fixtures (the trained digits bundle) are set up before a
# function fixture could skip.
_WHY_NOT = unavailable_reason()


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"needs TensorRT and a GPU: {_WHY_NOT}")
@pytest.mark.parametrize("model", ["lenet5", "kiln-det-s"])
def test_engines_match_onnxruntime(trt_gpu: Any, model: str, digits_bundle: Path, tmp_path: Path) -> None:
    if model == "lenet5":
        root = Path(shutil.copytree(digits_bundle, tmp_path / "b", ignore=shutil.ignore_patterns(".cache")))
    else:
        root = _detector_bundle(tmp_path / "b")
    bundle = Bundle.load(root)
    onnx_paths = _onnx_variants(bundle, tmp_path)
    spec = bundle.manifest.input
    x = np.random.default_rng(1).standard_normal((3, *spec.shape)).astype(np.float32)
    cache = tmp_path / "timing.cache"
    for precision, onnx_path in onnx_paths.items():
        engine = root / f"model.{precision}.engine"
        prov = onnx2engine(onnx_path, engine, precision=precision, batch=BATCH, input_name=spec.name, timing_cache=cache)
        assert prov["tensorrt_version"] == trt_gpu.__version__ and prov["precision"] == precision
        assert prov["profile"] == {"min": 1, "opt": 2, "max": 4} and prov["compute_capability"]
        assert cache.stat().st_size > 0
        bundle.add_artifact(engine.name, "tensorrt", **prov)
        bundle.save()
        assert engine_compatible(prov) == (True, engine_compatible(prov)[1])
        with load(root, "tensorrt", precision=precision) as trt_b, load(root, "onnxrt", precision=precision) as ort_b:
            assert (trt_b.min_batch, trt_b.max_batch) == (1, 4)
            got, want = trt_b.infer({spec.name: x}), ort_b.infer({spec.name: x})
            assert set(trt_b.last_timings) == {"h2d_ms", "compute_ms", "d2h_ms", "total_ms"}
            assert trt_b.last_timings["compute_ms"] > 0
        for name, ref in want.items():
            scale = max(1.0, float(np.abs(ref).max()))
            assert got[name].shape == ref.shape and got[name].dtype == ref.dtype
            assert float(np.abs(got[name] - ref).max()) <= TOLERANCE[precision] * scale, (precision, name)
    with load(root) as auto:  # with engines for this GPU, auto picks TensorRT (fp16 first)
        assert (auto.name, auto.precision, auto.fallback_log) == ("tensorrt", "fp16", [])
