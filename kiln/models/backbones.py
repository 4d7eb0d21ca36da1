"""torchvision ImageNet classifiers as detector backbones: their stride 8, 16 and 32 feature maps.

The classifier is kept whole (less its pooling and classification layers) under ``net``, so its
pretrained state dict loads into it key for key (:func:`load_classifier_weights`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn

from kiln.errors import CheckpointError, ConfigError

STRIDES = (8, 16, 32)


def adapt_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first 3-channel convolution (the stem of any torchvision classifier) by one taking
    ``in_channels``: grayscale datasets then train without converting every image to RGB."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(in_channels, module.out_channels,
                             module.kernel_size, module.stride,  # type: ignore[arg-type]
                             module.padding, module.dilation, module.groups,  # type: ignore[arg-type]
                             module.bias is not None)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, conv)
            return model
    raise ConfigError(
        f"cannot adapt {type(model).__name__} to {in_channels} input channel(s): no "
        "3-channel convolution found")


class TorchvisionBackbone(nn.Module):
    """A resnet (``layer2..4``) or a ``features``-style network (mobilenet, efficientnet: the last block
    at each stride, found by running the blocks once on a small input) returning ``p3, p4, p5``."""

    def __init__(self, arch: str, in_channels: int = 3) -> None:
        super().__init__()
        self.arch = arch
        net = torchvision.models.get_model(arch, weights=None)
        if in_channels != 3:
            adapt_in_channels(net, in_channels)
        self.is_resnet = hasattr(net, "layer4")
        if self.is_resnet:
            net.fc = nn.Identity()
        elif hasattr(net, "features"):
            net.classifier = nn.Identity()
        else:
            raise ConfigError(
                f"{arch} cannot serve as a detector backbone (neither a resnet nor a features network)")
        self.net = net
        self.taps = self._find_taps(in_channels)
        with torch.no_grad():
            self.out_channels = [
                int(f.shape[1]) for f in self.forward(torch.zeros(1, in_channels, 64, 64)).values()]

    def _find_taps(self, in_channels: int) -> list[int]:
        if self.is_resnet:
            return []
        x, size, last = torch.zeros(1, in_channels, 64, 64), 64, {}
        was = self.net.training
        self.net.eval()
        with torch.no_grad():
            for i, block in enumerate(self.net.features):
                x = block(x)
                last[size // x.shape[-1]] = i
        self.net.train(was)
        if any(s not in last for s in STRIDES):
            raise ConfigError(f"{self.arch}: no feature maps at strides {STRIDES} (found {sorted(last)})")
        return [last[s] for s in STRIDES]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        n = self.net
        if self.is_resnet:
            x = n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x)))))
            c3 = n.layer2(x)
            c4 = n.layer3(c3)
            return OrderedDict([("p3", c3), ("p4", c4), ("p5", n.layer4(c4))])
        outs = []
        for i, block in enumerate(n.features[: self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                outs.append(x)
        return OrderedDict(zip(("p3", "p4", "p5"), outs, strict=True))


def load_classifier_weights(backbone: TorchvisionBackbone, state: dict[str, torch.Tensor]) -> None:
    """Load an ImageNet classifier's state dict into ``backbone.net`` (its classification layers are
    left out)."""
    head = ("fc.",) if backbone.is_resnet else ("classifier.",)
    missing, unexpected = backbone.net.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(head)}, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(f"weights do not fit the {backbone.arch} backbone: {first} is "
                              f"{'missing from the file' if missing else 'not in the model'}")


__all__ = ["TorchvisionBackbone", "adapt_in_channels", "load_classifier_weights"]
