"""The TensorRT backend on fakes of TensorRT 10/11, cuda-python and pycuda (tests/runtime/fakes), so it
runs without a GPU while kiln's real CUDA adapters (``_CudaPython``, ``_PyCuda``) do the work.

The fake GPU runs queued copies and the network only when the stream is synchronized, and records any
free of memory that queued work still uses; the fake pycuda keeps a context stack per thread.
Real TensorRT is exercised by the `trt`/`gpu` tests in tests/export/test_onnx2engine.py.
"""

from __future__ import annotations

import threading
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.bundle import Bundle, TensorSpec
from kiln.errors import BackendUnavailable, BundleError, InputError
from kiln.runtime import BackendClosed, cuda, load
from kiln.runtime.tensorrt import TensorRTBackend

V10, V11 = "10.13.0.35", "11.4.0.106"
SPECS = {"inputs": [TensorSpec(name="images", shape=[1, 28, 28])],
         "outputs": [TensorSpec(name="logits", shape=[10])]}
BINDINGS = ["cuda-python", "pycuda"]


def _plan(tmp_path: Path, fakes: types.ModuleType, version: str = V10, name: str = "m.engine",
          **kw: Any) -> Path:
    path = tmp_path / name
    path.write_bytes(fakes.make_plan(version, **kw))
    return path


def _clean(env: Any) -> None:
    """Everything freed, nothing freed early, and (pycuda) no thread left with a context pushed."""
    assert env.gpu.memory == {} and env.gpu.pinned == {}
    assert env.gpu.violations == []
    if env.api.name == "pycuda":
        assert env.binding.leftover_contexts() == {}


@pytest.mark.parametrize("binding", BINDINGS)
def test_infer_copies_through_device_buffers(binding: str, fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path, images: np.ndarray) -> None:
    env = fakes.install(monkeypatch, binding=binding)
    plan = _plan(tmp_path, fakes)
    with TensorRTBackend(plan, **SPECS, precision="fp16") as b:
        assert (b.min_batch, b.max_batch, b.device, b.precision) == (1, 8, "cuda:0", "fp16")
        # One device and one pinned buffer per tensor, sized for the max batch (8).
        assert sorted(a.nbytes for a in env.gpu.memory.values()) == [8 * 10 * 4, 8 * 784 * 4]
        assert sorted(a.nbytes for a in env.gpu.pinned.values()) == [8 * 10 * 4, 8 * 784 * 4]
        out = b.infer({"images": images})["logits"]
        np.testing.assert_array_equal(out, 2 * images.reshape(3, -1)[:, :10])
        assert b.last_timings["total_ms"] > 0 and set(b.last_timings) == {
            "h2d_ms",
            "compute_ms",
            "d2h_ms",
            "total_ms",
        }
        kept = out.copy()
        small = b.infer({"images": images[:1] + 1})["logits"]
        np.testing.assert_array_equal(small, 2 * (images[:1] + 1).reshape(1, -1)[:, :10])
        np.testing.assert_array_equal(out, kept)  # the first result was not a view of the pinned buffer
        with pytest.raises(InputError, match=r"images \| received batch 9 \| expected a batch in \[1, 8\]"):
            b.infer({"images": np.zeros((9, 1, 28, 28), np.float32)})
        # A worker thread may run it; the device is made current there for each call.
        results: list[np.ndarray] = []
        t = threading.Thread(target=lambda: results.append(b.infer({"images": images})["logits"]))
        t.start()
        t.join()
        np.testing.assert_array_equal(results[0], kept)
    _clean(env)
    with pytest.raises(BackendClosed):
        b.infer({"images": images})


def test_pycuda_leaves_no_context_pushed_on_any_thread(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path,
                                                        images: np.ndarray) -> None:
    # pycuda aborts at exit when a thread's context stack is not empty: every push must be popped by
    # the thread that pushed it, including on a worker thread that then ends.
    env = fakes.install(monkeypatch, binding="pycuda")
    b = TensorRTBackend(_plan(tmp_path, fakes), **SPECS)
    assert env.binding.leftover_contexts() == {}
    worker = threading.Thread(target=b.infer, args=({"images": images},))
    worker.start()
    worker.join()
    assert env.binding.leftover_contexts() == {}
    b.close()
    _clean(env)


