"""Export fixtures over the session's trained digits bundle (tests/conftest.py): copies to write into,
and one bundle exported once (fp32 + fp16 ONNX) that tests copy instead of exporting again; a detector
trained once per session for the detection export tests."""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="session")
def det_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kiln-det-s trained one epoch on 48 shapes images at 96 px, once per session: little skill, real
    outputs (do not modify; copy it)."""
    import torch

    from kiln.train.config import TrainConfig
    from kiln.train.loop import train

    torch.set_num_threads(1)
    old = os.environ.get("KILN_SHAPES_COUNT")
    os.environ["KILN_SHAPES_COUNT"] = "48"
    try:
        out = tmp_path_factory.mktemp("det") / "shapes"
        train(TrainConfig(data="shapes", model="kiln-det-s", epochs=1, batch_size=16, image_size=96,
                          out=str(out)),
              progress=False)
    finally:
        if old is None:
            os.environ.pop("KILN_SHAPES_COUNT", None)
        else:
            os.environ["KILN_SHAPES_COUNT"] = old
    # A low threshold so an almost untrained detector still reports detections to compare.
    manifest = json.loads((out / "kiln.json").read_text())
    manifest["postprocess"]["score_threshold"] = 0.02
    (out / "kiln.json").write_text(json.dumps(manifest))
    return out
