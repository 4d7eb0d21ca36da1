"""Strict JSON tensor data for the KServe v2 protocol: every value must be what the datatype says.

``np.asarray(data, dtype)`` alone would quietly turn ``null`` into NaN, ``true`` into 1, ``"2"`` into 2.0,
1.5 into 1 for an integer tensor and 1e39 into infinity for FP32; the model would then answer garbage
with a 200. Here each of those is an :class:`~kiln.errors.InputError` naming the tensor, the value and
its position. The checks are whole-array numpy operations, not a Python loop per value.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kiln.errors import InputError

_NUMBER_TYPES = {int, float}


def parse_tensor(name: str, data: list[Any], datatype: str, dtype: np.dtype[Any]) -> np.ndarray:
    """The values of ``data`` (flat or nested lists) as a flat array of ``dtype``.

    Raises :class:`InputError` for a ragged array, a value of the wrong JSON type (null, a string, a
    bool for a numeric tensor, a fractional number for an integer tensor), NaN or infinity, or a number
    outside the range of ``dtype``.
    """
    flat = _flatten(name, data, datatype)
    kinds = set(map(type, flat))
    if list in kinds:  # numpy keeps the inner lists of a ragged nesting as objects
        raise InputError(f"Input tensor: {name} | data is not a regular array of {datatype}")
    if dtype.kind == "b":
        if kinds - {bool}:
            raise _bad_value(name, flat, datatype, lambda v: type(v) is not bool, "expected true or false")
        return np.asarray(flat, dtype=dtype)
    if dtype.kind in "iu":
        if kinds - {int}:
            raise _bad_value(name, flat, datatype, lambda v: type(v) is not int, "expected an integer")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise _bad_value(name, flat, datatype, lambda v: not info.min <= v <= info.max,
                             f"out of range for {datatype} [{info.min}, {info.max}]")
        return np.asarray(flat, dtype=dtype)
    if kinds - _NUMBER_TYPES:
        raise _bad_value(name, flat, datatype, lambda v: type(v) not in _NUMBER_TYPES, "expected a number")
    try:
        values = np.asarray(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        raise _bad_value(name, flat, datatype, lambda v: abs(v) > np.finfo(np.float64).max,
                         f"out of range for {datatype}") from None
    finite = np.isfinite(values)
    if not finite.all():
        index = int(np.argmin(finite))
        raise InputError(f"Input tensor: {name} | received {_json(flat[index])} at index {index} | "
                         "expected a finite number")
    limit = float(np.finfo(dtype).max)
    magnitude = np.abs(values)
    if values.size and magnitude.max() > limit:
        index = int(np.argmax(magnitude > limit))
        raise InputError(f"Input tensor: {name} | received {_json(flat[index])} at index {index} | "
                         f"out of range for {datatype} (largest magnitude {limit:g})")
    return values.astype(dtype, copy=False)


def _flatten(name: str, data: list[Any], datatype: str) -> list[Any]:
    """Row-major values of nested lists (inner lists of a ragged nesting stay lists)."""
    try:
        arr = np.array(data, dtype=object)
    except ValueError:
        raise InputError(f"Input tensor: {name} | data is not a regular array of {datatype}") from None
    flat: list[Any] = arr.ravel().tolist()
    return flat


def _bad_value(name: str, flat: list[Any], datatype: str, bad: Any, expected: str) -> InputError:
    index = next(i for i, v in enumerate(flat) if bad(v))
    return InputError(
        f"Input tensor: {name} | received {_json(flat[index])} at index {index} | {expected} for {datatype}")


def _json(value: Any) -> str:
    """The value as the client wrote it (``null``, ``true``, ``"1.5"``, ``NaN``)."""
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return repr(value)[:40]


__all__ = ["parse_tensor"]
