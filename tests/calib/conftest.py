"""Calibration fixtures: the session's trained digits bundle with its fp32 ONNX exported once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fp32_master(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits bundle after `kiln export --precision fp32` (do not modify; copy it)."""
    import torch

    from kiln.cli import main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("calib") / "digits"
    shutil.copytree(digits_bundle, root)
    assert main(["export", str(root), "--precision", "fp32"]) == 0
    return root


@pytest.fixture
def fp32_bundle(fp32_master: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "digits"
    shutil.copytree(fp32_master, dest, ignore=shutil.ignore_patterns(".cache"))
    return dest