@pytest.mark.parametrize("binding", BINDINGS)
def test_failed_execute_waits_for_queued_copies_before_freeing(binding: str, fakes: Any,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path, images: np.ndarray) -> None:
    env = fakes.install(monkeypatch, binding=binding)
    b = TensorRTBackend(_plan(tmp_path, fakes), **SPECS)
    env.trt.execute_result = False  # host->device copies are queued, then execute_async_v3 fails
    with pytest.raises(cuda.CudaError, match="execute_async_v3 failed"):
        b.infer({"images": images})
    assert env.gpu.pending() == 0  # drained before the pinned input buffer can be reused
    env.trt.execute_result = True
    assert b.infer({"images": images})["logits"].shape == (3, 10)
    b.close()
    _clean(env)


def test_close_synchronizes_before_freeing(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    env = fakes.install(monkeypatch)
    b = TensorRTBackend(_plan(tmp_path, fakes), **SPECS)
    ran: list[bool] = []
    # Work still queued on the backend's stream when close() is called.
    env.gpu.enqueue(b._stream.handle, "execute", lambda: ran.append(True), uses=tuple(env.gpu.memory))
    b.close()
    assert ran == [True]
    _clean(env)


def test_stream_handle_without_deprecated_int(fakes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = fakes.install(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # int(cuda_obj) is deprecated in cuda-bindings
        with cuda.activate(0):
            stream = cuda.Stream()
    assert stream.handle in env.gpu.streams
    # Bindings without cuda.bindings.utils (before 12.9): int() is their API.
    env = fakes.install(monkeypatch, native_handle=False)
    with pytest.warns(DeprecationWarning), cuda.activate(0):
        assert cuda.Stream().handle in env.gpu.streams


def test_types_numpy_lacks(fakes: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                           images: np.ndarray) -> None:
    env = fakes.install(monkeypatch)
    with pytest.raises(TypeError):
        env.trt.nptype(env.trt.bfloat16)  # what the real binding does
    bf16 = _plan(tmp_path, fakes,
                 tensors=[("images", "INPUT", (-1, 1, 28, 28), "FLOAT"),
                          ("logits", "OUTPUT", (-1, 10), "BF16")])
    with pytest.raises(BackendUnavailable, match="tensor logits is BF16, which numpy cannot hold"):
        TensorRTBackend(bf16, **SPECS)
    _clean(env)
    # An output kiln.json does not list needs only device memory, sized from DataType.itemsize (0.5 for FP4).
    aux = _plan(tmp_path, fakes, name="aux.engine", tensors=[
        ("images", "INPUT", (-1, 1, 28, 28), "FLOAT"), ("logits", "OUTPUT", (-1, 10), "HALF"),
        ("aux", "OUTPUT", (-1, 7), "FP4")])
    with TensorRTBackend(aux, **SPECS) as b:
        assert sorted(a.nbytes for a in env.gpu.memory.values()) == [28, 8 * 10 * 2, 8 * 784 * 4]
        out = b.infer({"images": images})["logits"]
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, 2 * images.reshape(3, -1)[:, :10], rtol=1e-3)
    _clean(env)


def test_bf16_engine_falls_back(fakes: Any, monkeypatch: pytest.MonkeyPatch, lenet_bundle: Path) -> None:
    fakes.install(monkeypatch)
    _plan(lenet_bundle, fakes, name="model.fp32.engine",
          tensors=[("images", "INPUT", (-1, 1, 28, 28), "BF16"), ("logits", "OUTPUT", (-1, 10), "FLOAT")])
    _record(lenet_bundle, "model.fp32.engine", "fp32", V10)
    with load(lenet_bundle) as backend:
        assert backend.name == "onnxrt"
        assert "tensor images is BF16" in backend.fallback_log[0]


def _record(root: Path, file: str, precision: str, version: str, **extra: Any) -> None:
    b = Bundle.load(root)
    b.add_artifact(file, "tensorrt", precision, tensorrt_version=version, gpu_name="Fake GPU",
                   compute_capability="8.9", **extra)
    b.save()


def test_version_compatible_10_engine_runs_on_11(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                                 lenet_bundle: Path,
                                                 images: np.ndarray) -> None:
    fakes.install(monkeypatch, major=11)
    _plan(lenet_bundle, fakes, name="model.fp16.engine", version_compatible=True)
    _plan(lenet_bundle, fakes, name="model.fp32.engine")
    _record(lenet_bundle, "model.fp16.engine", "fp16", V10, version_compat=True)
    _record(lenet_bundle, "model.fp32.engine", "fp32", V10)
    with load(lenet_bundle, "tensorrt") as backend:
        assert backend.artifact == "model.fp16.engine"
        assert backend.infer({"images": images})["logits"].shape == (3, 10)
    with pytest.raises(BackendUnavailable, match=f"engine built with TensorRT {V10}, this is TensorRT {V11}"):
        load(lenet_bundle, "tensorrt", precision="fp32")


def test_plugins_are_registered_before_deserializing(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    env = fakes.install(monkeypatch)
    with TensorRTBackend(_plan(tmp_path, fakes, plugins=True), **SPECS):
        pass
    assert [c for c in env.trt.calls if c[0] in ("init_libnvinfer_plugins", "deserialize")] == [
        ("init_libnvinfer_plugins", ""), ("deserialize", True)]


def test_tampered_engine_is_refused(fakes: Any, monkeypatch: pytest.MonkeyPatch, lenet_bundle: Path) -> None:
    fakes.install(monkeypatch)
    engine = _plan(lenet_bundle, fakes, name="model.fp32.engine")
    _record(lenet_bundle, "model.fp32.engine", "fp32", V10)
    engine.write_bytes(engine.read_bytes().replace(b'"profile": [1, 4, 8]', b'"profile": [1, 4, 9]'))
    for backend in ("tensorrt", "auto"):  # a modified artifact is an error, never silently skipped
        with pytest.raises(BundleError, match="model.fp32.engine does not match its sha256"):
            load(lenet_bundle, backend)


def test_unsupported_major_is_refused(fakes: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = fakes.install(monkeypatch)
    monkeypatch.setattr(env.trt, "__version__", "8.6.1.6")
    with pytest.raises(BackendUnavailable,
                       match=r"^tensorrt: TensorRT 8.6.1.6 is not supported: kiln runs TensorRT 10 and 11$"):
        TensorRTBackend(_plan(tmp_path, fakes), **SPECS)


@pytest.mark.parametrize(("driver", "reason"), [
    (12020,
     "CUDA driver/bindings mismatch (cudaErrorInsufficientDriver): cuda-python 13.x uses CUDA 13.0, the "
     "driver supports CUDA 12.2"),
    (0, "no NVIDIA driver is loaded (cudaErrorInsufficientDriver)"),
])
def test_insufficient_driver_is_not_no_devices(driver: int, reason: str, fakes: Any,
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    fakes.install(monkeypatch, runtime=13000, driver=driver)
    assert cuda.device_count() == 0
    assert reason in (cuda.no_gpu_reason() or "")
    with pytest.raises(BackendUnavailable, match=reason.replace("(", r"\(").replace(")", r"\)")):
        TensorRTBackend(_plan(tmp_path, fakes), **SPECS)


def test_unreadable_plan_and_profile_limits(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    env = fakes.install(monkeypatch)
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackendUnavailable, match="cannot deserialize"):
        TensorRTBackend(bad, **SPECS)
    plan = _plan(tmp_path, fakes)
    with pytest.raises(BackendUnavailable, match=r"allows batches 1..8, max_batch 16"):
        TensorRTBackend(plan, **SPECS, max_batch=16)
    with TensorRTBackend(plan, **SPECS, max_batch=4) as b:
        assert b.max_batch == 4
    _clean(env)


def test_load_prefers_a_compatible_engine(fakes: Any, monkeypatch: pytest.MonkeyPatch, lenet_bundle: Path,
                                          images: np.ndarray) -> None:
    fakes.install(monkeypatch)
    _plan(lenet_bundle, fakes, name="model.fp16.engine")
    _plan(lenet_bundle, fakes, name="model.fp32.engine")
    _record(lenet_bundle, "model.fp32.engine", "fp32", V10)
    b = Bundle.load(lenet_bundle)
    b.add_artifact("model.fp16.engine", "tensorrt", "fp16", tensorrt_version=V10, gpu_name="Fake GPU",
                   compute_capability="7.5")
    b.save()
    with load(lenet_bundle) as backend:
        # fp16 comes first but was built for another GPU; the fp32 engine fits.
        assert (backend.name, backend.precision, backend.artifact) == (
            "tensorrt",
            "fp32",
            "model.fp32.engine",
        )
        assert backend.fallback_log == []
        assert backend.infer({"images": images})["logits"].shape == (3, 10)
    with pytest.raises(BackendUnavailable,
                       match=r"model.fp16.engine: engine built for Fake GPU \(compute capability 7.5\)"):
        load(lenet_bundle, "tensorrt", precision="fp16")
    with pytest.raises(BackendUnavailable,
                       match="no backend can run fp16 .*compute capability 7.5.*no fp16 ONNX model"):
        load(lenet_bundle, precision="fp16")


# ---- the process-wide logger, plugins, version and GPU checks ----------------------------------


def test_tensorrt_warnings_go_to_logging_never_stdout(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # TensorRT warns when a plan from another GPU model of the same compute capability is loaded; its
    # own logger would print that to stdout, where `--json` commands write their answer.
    fakes.install(monkeypatch)
    plan = _plan(tmp_path, fakes, gpu_name="Other GPU")
    with caplog.at_level("WARNING", logger="kiln.tensorrt"), TensorRTBackend(plan, **SPECS):
        pass
    assert capsys.readouterr().out == ""
    assert any(r.name == "kiln.tensorrt" and r.levelname == "WARNING"
               and "different models of devices" in r.message
               for r in caplog.records)


def test_predict_json_stays_json_when_tensorrt_warns(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                                     lenet_bundle: Path,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from PIL import Image

    from kiln.cli import main

    fakes.install(monkeypatch)
    _plan(lenet_bundle, fakes, name="model.fp32.engine", gpu_name="Other GPU")
    b = Bundle.load(lenet_bundle)
    b.add_artifact("model.fp32.engine", "tensorrt", "fp32", tensorrt_version=V10, gpu_name="Other GPU",
                   compute_capability="8.9")
    b.save()
    Image.new("L", (28, 28), 128).save(tmp_path / "digit.png")
    assert (
        main(["predict", str(lenet_bundle), str(tmp_path / "digit.png"), "--backend", "tensorrt", "--json"])
        == 0
    )
    out = capsys.readouterr().out
    assert json.loads(out)  # the whole of stdout is the JSON document


def test_plugins_are_initialised_once_with_a_logger_that_outlives_backends(
        fakes: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import gc

    env = fakes.install(monkeypatch)
    plan = _plan(tmp_path, fakes, plugins=True)
    with TensorRTBackend(plan, **SPECS):
        pass
    gc.collect()  # whatever the first backend owned is gone; the plugin library still logs through its logger
    with TensorRTBackend(plan, **SPECS):
        pass
    assert [c for c in env.trt.calls if c[0] == "init_libnvinfer_plugins"] == [
        ("init_libnvinfer_plugins", "")
    ]
    assert env.trt.violations == []


def test_build_number_is_compared(fakes: Any, monkeypatch: pytest.MonkeyPatch, lenet_bundle: Path) -> None:
    from kiln.runtime import preflight

    env = fakes.install(monkeypatch)
    other_build = "10.13.0.34"  # same major.minor.patch, another build: TensorRT refuses the plan
    plan = _plan(lenet_bundle, fakes, version=other_build, name="model.fp32.engine")
    with pytest.raises(BackendUnavailable, match=rf"expecting library version {V10} got {other_build}"):
        TensorRTBackend(plan, **SPECS)
    _record(lenet_bundle, "model.fp32.engine", "fp32", other_build)
    reason = f"engine built with TensorRT {other_build}, this is TensorRT {V10}"
    with pytest.raises(BackendUnavailable, match=reason):
        load(lenet_bundle, "tensorrt")
    with pytest.raises(BackendUnavailable, match=reason):
        preflight(lenet_bundle, "tensorrt")
    with load(lenet_bundle) as backend:
        assert backend.name == "onnxrt" and reason in backend.fallback_log[0]
    assert env.trt.violations == []


def _t4_engine(bundle: Path, fakes: Any) -> None:
    """An fp16 engine built on a Tesla T4 (compute capability 7.5), listed in kiln.json."""
    _plan(bundle, fakes, name="model.fp16.engine", capability=(7, 5), gpu_name="Tesla T4")
    b = Bundle.load(bundle)
    b.add_artifact("model.fp16.engine", "tensorrt", "fp16", tensorrt_version=V10, gpu_name="Tesla T4",
                   compute_capability="7.5")
    b.save()


def test_preflight_refuses_an_engine_from_another_gpu(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                                      lenet_bundle: Path) -> None:
    from kiln.runtime import preflight

    fakes.install(monkeypatch)
    _t4_engine(lenet_bundle, fakes)
    with pytest.raises(BackendUnavailable,
                       match=r"tensorrt: no engine fits this machine \(model.fp16.engine: engine "
                                                 r"built for Tesla T4 \(compute capability 7.5\), this GPU "
                                                 r"is Fake GPU"):
        preflight(lenet_bundle, "tensorrt")
    preflight(lenet_bundle)  # auto: ONNX Runtime runs model.onnx


def test_serve_refuses_a_foreign_engine_before_binding_the_port(fakes: Any, monkeypatch: pytest.MonkeyPatch,
                                                                 lenet_bundle: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main
    from kiln.serve import cli as serve_cli

    fakes.install(monkeypatch)
    _t4_engine(lenet_bundle, fakes)

    def no_port(*_a: object) -> None:
        raise AssertionError("kiln serve bound its port before refusing the engine")

    monkeypatch.setattr(serve_cli, "_listen", no_port)
    assert main(["serve", str(lenet_bundle), "--backend", "tensorrt", "--port", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kiln serve: error: ") and "compute capability 7.5" in line and "--engine" in line


@pytest.mark.parametrize(("capability", "runs"), [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_hardware_compatible_engine_runs_from_compute_capability_8_0(
        capability: tuple[int, int], runs: bool, fakes: Any, monkeypatch: pytest.MonkeyPatch,
        lenet_bundle: Path,
        images: np.ndarray) -> None:
    from kiln.runtime import preflight

    env = fakes.install(monkeypatch)
    env.gpu.name, env.gpu.capability = "Here GPU", capability
    _plan(lenet_bundle, fakes, name="model.fp16.engine", capability=(8, 6), gpu_name="NVIDIA RTX A6000",
          hardware_compatible=True)
    b = Bundle.load(lenet_bundle)
    b.add_artifact("model.fp16.engine", "tensorrt", "fp16", tensorrt_version=V10, gpu_name="NVIDIA RTX A6000",
                   compute_capability="8.6", hardware_compat=True)
    b.save()
    if runs:
        preflight(lenet_bundle, "tensorrt")
        with load(lenet_bundle, "tensorrt") as backend:
            assert backend.infer({"images": images})["logits"].shape == (3, 10)
    else:
        with pytest.raises(BackendUnavailable, match="needs compute capability >= 8.0, Here GPU has 7.5"):
            preflight(lenet_bundle, "tensorrt")
