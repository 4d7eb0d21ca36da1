"""Open Inference Protocol tensors, protocol-neutral: the REST API (JSON and the binary data extension)
and gRPC (typed contents and ``raw_input_contents``) both turn their inputs into :class:`InputTensor`
and let :func:`check_inputs` check them against the model, so both answer a bad tensor the same way.

Every error names the tensor, what came and what was expected (:class:`~kiln.errors.InputError`).
A ``BYTES`` input holds encoded image files (PNG, JPEG, ...), one per element, which are decoded and
preprocessed with the bundle's own preprocessing, as /v1 images are.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import InputError
from kiln.processing import Letterbox
from kiln.serve.numeric import parse_tensor
from kiln.serve.registry import ServedModel
from kiln.serve.schemas import V2_DTYPES, v2_datatype


@dataclass
class InputTensor:
    """One request input: ``data`` is flat (row-major); for BYTES an object array of ``bytes``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise InputError(
            f"Input tensor: {name} | received shape {list(shape)} | expected non-negative dimensions")
    return math.prod(shape)


def numpy_dtype(name: str, datatype: str) -> np.dtype[Any]:
    if datatype not in V2_DTYPES:
        raise InputError(f"Input tensor: {name} | received datatype {datatype} | expected one of "
                         f"{', '.join([*V2_DTYPES, 'BYTES'])}")
    return np.dtype(V2_DTYPES[datatype])


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw bytes (binary data extension, gRPC ``raw_input_contents``), flat."""
    count = element_count(name, shape)
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, count, shape)
    dtype = numpy_dtype(name, datatype)
    want = count * dtype.itemsize
    if len(raw) != want:
        raise InputError(f"Input tensor: {name} | received {len(raw)} bytes of data | "
                         f"expected {want} for shape {list(shape)} {datatype}")
    return np.frombuffer(raw, dtype=_little(dtype)).astype(dtype, copy=False)


def from_list(name: str, datatype: str, shape: Sequence[int], data: Sequence[Any]) -> np.ndarray:
    """A tensor from JSON ``data`` or gRPC typed contents (flat or nested), flat, checked strictly
    (:func:`kiln.serve.numeric.parse_tensor`). The values are counted against ``shape`` before any of
    them is converted (:func:`check_count`)."""
    count = element_count(name, shape)
    check_count(name, data, shape)
    if datatype == "BYTES":
        items = [s.encode() if isinstance(s, str) else s
                 for s in np.array(data, dtype=object).ravel().tolist()]
        if not all(isinstance(s, bytes) for s in items):
            raise InputError(
                f"Input tensor: {name} | BYTES data holds non-string elements | expected strings")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
    else:
        arr = parse_tensor(name, list(data), datatype, numpy_dtype(name, datatype))
    if arr.size != count:
        raise InputError(
            f"Input tensor: {name} | received {arr.size} values | expected {count} for shape {list(shape)}")
    return arr


def check_count(name: str, data: Sequence[Any], shape: Sequence[int]) -> None:
    """Refuse ``data`` (flat, or nested as deep as ``shape``) that holds another number of values than
    ``shape`` says, or is nested deeper, before any value is converted. Only lists are walked, and the
    walk stops once it has seen more entries than a tensor of ``shape`` has at all its levels together,
    so its cost is bounded by the declared shape, not by what the client sent."""
    count, rank = math.prod(shape), max(len(shape), 1)
    budget = count * rank  # list entries a regular nesting of this shape holds, summed over its levels
    seen = values = 0
    stack: list[tuple[Sequence[Any], int]] = [(data, 1)]
    problem = ""
    while stack:
        node, depth = stack.pop()
        seen += len(node)
        if seen > budget or values + len(node) > count and not (node and isinstance(node[0], list)):
            problem = f"received more than {count} values"
            break
        if node and isinstance(node[0], list):  # a ragged mix of lists and values is parse_tensor's to refuse
            if depth >= rank:
                problem = f"data nested deeper than the {len(shape)} dimensions of the shape"
                break
            stack.extend((child, depth + 1) for child in node if isinstance(child, list))
        else:
            values += len(node)
    if not problem and values != count:
        problem = f"received {values} values"
    if problem:
        raise InputError(f"Input tensor: {name} | {problem} | expected {count} for shape {list(shape)}")


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int | None = None,
                      shape: Sequence[int] | None = None) -> np.ndarray:
    """BYTES elements, each a 4-byte little-endian length and that many bytes. With ``count`` the walk
    stops at element ``count + 1``: a body of millions of empty elements is refused after reading
    ``count + 1`` length prefixes, not after building millions of objects."""
    view = memoryview(raw)
    items: list[bytes] = []
    pos = 0
    want = f"expected {count} for shape {list(shape) if shape is not None else [count]}"
    while pos < len(view):
        if count is not None and len(items) == count:
            raise InputError(f"Input tensor: {name} | received more than {count} BYTES elements | {want}")
        if pos + 4 > len(view):
            raise InputError(f"Input tensor: {name} | BYTES element {len(items)} has a truncated length "
                             f"prefix ({len(view) - pos} of 4 bytes)")
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise InputError(f"Input tensor: {name} | BYTES element {len(items)} declares {size} bytes | "
                             f"only {len(view) - pos} remain")
        items.append(bytes(view[pos : pos + size]))
        pos += size
    if count is not None and len(items) != count:
        raise InputError(f"Input tensor: {name} | received {len(items)} BYTES elements | {want}")
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def check_inputs(model: ServedModel, inputs: Sequence[tuple[str, str, Sequence[int]]],
                 max_items: int) -> None:
    """Check the request's (name, datatype, shape) against the model input, before any data is read.

    The model takes one tensor, ``[N, *input shape]`` of its datatype, or ``[N]`` / ``[N, 1]`` BYTES of
    encoded images.
    """
    spec = model.manifest.input
    expected = [-1, *spec.shape]
    names = [name for name, _, _ in inputs]
    if names != [spec.name]:
        unknown = [n for n in names if n != spec.name]
        raise InputError(f"Input tensor: {unknown[0] if unknown else spec.name} | received inputs {names} | "
                         f"expected exactly one input named '{spec.name}'")
    name, datatype, shape = inputs[0][0], inputs[0][1], list(inputs[0][2])
    batch = shape[0] if shape else 0
    if batch > max_items:
        raise InputError(
            f"Input tensor: {name} | received batch {batch} | expected at most {max_items} items")
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or batch < 1 or shape[1:] not in ([], [1]):
            raise InputError(
                f"Input tensor: {name} | received BYTES shape {shape} | expected [N] or "
                "[N, 1] encoded images")
        return
    want_type = v2_datatype(spec.dtype)
    if datatype != want_type:
        raise InputError(f"Input tensor: {name} | received datatype {datatype} | expected {want_type} "
                         "(or BYTES of encoded images)")
    if len(shape) != len(expected) or shape[1:] != list(spec.shape) or batch < 1:
        raise InputError(
            f"Input tensor: {name} | received shape {shape} | expected a shape compatible with {expected}")


def model_input(tensors: Sequence[InputTensor]) -> list[bytes] | np.ndarray:
    """The model's input from tensors that passed :func:`check_inputs`: BYTES are encoded images (decoded
    and preprocessed like /v1 images by :func:`kiln.serve.inference.infer`), any other datatype the
    input tensor itself."""
    t = tensors[0]
    if t.datatype == "BYTES":
        return list(t.data)
    return t.data.reshape(t.shape)


def output_names(model: ServedModel, wanted: Sequence[str] | None) -> list[str]:
    """The outputs a request asked for, in its order (all of the model's when it names none)."""
    served = model.batcher.backend  # an end-to-end detector graph has other outputs than kiln.json's raw ones
    names = [o.name for o in (served.outputs if served is not None else model.manifest.outputs)]
    if not wanted:
        return names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise InputError(f"Output tensor: {unknown[0]} | unknown | expected one of {names}")
    return list(wanted)


def boxes_to_original(model: ServedModel, out: Mapping[str, np.ndarray],
                      letterboxes: Sequence[Letterbox] | None) -> dict[str, np.ndarray]:
    """A detector's outputs for encoded images (``letterboxes``: one per image; None for a tensor input)
    with its boxes in each original image's pixels, as /v1 answers them.

    End-to-end graph: the first ``num_dets`` rows of ``det_boxes [N, K, 4]`` mapped and clipped to the
    image (padding rows stay zeros). Raw graph: every candidate of ``boxes [N, A, 4]`` mapped, not clipped,
    so that NMS over them keeps what NMS in the input's pixels keeps (IoU is unchanged by the letterbox's
    one scale and shift); clip the kept boxes to the image as /v1 does. Other outputs pass unchanged."""
    if letterboxes is None or model.manifest.task != "detect":
        return dict(out)
    mapped = dict(out)
    if "det_boxes" in out and "num_dets" in out:
        boxes = out["det_boxes"].copy()
        for i, (lb, n) in enumerate(
                zip(letterboxes, out["num_dets"].reshape(len(letterboxes), -1)[:, 0], strict=True)):
            boxes[i, : int(n)] = lb.to_original(boxes[i, : int(n)])
        mapped["det_boxes"] = boxes
        return mapped
    name = "boxes" if "boxes" in out else model.manifest.outputs[0].name
    boxes = out[name].astype(np.float32)  # a copy
    for i, lb in enumerate(letterboxes):
        boxes[i, ..., 0::2] = (boxes[i, ..., 0::2] - lb.pad_x) / lb.scale_x
        boxes[i, ..., 1::2] = (boxes[i, ..., 1::2] - lb.pad_y) / lb.scale_y
    mapped[name] = boxes.astype(out[name].dtype, copy=False)
    return mapped


def check_output_parameters(name: str, parameters: Mapping[str, Any]) -> None:
    """Refuse output parameters this server does not implement (REST and gRPC alike): Triton's
    ``classification`` (tritonclient's ``class_count``) would answer class labels instead of the tensor."""
    if "classification" in parameters:
        raise InputError(f"Output tensor: {name} | parameter 'classification' (class_count) | not supported: "
                         "ask for the tensor, or use /v1/models/{model}/predict for labels")


@functools.cache
def _little(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<")


def to_bytes(arr: np.ndarray) -> bytes:
    """Row-major little-endian bytes, as the binary data extension and ``raw_output_contents`` carry them."""
    return np.ascontiguousarray(arr, dtype=_little(arr.dtype)).tobytes()


__all__ = [
    "InputTensor", "boxes_to_original", "check_count", "check_inputs", "check_output_parameters",
    "deserialize_bytes", "element_count", "from_list", "from_raw", "model_input", "numpy_dtype",
    "output_names", "serialize_bytes", "to_bytes",
]
