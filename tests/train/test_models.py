import pytest
import torch

from kiln.bundle import Architecture
from kiln.errors import CheckpointError, ConfigError
from kiln.models import MODELS, build_model, load_weights, read_state_dict


@pytest.mark.parametrize("name", [n for n, e in MODELS.items() if e.task == "classify"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_classifiers_adapt_to_channels_and_classes(name: str, channels: int, size: int):
    model = build_model(Architecture(name=name, args={"num_classes": 7, "in_channels": channels, "image_size": size})).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, channels, size, size))
    assert out.shape == (2, 7)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        build_model(Architecture(name="resnet19"))


def test_weights_fine_tune_replaces_head(tmp_path):
    src = build_model(Architecture(name="lenet5", args={"num_classes": 10, "in_channels": 1, "image_size": 28}))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = build_model(Architecture(name="lenet5", args={"num_classes": 3, "in_channels": 1, "image_size": 28}))
    skipped = load_weights(dst, read_state_dict(tmp_path / "w.pt"), replace_head=True)
    assert skipped == ["classifier.5.weight", "classifier.5.bias"]
    assert torch.equal(dst.features[0].weight, src.features[0].weight)
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(dst, read_state_dict(tmp_path / "w.pt"))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a valid PyTorch file"):
        read_state_dict(tmp_path / "bad.pt")


def test_cli_model_names_match_the_registry():
    from kiln.train.config import MODEL_NAMES

    assert tuple(MODELS) == MODEL_NAMES
