"""The names every stage shares, each declared once: tasks, precisions, backends.

Each is a ``Literal`` (for types and pydantic) with its tuple derived from it (for argparse choices
and error messages), so adding a name is a one-line change here.
"""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["classify", "detect"]
TASKS: tuple[Task, ...] = get_args(Task)

# What a backend can run: bf16 exists only as torch autocast.
Precision = Literal["fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

# What an exported graph (ONNX file, TensorRT engine, Triton model) can hold.
GraphPrecision = Literal["fp32", "fp16", "int8"]
GRAPH_PRECISIONS: tuple[GraphPrecision, ...] = get_args(GraphPrecision)

# Backends in the order ``runtime.load(backend="auto")`` tries them: fastest first.
BackendName = Literal["tensorrt", "onnxrt", "torch"]
BACKEND_NAMES: tuple[BackendName, ...] = get_args(BackendName)
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKEND_NAMES)
