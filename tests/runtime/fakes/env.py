"""Install the fakes for one test: ``sys.modules["tensorrt"]`` and kiln's CUDA adapter over a fake binding.

The adapter is kiln's own (``_CudaPython`` or ``_PyCuda``), so its code runs; only the binding is fake.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest

from kiln.runtime import cuda

from .cudart import make_cuda_utils, make_cudart
from .device import FakeDevice
from .pycuda import make_pycuda
from .tensorrt import make_tensorrt


@dataclass
class FakeEnv:
    gpu: FakeDevice
    trt: Any  # the fake tensorrt module
    binding: types.ModuleType  # the fake cuda.bindings.runtime or pycuda.driver
    api: cuda._Api  # kiln's adapter over it


def install(monkeypatch: pytest.MonkeyPatch, *, major: int = 10, binding: str = "cuda-python",
            native_handle: bool = True, **binding_kw: Any) -> FakeEnv:
    """``native_handle=False`` models cuda-bindings without ``cuda.bindings.utils`` (before 12.9)."""
    gpu = FakeDevice()
    api: cuda._Api
    if binding == "cuda-python":
        module = make_cudart(gpu, **binding_kw)
        api = cuda._CudaPython(module, make_cuda_utils().get_cuda_native_handle if native_handle else None)
        has_context = lambda: True  # noqa: E731 - the runtime API makes device 0 current on first use
    else:
        module = make_pycuda(gpu, **binding_kw)
        api = cuda._PyCuda(module)
        has_context = module.has_context
    trt = make_tensorrt(major, gpu, has_context=has_context)
    monkeypatch.setattr(cuda, "_api", api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return FakeEnv(gpu, trt, module, api)
