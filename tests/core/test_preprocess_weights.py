"""The preprocessing recorded from pretrained weights (center_crop) gives what the weights' own
transforms give, through kiln.processing (what eval, export verification, predict and serve call)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.bundle import Preprocess
from kiln.processing import preprocess

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("weights_name,size", [("ResNet50_Weights.IMAGENET1K_V2", (300, 200)),
                                              ("ResNet18_Weights.IMAGENET1K_V1", (180, 260)),
                                              ("ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1", (500, 400))])
def test_center_crop_matches_torchvision_transforms(weights_name: str, size: tuple[int, int]) -> None:
    from PIL import Image

    from kiln.models.pretrained import torchvision_preprocess

    weights = torchvision.models.get_weight(weights_name)
    spec = torchvision_preprocess(weights)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    ours, boxes = preprocess([img], spec)
    theirs = weights.transforms()(img).numpy()
    assert ours.shape[1:] == theirs.shape
    assert np.abs(ours[0] - theirs).max() < 2e-2  # PIL vs torchvision rounding of the resize only
    assert np.abs(ours[0] - theirs).mean() < 1e-3
    # the crop offset is kept: a point of the input maps back to the original image
    lb = boxes[0]
    assert lb.pad_x <= 0 and lb.pad_y <= 0


def test_old_preprocess_still_loads() -> None:
    old = {"mode": "resize", "size": [28, 28], "channels": "L", "mean": [0.5], "std": [0.5], "pad_value": 114,
           "interpolation": "bilinear"}
    spec = Preprocess.model_validate(old)
    assert spec.resize_size is None and spec.source is None
