import pytest
import torch

from kiln.bundle import Architecture
from kiln.errors import CheckpointError, ConfigError
from kiln.models import (
    MODELS,
    build_model,
    load_weights,
    model_cost,
    read_state_dict,
    torchvision_classifiers,
)


@pytest.mark.parametrize("name", [n for n, e in MODELS.items() if e.task == "classify"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_classifiers_adapt_to_channels_and_classes(name: str, channels: int, size: int):
    model = build_model(Architecture(name=name,
                                     args={"num_classes": 7, "in_channels": channels,
                                           "image_size": size})).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, channels, size, size))
    assert out.shape == (2, 7)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        build_model(Architecture(name="resnet19"))


def test_weights_fine_tune_replaces_head(tmp_path):
    src = build_model(Architecture(name="lenet5",
                                   args={"num_classes": 10, "in_channels": 1, "image_size": 28}))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = build_model(Architecture(name="lenet5",
                                   args={"num_classes": 3, "in_channels": 1, "image_size": 28}))
    skipped = load_weights(dst, read_state_dict(tmp_path / "w.pt"), replace_head=True)
    assert skipped == ["classifier.5.weight", "classifier.5.bias"]
    assert torch.equal(dst.features[0].weight, src.features[0].weight)
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(dst, read_state_dict(tmp_path / "w.pt"))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a valid PyTorch file"):
        read_state_dict(tmp_path / "bad.pt")


def test_cli_model_names_match_the_registry():
    from kiln.train.config import MODEL_NAMES, TORCHVISION_CLASSIFIERS

    assert tuple(MODELS) == MODEL_NAMES
    assert list(TORCHVISION_CLASSIFIERS) == torchvision_classifiers()


# ---- any torchvision classifier, timm, pretrained weights (no network: the caches are pre-filled) ----

import os  # noqa: E402
import urllib.error  # noqa: E402

import torchvision  # noqa: E402

from kiln.models import load_pretrained, model_entry  # noqa: E402
from kiln.models.pretrained import torchvision_preprocess, torchvision_weights  # noqa: E402


def _arch(name: str, classes: int = 5, size: int = 224, channels: int = 3) -> Architecture:
    return Architecture(name=name, args={"num_classes": classes, "in_channels": channels, "image_size": size})


@pytest.mark.parametrize("name", ["regnet_y_400mf", "efficientnet_b0"])
def test_any_torchvision_classifier_by_name(name: str) -> None:
    model = build_model(_arch(name, 4, 64, channels=1)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 4)


def test_unknown_architecture_names_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"Nearest: .*convnext_tiny") as err:
        model_entry("convnext_tinyy")
    assert "\n" not in str(err.value)


def _fill_torch_cache(tmp_path, monkeypatch, weights) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Put a random-init checkpoint where torch.hub looks for ``weights`` (what a download would write)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.get_model(weights.__class__.__name__.removesuffix("_Weights").lower(),
                                         weights=None).state_dict()
    torch.save(state, folder / os.path.basename(weights.url))
    return state


def _no_network(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def refuse(url: str, *_a, **_k) -> None:  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_pretrained_from_the_torch_cache_replaces_the_head(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _no_network(monkeypatch)
    weights = torchvision_weights("resnet50", "IMAGENET1K_V2")
    state = _fill_torch_cache(tmp_path, monkeypatch, weights)
    model = build_model(_arch("resnet50", 5))
    pre, fresh = load_pretrained(model, _arch("resnet50", 5), "IMAGENET1K_V2")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])  # first layer straight from the file
    assert fresh == ["fc.weight", "fc.bias"] and model.fc.weight.shape == (5, 2048)
    t = weights.transforms()  # kiln.json records exactly the weights' own recipe
    assert (pre.mode, pre.size, pre.resize_size, pre.interpolation) == (
        "center_crop",
        (224, 224),
        t.resize_size[0],
        t.interpolation.value,
    )
    assert pre.mean == pytest.approx(t.mean) and pre.std == pytest.approx(t.std) and t.resize_size[0] == 232
    assert pre == torchvision_preprocess(weights)


