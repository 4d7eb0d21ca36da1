"""The fake TensorRT's data: versions, ``DataType`` and ``nptype``, ``Dims``, and the JSON "ONNX graphs"
and plans that the fake builder reads and writes (see tensorrt.py)."""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

VERSIONS = {10: "10.13.0.35", 11: "11.4.0.106", 8: "8.6.1.6"}
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
          "BOOL": np.bool_, "UINT8": np.uint8}
_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1, "UINT8": 1,
             "FP8": 1,
             "INT4": 0.5, "FP4": 0.5}


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11

    @property
    def itemsize(self) -> float | None:
        return _ITEMSIZE.get(self.name)


def nptype(dtype: DataType) -> Any:
    if dtype.name in _NUMPY:
        return _NUMPY[dtype.name]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")


def make_graph(path: Path, *, inputs: list[tuple[str, tuple[int, ...], str]] | None = None,
               outputs: list[tuple[str, tuple[int, ...], str]] | None = None,
               layers: list[tuple[str, str]] | None = None,
               errors: list[dict[str, Any]] | None = None, plugins: bool = False) -> Path:
    """Write a fake ONNX graph: I/O ``(name, shape, DataType name)``, layers ``(LayerType name, output
    DataType name)``."""
    path.write_text(json.dumps({
        "inputs": inputs or [("images", (-1, 1, 28, 28), "FLOAT")],
        "outputs": outputs or [("logits", (-1, 10), "FLOAT")],
        "layers": layers or [("CONVOLUTION", "FLOAT")],
        "errors": errors or [], "plugins": plugins,
    }))
    return path


def make_plan(version: str, *, tensors: list[tuple[str, str, tuple[int, ...], str]] | None = None,
              profile: tuple[int, int, int] = (1, 4, 8), version_compatible: bool = False,
              plugins: bool = False,
              gpu_name: str = "Fake GPU", capability: tuple[int, int] = (8, 9),
              hardware_compatible: bool = False,
              tf32: bool = False) -> bytes:
    """A plan: tensors ``(name, "INPUT"|"OUTPUT", shape with -1 batch, DataType name)``; one batch profile;
    built on ``gpu_name`` of compute ``capability`` (FakeDevice's defaults)."""
    tensors = tensors or [
        ("images", "INPUT", (-1, 1, 28, 28), "FLOAT"),
        ("logits", "OUTPUT", (-1, 10), "FLOAT"),
    ]
    return json.dumps({"magic": "fake-plan", "version": version, "tensors": tensors, "profile": profile,
                       "version_compatible": version_compatible, "plugins": plugins, "gpu_name": gpu_name,
                       "capability": list(capability), "hardware_compatible": hardware_compatible,
                       "tf32": tf32}).encode()


def runs_on(plan: dict[str, Any], here: str) -> bool:
    built_v, here_v = tuple(map(int, plan["version"].split("."))), tuple(map(int, here.split(".")))
    if built_v == here_v:
        return True
    if not plan["version_compatible"] or here_v < built_v:
        return False
    return built_v[0] == here_v[0] or (built_v[0], here_v[0]) == (10, 11)


class Dims(tuple):  # indexes and has len() like the real Dims
    def __new__(cls, shape: Any = ()) -> Dims:
        return super().__new__(cls, (int(d) for d in shape))


def row_bytes(shape: tuple[int, ...], dtype: DataType) -> int:
    return math.ceil(math.prod(shape[1:]) * float(dtype.itemsize or 1))
