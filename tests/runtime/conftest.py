"""Runtime fixtures: a small synthetic lenet5 bundle (random weights, model.pt + kiln.json + ONNX).

Built once per session without a dataset or training, so the runtime tests do not depend on the
train stage; tests copy it before changing anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec

NUM_CLASSES = 10


def make_lenet_bundle(root: Path, *, onnx: bool = True) -> Path:
    import torch

    from kiln.train.models import build_model

    torch.manual_seed(0)
    arch = Architecture(name="lenet5", args={"num_classes": NUM_CLASSES, "in_channels": 1, "image_size": 28})
    model = build_model(arch).eval()
    root.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), root / "model.pt")
    manifest = Manifest(
        kiln_version="test",
        task="classify",
        classes=[str(i) for i in range(NUM_CLASSES)],
        input=InputSpec(name="images", shape=[1, 28, 28], batch=BatchRange(min=1, opt=4, max=8)),
        outputs=[TensorSpec(name="logits", shape=[NUM_CLASSES])],
        preprocess=Preprocess(mode="resize", size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
        postprocess={"top_k": 3},
        architecture=arch,
    )
    bundle = Bundle(root, manifest)
    bundle.add_artifact("model.pt", "torch", "fp32")
    if onnx:
        x = torch.randn(2, 1, 28, 28)
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(
            model, (x,), root / "model.onnx", input_names=["images"], output_names=["logits"],
            dynamo=True, dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False,
        )
        bundle.add_artifact("model.onnx", "onnx", "fp32")
    bundle.save()
    return root


@pytest.fixture(scope="session")
def lenet_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic bundle (do not modify: use ``lenet_bundle``)."""
    return make_lenet_bundle(tmp_path_factory.mktemp("runtime") / "lenet")


@pytest.fixture
def lenet_bundle(lenet_master: Path, tmp_path: Path) -> Path:
    """A writable copy of the synthetic lenet5 bundle with model.pt and model.onnx."""
    return Path(shutil.copytree(lenet_master, tmp_path / "lenet"))


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
