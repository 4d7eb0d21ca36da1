"""The TensorRT backend's data flow on test doubles, so it runs without a GPU: a fake ``tensorrt``
module (engine, context, named tensors) and a fake CUDA binding whose "device memory" is numpy.

This checks kiln's side only: buffer sizing for the profile's max batch, address binding, the
copy/execute/copy sequence, output shapes per batch, fresh outputs, timings, close(), and load()
choosing a compatible engine. Real TensorRT is exercised by the `trt`/`gpu` tests in
tests/export/test_onnx2engine.py.
"""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.bundle import Bundle, TensorSpec
from kiln.errors import BackendUnavailable, InputError
from kiln.runtime import BackendClosed, cuda, load
from kiln.runtime.tensorrt import TensorRTBackend

PLAN = b"FAKE-PLAN"
PROFILE = ((1, 1, 28, 28), (4, 1, 28, 28), (8, 1, 28, 28))


class FakeCuda(cuda._Api):
    name = "fake"

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.pinned = 0
        self.next = 0x1000
        self.current: dict[int, int] = {}

    def device_count(self) -> int:
        return 1

    def device_info(self, index: int) -> cuda.DeviceInfo:
        return cuda.DeviceInfo(index, "Fake GPU", "8.9", 1 << 30)

    def use_device(self, index: int) -> None:
        self.current[threading.get_ident()] = index

    def malloc(self, nbytes: int) -> int:
        self.next += 0x1000 + nbytes
        self.memory[self.next] = np.zeros(nbytes, np.uint8)
        return self.next

    def free(self, ptr: int) -> None:
        del self.memory[ptr]

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Any]:
        self.pinned += 1

        def release() -> None:
            self.pinned -= 1

        return np.zeros(nbytes, np.uint8), release

    def stream_create(self) -> tuple[Any, int]:
        return object(), 77

    def stream_sync(self, stream: Any) -> None:
        return None

    def stream_destroy(self, stream: Any) -> None:
        return None

    def event_create(self) -> Any:
        return {"n": 0}

    def event_record(self, event: Any, stream: Any) -> None:
        self.next += 1
        event["n"] = self.next

    def event_elapsed(self, start: Any, end: Any) -> float:
        return float(end["n"] - start["n"])

    def event_destroy(self, event: Any) -> None:
        return None

    def htod_async(self, dst: int, src: cuda.PinnedBuffer, nbytes: int, stream: Any) -> None:
        self.memory[dst][:nbytes] = src.array[:nbytes]

    def dtoh_async(self, dst: cuda.PinnedBuffer, src: int, nbytes: int, stream: Any) -> None:
        dst.array[:nbytes] = self.memory[src][:nbytes]


def _fake_tensorrt(gpu: FakeCuda) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")  # type: ignore[attr-defined]
    trt.nptype = lambda dt: np.float32  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            if not PROFILE[0][0] <= shape[0] <= PROFILE[2][0]:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            n = self.shapes["images"][0]
            return (n, 1, 28, 28) if name == "images" else (n, 10)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            # The "network": logits = 2 * the first 10 pixels of each image.
            n = self.shapes["images"][0]
            x = gpu.memory[self.addresses["images"]][: n * 784 * 4].view(np.float32).reshape(n, 784)
            out = gpu.memory[self.addresses["logits"]]
            out[: n * 40] = (2 * x[:, :10]).astype(np.float32).reshape(-1).view(np.uint8)
            return stream == 77

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["images", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "images" else "out"

        def get_tensor_dtype(self, name: str) -> str:
            return "FLOAT"

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 1, 28, 28) if name == "images" else (-1, 10)

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
            return PROFILE

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if data == PLAN else None

    trt.Builder = object  # type: ignore[attr-defined]  # what tells the real package from the stubs
    trt.Logger, trt.Runtime = Logger, Runtime  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    gpu = FakeCuda()
    monkeypatch.setattr(cuda, "_api", gpu)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", _fake_tensorrt(gpu))
    return gpu


