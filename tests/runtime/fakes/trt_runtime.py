"""The fake TensorRT's run side: the runtime that deserializes plans (checking version, compute
capability, host code and plugins as TensorRT does), the engine, and its execution context, which
computes on the fake device's stream (see tensorrt.py for the behaviour modelled).

The classes read the fake module (``trt``), the device and ``has_context`` from class attributes that
:func:`install_runtime` binds into one subclass per fake module."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .device import FakeDevice
from .trt_builder import bind
from .trt_types import DataType, Dims, nptype, row_bytes, runs_on


class _Context:
    gpu: FakeDevice
    trt: Any
    has_context: Callable[[], bool]

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.batch = engine.profile[2]
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        want = self.engine.shapes[name]
        lo, _, hi = self.engine.profile
        if len(shape) != len(want) or list(shape[1:]) != list(want[1:]) or not lo <= shape[0] <= hi:
            return False
        self.batch = int(shape[0])
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims((self.batch, *self.engine.shapes[name][1:]))

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if ptr not in self.gpu.memory:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if (
            not self.has_context()
            or set(self.addresses) != set(self.engine.shapes)
            or not self.trt.execute_result
        ):
            return False
        self.gpu.enqueue(stream_handle, "execute", self._compute, uses=tuple(self.addresses.values()))
        return True

    def _compute(self) -> None:
        first = self.engine.names[0]
        x = self.gpu.memory[self.addresses[first]]
        n, dtype = self.batch, self.engine.dtypes[first]
        rows = x[: n * row_bytes(self.engine.shapes[first], dtype)].view(nptype(dtype)).reshape(n, -1)
        if self.engine.tf32 and dtype.name == "FLOAT":  # TF32 keeps 10 of float32's 23 mantissa bits
            rows = (rows.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
        for name in self.engine.outputs:
            out_dtype, shape = self.engine.dtypes[name], self.engine.shapes[name]
            if out_dtype.name not in ("FLOAT", "HALF"):
                continue  # left as zeros
            k = math.prod(shape[1:])
            y = (2 * rows[:, :k].astype(np.float32)).astype(nptype(out_dtype))
            self.gpu.memory[self.addresses[name]][: y.nbytes] = y.reshape(-1).view(np.uint8)


class _Engine:
    trt: Any
    context: type[_Context]

    def __init__(self, plan: dict[str, Any]) -> None:
        self.names = [t[0] for t in plan["tensors"]]
        self.modes = {t[0]: self.trt.TensorIOMode[t[1]] for t in plan["tensors"]}
        self.shapes = {t[0]: tuple(t[2]) for t in plan["tensors"]}
        self.dtypes = {t[0]: DataType[t[3]] for t in plan["tensors"]}
        self.outputs = [n for n in self.names if self.modes[n] == self.trt.TensorIOMode.OUTPUT]
        self.profile = tuple(plan["profile"])
        self.tf32 = bool(plan["tf32"])

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> Any:
        return self.modes[name]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.dtypes[name]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self.shapes[name])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[Dims]:
        return [Dims((b, *self.shapes[name][1:])) for b in self.profile]

    def create_execution_context(self) -> _Context:
        return self.context(self)


class _Runtime:
    trt: Any
    gpu: FakeDevice
    engine: type[_Engine]

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
        trt, gpu = self.trt, self.gpu
        trt.calls.append(("deserialize", trt.plugins_registered))
        try:
            plan = json.loads(bytes(data))
            assert plan["magic"] == "fake-plan"
        except (ValueError, KeyError, AssertionError, TypeError):
            return self._error("the plan is not a TensorRT engine")
        if not runs_on(plan, trt.__version__):
            return self._error("The engine plan file is not compatible with this version of TensorRT, "
                               f"expecting library version {trt.__version__} got {plan['version']}, please "
                               "rebuild.")
        built_cc, here_cc = tuple(plan["capability"]), tuple(gpu.capability)
        if plan["hardware_compatible"]:
            if here_cc < (8, 0):
                return self._error("hardware-compatible plan needs compute capability 8.0 or newer, got "
                                   f"{here_cc}")
        elif built_cc != here_cc:
            return self._error("The engine plan file is generated on an incompatible device, expecting "
                               "compute "
                               f"{here_cc[0]}.{here_cc[1]} got compute {built_cc[0]}.{built_cc[1]}, please "
                               "rebuild.")
        elif plan["gpu_name"] != gpu.name:
            self.logger.log(trt.ILogger.Severity.WARNING,
                            "Using an engine plan file across different models of "
                            "devices is not recommended and is likely to affect performance or even cause "
                            "errors.")
        if plan["version_compatible"] and not self.engine_host_code_allowed:
            return self._error("version-compatible plan needs engine_host_code_allowed")
        if plan["plugins"] and not trt.plugins_registered:
            return self._error("getPluginCreator could not find plugin EfficientNMS_TRT")
        if plan["plugins"]:
            trt.plugin_used("EfficientNMS_TRT")
        return self.engine(plan)

    def _error(self, msg: str) -> None:
        self.logger.log(self.trt.ILogger.Severity.ERROR, msg)
        return None


def install_runtime(trt: Any, gpu: FakeDevice, has_context: Callable[[], bool]) -> None:
    context = bind(_Context, trt=trt, gpu=gpu, has_context=staticmethod(has_context))
    engine = bind(_Engine, trt=trt, context=context)
    trt.Runtime = bind(_Runtime, trt=trt, gpu=gpu, engine=engine)
    trt.execute_result = True  # a test sets False to make execute_async_v3 fail