def test_pretrained_offline_error_names_file_and_folder(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _no_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(build_model(_arch("resnet18", 3)), _arch("resnet18", 3), True)
    msg = str(err.value)
    assert (
        "resnet18-f37072fd.pth" in msg
        and str(tmp_path / "empty" / "hub" / "checkpoints") in msg
        and "\n" not in msg
    )


def test_pretrained_bad_requests_are_one_line() -> None:
    with pytest.raises(ConfigError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        torchvision_weights("resnet50", "IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="lenet5 has no pretrained weights"):
        load_pretrained(build_model(_arch("lenet5", 3, 28, 1)), _arch("lenet5", 3, 28, 1), True)


def test_downloaded_checkpoint_as_weights_and_another_architecture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "resnet18-f37072fd.pth")  # a torchvision download, as is
    model = build_model(_arch("resnet18", 7))
    assert load_weights(model, read_state_dict(tmp_path / "resnet18-f37072fd.pth"), replace_head=True) == [
        "fc.weight",
        "fc.bias",
    ]
    assert torch.equal(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    with pytest.raises(CheckpointError,
                       match=r"^weights do not fit the model: layer1.0.conv1.weight has shape") as err:
        load_weights(build_model(_arch("resnet50", 7)), read_state_dict(tmp_path / "resnet18-f37072fd.pth"),
                     replace_head=True)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="the file has conv1.weight, which the model does not"):
        load_weights(build_model(_arch("mobilenet_v3_small", 7)),
                     read_state_dict(tmp_path / "resnet18-f37072fd.pth"), replace_head=True)


def test_timm_model_pretrained_through_its_cache(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    timm = pytest.importorskip("timm")
    import timm.models._builder as builder

    name = "timm:mobilenetv3_small_050"
    reference = timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict()
    monkeypatch.setattr(builder, "load_state_dict_from_hf", lambda *a, **k: dict(reference))
    model = build_model(_arch(name, 3))
    pre, fresh = load_pretrained(model, _arch(name, 3), True)
    assert torch.equal(model.conv_stem.weight, reference["conv_stem.weight"])
    assert set(fresh) == {"classifier.weight", "classifier.bias"}
    cfg = timm.data.resolve_data_config({}, model=model)
    assert (
        pre.size == cfg["input_size"][1:]
        and pre.interpolation == cfg["interpolation"]
        and pre.mean == pytest.approx(cfg["mean"])
    )

    def offline(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    with pytest.raises(CheckpointError,
                       match=r"model.safetensors of https://huggingface.co/timm/mobilenetv3_small_050"):
        load_pretrained(build_model(_arch(name, 3)), _arch(name, 3), True)
    with pytest.raises(ConfigError, match=r"Nearest: .*timm:mobilenetv3_small_050"):
        model_entry("timm:mobilenetv3_small_05")


def test_model_cost_counts_parameters_and_multiply_adds_as_torchvision_does():
    import torchvision

    model = torchvision.models.resnet18()
    cost = model_cost(model.train(), (3, 224, 224))
    assert cost["parameters"] == 11_689_512  # torchvision's table: 11.7M, 1.81 GFLOPS
    assert cost["gflops"] == pytest.approx(1.81, abs=0.02)
    assert model.training  # the mode is restored


def test_missing_pretrained_file_fails_before_the_dataset_is_read(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kiln.train import loop
    from kiln.train.config import TrainConfig

    _no_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the dataset was read before the weights were checked")

    monkeypatch.setattr(loop, "open_dataset", never)
    with pytest.raises(CheckpointError, match="resnet18-f37072fd.pth"):
        loop.Trainer(TrainConfig(model="resnet18", pretrained="DEFAULT", out=str(tmp_path / "r")),
                     progress=False)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        loop.Trainer(TrainConfig(model="lenet5", pretrained="DEFAULT", out=str(tmp_path / "r")),
                     progress=False)