SPECS = {"inputs": [TensorSpec(name="images", shape=[1, 28, 28])], "outputs": [TensorSpec(name="logits", shape=[10])]}


def test_infer_copies_through_device_buffers(fake_gpu: FakeCuda, tmp_path: Path, images: np.ndarray) -> None:
    plan = tmp_path / "m.engine"
    plan.write_bytes(PLAN)
    with TensorRTBackend(plan, **SPECS, precision="fp16") as b:
        assert (b.min_batch, b.max_batch, b.device, b.precision) == (1, 8, "cuda:0", "fp16")
        # One device and one pinned buffer per tensor, sized for the max batch (8).
        assert sorted(a.nbytes for a in fake_gpu.memory.values()) == [8 * 10 * 4, 8 * 784 * 4]
        out = b.infer({"images": images})["logits"]
        np.testing.assert_array_equal(out, 2 * images.reshape(3, -1)[:, :10])
        assert set(b.last_timings) == {"h2d_ms", "compute_ms", "d2h_ms", "total_ms"}
        kept = out.copy()
        small = b.infer({"images": images[:1] + 1})["logits"]
        assert small.shape == (1, 10)
        np.testing.assert_array_equal(out, kept)  # the first result was not a view of the pinned buffer
        with pytest.raises(InputError, match=r"images \| received batch 9 \| expected a batch in \[1, 8\]"):
            b.infer({"images": np.zeros((9, 1, 28, 28), np.float32)})
        # A call from another thread makes the device current there first.
        t = threading.Thread(target=b.infer, args=({"images": images},))
        t.start()
        t.join()
        assert len(fake_gpu.current) == 2
    assert fake_gpu.memory == {} and fake_gpu.pinned == 0  # close() freed every buffer
    with pytest.raises(BackendClosed):
        b.infer({"images": images})


def test_unreadable_plan_and_profile_limits(fake_gpu: FakeCuda, tmp_path: Path) -> None:
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackendUnavailable, match="cannot deserialize"):
        TensorRTBackend(bad, **SPECS)
    plan = tmp_path / "m.engine"
    plan.write_bytes(PLAN)
    with pytest.raises(BackendUnavailable, match=r"allows batches 1..8, max_batch 16"):
        TensorRTBackend(plan, **SPECS, max_batch=16)
    with TensorRTBackend(plan, **SPECS, max_batch=4) as b:
        assert b.max_batch == 4
    assert fake_gpu.memory == {}


def test_load_prefers_a_compatible_engine(fake_gpu: FakeCuda, lenet_bundle: Path, images: np.ndarray) -> None:
    (lenet_bundle / "model.fp16.engine").write_bytes(PLAN)
    (lenet_bundle / "model.fp32.engine").write_bytes(PLAN)
    b = Bundle.load(lenet_bundle)
    prov = {"tensorrt_version": "10.13.0.35", "gpu_name": "Fake GPU", "compute_capability": "8.9"}
    b.add_artifact("model.fp32.engine", "tensorrt", "fp32", **prov)
    b.add_artifact("model.fp16.engine", "tensorrt", "fp16", **{**prov, "compute_capability": "7.5"})
    b.save()
    with load(lenet_bundle) as backend:
        # fp16 comes first but was built for another GPU; the fp32 engine fits.
        assert (backend.name, backend.precision, backend.artifact) == ("tensorrt", "fp32", "model.fp32.engine")
        assert backend.fallback_log == []
        assert backend.infer({"images": images})["logits"].shape == (3, 10)
    with pytest.raises(BackendUnavailable, match=r"model.fp16.engine: engine built for Fake GPU \(compute capability 7.5\)"):
        load(lenet_bundle, "tensorrt", precision="fp16")
    with pytest.raises(BackendUnavailable, match="no backend can run fp16 .*compute capability 7.5.*no fp16 ONNX model"):
        load(lenet_bundle, precision="fp16")
