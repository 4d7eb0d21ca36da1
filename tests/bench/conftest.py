"""Bench fixtures: an untrained LeNet-5 bundle (model.pt + model.onnx), built once per session.

Latency does not depend on the weights, so no training is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from kiln import __version__
    from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
    from kiln.export.torch2onnx import torch2onnx
    from kiln.models import build_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench") / "tiny"
    root.mkdir()
    arch = Architecture(name="lenet5", args={"num_classes": 3, "in_channels": 1, "image_size": 28})
    manifest = Manifest(
        kiln_version=__version__,
        task="classify",
        classes=["a", "b", "c"],
        input=InputSpec(name="images", shape=[1, 28, 28], batch=BatchRange(min=1, opt=2, max=4)),
        outputs=[TensorSpec(name="logits", shape=[3])],
        preprocess=Preprocess(size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
        postprocess={"top_k": 2},
        architecture=arch,
    )
    torch.manual_seed(0)
    model = build_model(arch)
    torch.save(model.state_dict(), root / "model.pt")
    bundle = Bundle(root, manifest)
    bundle.add_artifact("model.pt", "torch", "fp32")
    bundle.save()
    torch2onnx(bundle, root / "model.onnx", batch=manifest.input.batch, simplify=False)
    bundle.add_artifact("model.onnx", "onnx", "fp32")
    bundle.save()
    return root

