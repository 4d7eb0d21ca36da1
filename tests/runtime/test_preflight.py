"""runtime.preflight: a backend request that cannot be met is refused from kiln.json, with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import BackendUnavailable, ConfigError
from kiln.runtime import preflight


def test_auto_passes_when_any_backend_can_run(lenet_master: Path) -> None:
    preflight(lenet_master)  # ONNX Runtime can run model.onnx here
    preflight(lenet_master, "onnxrt", "fp32")


def test_missing_engine_names_the_export_command(lenet_master: Path) -> None:
    with pytest.raises(BackendUnavailable,
                       match=r"tensorrt: the bundle has no TensorRT engine; build one on the "
                                                 r"GPU machine: kiln export .* --engine$"):
        preflight(lenet_master, "tensorrt")


def test_missing_precision_lists_every_backend_with_its_fix(lenet_master: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        preflight(lenet_master, "auto", "int8")
    msg = str(info.value)
    assert "kiln export" in msg and "--precision int8" in msg
    assert all(f"{name}: " in msg for name in ("tensorrt", "onnxrt", "torch"))


def test_unknown_backend(lenet_master: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'onnx'"):
        preflight(lenet_master, "onnx")


def test_serve_refuses_before_starting(lenet_master: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    assert main(["serve", str(lenet_master), "--backend", "tensorrt", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln serve: error: ") and "--engine" in err[0], err
