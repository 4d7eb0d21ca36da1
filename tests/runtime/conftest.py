"""Runtime fixtures: small synthetic bundles (random weights, model.pt + kiln.json + ONNX): lenet5
for classification, kiln-det-s at 64x64 for detection (two outputs).

Built once per session without a dataset or training, so the runtime tests do not depend on the
train stage; tests copy it before changing anything.
"""

from __future__ import annotations

import shutil
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from tests.runtime import fakes as fake_modules

NUM_CLASSES = 10


def make_lenet_bundle(root: Path, *, onnx: bool = True) -> Path:
    import torch

    from kiln.models import build_model

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
        # The TorchScript exporter: 0.3 s against 5-18 s for dynamo on this 2-core machine; the graph
        # is the same for lenet5 (dynamo export is covered by the export stage's tests).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.randn(2, 1, 28, 28),), root / "model.onnx", input_names=["images"],
                output_names=["logits"], dynamo=False,
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
        bundle.add_artifact("model.onnx", "onnx", "fp32")
    bundle.save()
    return root


def make_detector_bundle(root: Path) -> Path:
    import torch

    from kiln.models import build_model
    from kiln.train.tasks import make_task

    torch.manual_seed(0)
    arch = Architecture(name="kiln-det-s", args={"num_classes": 3, "in_channels": 3, "image_size": 64})
    model = build_model(arch).eval()
    task = make_task("detect", 3)
    outputs = task.outputs(model, 3)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), root / "model.pt")
    manifest = Manifest(
        kiln_version="test", task="detect", classes=["a", "b", "c"],
        input=InputSpec(name="images", shape=[3, 64, 64], batch=BatchRange(min=1, opt=2, max=4)),
        outputs=outputs, postprocess=task.postprocess(), architecture=arch,
        preprocess=Preprocess(mode="letterbox", size=(64, 64), mean=[0.5] * 3, std=[0.25] * 3),
    )
    bundle = Bundle(root, manifest)
    bundle.add_artifact("model.pt", "torch", "fp32")
    names = ["images", *(o.name for o in outputs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 3, 64, 64),), root / "model.onnx", input_names=names[:1],
            output_names=names[1:],
            dynamo=False, dynamic_axes={n: {0: "batch"} for n in names},
        )
    bundle.add_artifact("model.onnx", "onnx", "fp32")
    bundle.save()
    return root


@pytest.fixture(scope="session")
def det_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic kiln-det-s bundle (do not modify)."""
    return make_detector_bundle(tmp_path_factory.mktemp("runtime") / "det")


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


@pytest.fixture(scope="session")
def fakes() -> types.ModuleType:
    """tests/runtime/fakes: ``fakes.install(monkeypatch, major=10|11, binding="cuda-python"|"pycuda")``."""
    return fake_modules
