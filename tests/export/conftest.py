"""Export fixtures over the session's trained digits bundle (tests/conftest.py): copies to write into,
and one bundle exported once (fp32 + fp16 ONNX) that tests copy instead of exporting again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".cache"))
    return dest


@pytest.fixture
def bundle_copy(digits_bundle: Path, tmp_path: Path) -> Path:
    """A writable copy of the trained (not yet exported) digits bundle."""
    return copy_bundle(digits_bundle, tmp_path / "digits")


@pytest.fixture(scope="session")
def exported_master(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits bundle after `kiln export --precision fp32,fp16` (do not modify; copy it)."""
    import torch

    from kiln.cli import main

    torch.set_num_threads(1)
    root = copy_bundle(digits_bundle, tmp_path_factory.mktemp("exported") / "digits")
    assert main(["export", str(root), "--precision", "fp32,fp16", "--batch", "1:4:16"]) == 0
    return root


@pytest.fixture
def exported(exported_master: Path, tmp_path: Path) -> Path:
    return copy_bundle(exported_master, tmp_path / "exported")
