"""Small real-photo sets with the defaults: they train, the chance guard fires when nothing can be learned,
and BatchNorm statistics are re-estimated on the training images before validation (precise-BN).

The full check over several models is tests/perf/bench_photos_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.train.config import TrainConfig
from kiln.train.loop import Trainer, train

from .photos import write_photo_crops


def _crops(root: Path, shuffle: bool = False) -> str:
    write_photo_crops(root, per_class=30, size=32, shuffle_labels=shuffle, extra_photos=False)
    return f"folder:{root}"


def test_small_photo_set_trains_past_90_with_the_defaults(tmp_path: Path) -> None:
    data = _crops(tmp_path / "photos")
    result, trainer = train(TrainConfig(data=data, epochs=8, out=str(tmp_path / "run")), progress=False)
    assert trainer.pre.size == (32, 32) and trainer.batch_size == 8  # from the data: 32 px crops, 96 images
    assert result.best["top1"] >= 90.0, result.history
    assert not any("sits at chance" in w for w in result.warnings)
    training = json.loads((tmp_path / "run" / "kiln.json").read_text())["training"]
    assert (
        training["parameters"] == sum(p.numel() for p in trainer.model.parameters())
        and training["gflops"] > 0
    )
    assert "top5" not in result.best  # 4 classes: top-5 would be 100% by definition
    assert (tmp_path / "run" / "curves.png").is_file() and result.files["curves"].endswith("curves.png")


def test_chance_guard_fires_on_shuffled_labels(tmp_path: Path) -> None:
    data = _crops(tmp_path / "shuffled", shuffle=True)
    result, _ = train(TrainConfig(data=data, epochs=4, out=str(tmp_path / "run")), progress=False)
    warning = next(w for w in result.warnings if "sits at chance" in w)
    assert "kiln data inspect" in warning and "--pretrained" in warning


def _two_colour_set(root: Path) -> str:
    """Red and blue noisy squares, filed class by class: within a class the colour barely varies."""
    rng = np.random.default_rng(0)
    for name, colour in (("blue", (20, 20, 230)), ("red", (230, 20, 20))):
        (root / name).mkdir(parents=True)
        for i in range(40):
            px = np.clip(np.array(colour) + rng.normal(0, 8, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")
    return f"folder:{root}"


def test_precise_bn_sets_statistics_of_the_whole_sample_not_of_one_class(tmp_path: Path) -> None:
    cfg = TrainConfig(data=_two_colour_set(tmp_path / "set"), model="resnet18", epochs=1, batch_size=8,
                      out=str(tmp_path / "run"))
    trainer = Trainer(cfg, progress=False)
    bn = trainer.model.bn1
    bn.running_mean.fill_(5.0)
    trainer._precise_bn()
    assert trainer.bn_batches is not None
    with torch.no_grad():
        images = torch.cat([x for x, _ in trainer.bn_batches])
        feats = trainer.model.conv1(images)  # what bn1 normalizes
    mean = feats.mean(dim=(0, 2, 3))
    var = feats.var(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, mean, atol=1e-4)
    # batches of one class would give the within-class variance, a small part of the whole
    assert torch.allclose(bn.running_var, var, rtol=0.25, atol=1e-4)


def test_precise_bn_off_keeps_the_running_statistics(tmp_path: Path) -> None:
    cfg = TrainConfig(data=_two_colour_set(tmp_path / "set"), model="resnet18", epochs=1, precise_bn=False,
                      out=str(tmp_path / "run"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.bn_batches is None
    trainer.model.bn1.running_mean.fill_(5.0)
    trainer._precise_bn()
    assert float(trainer.model.bn1.running_mean[0]) == pytest.approx(5.0)


def test_small_folder_set_is_decoded_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln import processing

    data = _two_colour_set(tmp_path / "set")  # 80 files
    calls: list[int] = []
    real = processing.decode

    def counting(img: Image.Image, *args: object, **kwargs: object) -> Image.Image:
        calls.append(1)
        return real(img, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(processing, "decode", counting)
    result, trainer = train(TrainConfig(data=data, epochs=2, out=str(tmp_path / "run")), progress=False)
    assert len(calls) == 80  # the checking pass; mean/std, epochs and eval reuse it
    assert trainer.workers == 0  # held in memory: no worker processes
    calls.clear()
    monkeypatch.setenv("KILN_DECODE_CACHE_MB", "0")  # over the budget: files are read again when needed
    train(TrainConfig(data=data, epochs=2, out=str(tmp_path / "run2")), progress=False)
    assert len(calls) > 80
