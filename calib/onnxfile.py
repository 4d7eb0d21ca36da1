"""ONNX files on the export and calibration path, read with one-line errors.

onnx and onnxruntime report a damaged, truncated or foreign file with their own exception types
(protobuf's ``DecodeError``, onnx's ``ValidationError``, onnxruntime's ``InvalidProtobuf``...) and a long
traceback. Here each becomes an :class:`OnnxFileError` naming the file and how to get a good one, which
the CLI prints as ``kiln export: error: ...``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import ExportError, KilnError

# Exceptions raised by these libraries (their own types, or protobuf's) are about the model file.
_LIBRARIES = ("onnx", "onnxruntime", "onnxslim", "google.protobuf")
REEXPORT = "re-export it: kiln export BUNDLE --precision fp32"


class OnnxFileError(ExportError):
    """An ONNX file cannot be read or checked by onnx or onnxruntime."""


def from_onnx_library(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by onnx, onnxruntime or protobuf (their types, not Python's)."""
    module = type(exc).__module__ or ""
    return any(module == lib or module.startswith(lib + ".") for lib in _LIBRARIES)


def describe(exc: BaseException, path: str | os.PathLike[str] | None = None, hint: str = REEXPORT) -> str:
    """One line: which file, what the library said (its first line), and what to do."""
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if path is None:
        return f"onnx/onnxruntime failed ({what}); if a model file is damaged, {hint}"
    return f"cannot read {path} ({what}); the file is damaged or not an ONNX model: {hint}"


@contextlib.contextmanager
def onnx_errors(path: str | os.PathLike[str] | None = None, hint: str = REEXPORT) -> Iterator[None]:
    """Turn an exception of onnx/onnxruntime/protobuf raised in the block into :class:`OnnxFileError`."""
    try:
        yield
    except KilnError:
        raise
    except Exception as exc:
        if not from_onnx_library(exc):
            raise
        raise OnnxFileError(describe(exc, path, hint)) from exc


def load_onnx(path: str | os.PathLike[str], *, load_external_data: bool = True, hint: str = REEXPORT) -> Any:
    """``onnx.load`` with an :class:`OnnxFileError` for a file onnx cannot parse."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except (KilnError, OSError):  # a missing or unreadable path is the CLI's one-line OSError
        raise
    except Exception as exc:  # protobuf's DecodeError, or whatever a truncated file trips over
        raise OnnxFileError(describe(exc, path, hint)) from exc


def check_onnx_file(path: str | os.PathLike[str], hint: str = REEXPORT) -> None:
    """Parse ``path`` and run onnx.checker on it (by path, so external weights are found):
    a damaged file stops the run before any work, not after minutes of calibration."""
    import onnx

    load_onnx(path, load_external_data=False, hint=hint)
    with onnx_errors(path, hint):
        onnx.checker.check_model(os.fspath(Path(path)))
