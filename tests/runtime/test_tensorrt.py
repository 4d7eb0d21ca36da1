"""TensorRT backend and CUDA module parts that run without a GPU: what they say when TensorRT or a
GPU is missing, error-code checking, and the engine compatibility rules."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from kiln.bundle import TensorSpec
from kiln.errors import BackendUnavailable
from kiln.runtime import cuda
from kiln.runtime.tensorrt import TensorRTBackend, check_provenance, engine_compatible, unavailable_reason

GPU = cuda.DeviceInfo(0, "NVIDIA L4", "8.9", 24 << 30)
PROV = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
no_gpu = pytest.mark.skipif(cuda.device_count() > 0, reason="checks the no-GPU behaviour")


@pytest.mark.parametrize(
    ("prov", "version", "gpu", "ok", "reason"),
    [
        (PROV, "10.13.0.35", GPU, True, "engine built here"),
        (PROV, "10.13.2.6", GPU, False, "built with TensorRT 10.13.0.35, this is TensorRT 10.13.2.6"),
        ({**PROV, "version_compat": True}, "10.14.1.48", GPU, True, "built here"),
        ({**PROV, "version_compat": True}, "10.12.0.36", GPU, False, "cannot run on TensorRT 10.12.0.36"),
        ({**PROV, "version_compat": True}, "11.0.0.1", GPU, True, "built here"),
        (PROV, "11.0.0.1", GPU, False, "built with TensorRT 10.13.0.35, this is TensorRT 11.0.0.1"),
        ({**PROV, "tensorrt_version": "11.1.0.106", "version_compat": True}, "10.16.1.11", GPU, False,
         "cannot run on TensorRT 10"),
        ({**PROV, "tensorrt_version": "11.1.0.106", "version_compat": True}, "11.4.0.106", GPU, True,
         "built here"),
        (PROV, "10.13.0.35", cuda.DeviceInfo(0, "NVIDIA A100", "8.0", 0), False,
         "compute capability 8.9), this GPU is NVIDIA A100 (8.0)"),
        (PROV, "10.13.0.35", cuda.DeviceInfo(0, "NVIDIA RTX 4090", "8.9", 0), True,
         "same compute capability"),
        ({**PROV, "hardware_compat": True}, "10.13.0.35", cuda.DeviceInfo(0, "NVIDIA H100", "9.0", 0), True,
         "hardware-compatible"),
        ({**PROV, "hardware_compat": True}, "10.13.0.35", cuda.DeviceInfo(0, "Tesla T4", "7.5", 0), False,
         ">= 8.0"),
        ({"gpu_name": "x"}, "10.13.0.35", GPU, False, "missing tensorrt_version, compute_capability"),
    ],
    ids=["same", "other-version", "vc-newer", "vc-older", "vc-10-on-11", "10-on-11", "vc-11-on-10",
         "vc-11-newer", "other-cc", "same-cc", "hc-ok", "hc-old-gpu", "no-provenance"],
)
def test_check_provenance(prov, version: str, gpu: cuda.DeviceInfo, ok: bool, reason: str) -> None:
    got_ok, got_reason = check_provenance(prov, version, gpu)
    assert got_ok is ok
    assert reason in got_reason


def test_stub_only_tensorrt_is_not_tensorrt() -> None:
    # tensorrt-stubs makes `import tensorrt` succeed as an empty namespace package; that must not
    # count as TensorRT being installed.
    try:
        import tensorrt
    except ImportError:
        pytest.skip("no tensorrt package at all")
    if hasattr(tensorrt, "Builder"):
        pytest.skip("real TensorRT is installed")
    assert "only its type stubs" in (unavailable_reason() or "")


@no_gpu
def test_backend_without_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    ok, reason = engine_compatible(PROV)
    assert not ok and "pip install '.[trt]' in the kiln checkout on a machine with an NVIDIA GPU" in reason
    with pytest.raises(BackendUnavailable,
                       match=r"^tensorrt: .*pip install '\.\[trt\]' in the kiln checkout"):
        TensorRTBackend(tmp_path / "x.engine", inputs=[TensorSpec(name="images", shape=[1, 28, 28])],
                        outputs=[])
    with pytest.raises(BackendUnavailable, match="device cpu was requested"):
        TensorRTBackend(tmp_path / "x.engine", inputs=[], outputs=[], device="cpu")


@no_gpu
def test_cuda_without_a_gpu() -> None:
    assert cuda.library() == "cuda-python"
    assert cuda.device_count() == 0
    # Without a driver the runtime answers cudaErrorInsufficientDriver, which is reported as such.
    assert "cudaErrorInsufficientDriver" in (cuda.no_gpu_reason() or "")
    with pytest.raises(BackendUnavailable, match="no NVIDIA driver is loaded"):
        cuda.device_info(0)


def test_cuda_check_raises_on_error_codes() -> None:
    from cuda.bindings import runtime as cudart

    assert cuda.check((cudart.cudaError_t.cudaSuccess, 7)) == 7
    assert cuda.check((cudart.cudaError_t.cudaSuccess,)) is None
    with pytest.raises(cuda.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation: out of memory"):
        cuda.check((cudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    if cuda.device_count() == 0:
        # The real call: without a driver the runtime returns an error code, which check() raises.
        with pytest.raises(cuda.CudaError, match="cudaGetDeviceCount failed: cudaError"):
            cuda.check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")


@pytest.mark.parametrize("name", ["trt", "trt-cu12"])
def test_trt_extras_pin_one_cuda_major(name: str) -> None:
    # The bindings' CUDA major must be the one of the TensorRT wheel (and the driver): tensorrt-cuNN goes
    # with cuda-python >= NN, < NN+1; on CUDA 12, cuda.bindings.runtime exists from cuda-python 12.6.1.
    extra = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ][name]
    trt = [r for r in extra if r.startswith("tensorrt")]
    bindings = [r for r in extra if r.startswith("cuda-python")]
    assert len(trt) == 1 and len(bindings) == 1, extra
    major = re.fullmatch(r"tensorrt-cu(\d+)>=10\.[\d.]+,<12", trt[0])
    assert major, trt[0]
    low, high = re.fullmatch(r"cuda-python>=([\d.]+),<(\d+)", bindings[0]).groups()  # type: ignore[union-attr]
    assert int(high) == int(major[1]) + 1
    assert tuple(map(int, low.split("."))) >= ((12, 6, 1) if major[1] == "12" else (int(major[1]),))
