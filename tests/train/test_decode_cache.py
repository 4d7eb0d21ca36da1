"""The decode cache of folder sets holds each file decoded as training decodes it (a camera-size JPEG at the
DCT scale its input size takes), so a small photo set is decoded once per run and its mean/std come from
that same pass; what training sees equals what kiln.processing computes for serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln import processing
from kiln.bundle import Preprocess
from kiln.data import open_dataset
from kiln.data.dataset import dct_scale
from kiln.processing import ORIENTATION_TAG, displayed_size, load_image, source_size, to_unit
from kiln.train.config import TrainConfig
from kiln.train.resolve import resolve_settings
from kiln.train.stats import channel_stats

from .photos import photos


def _large_jpegs(root: Path, per_class: int = 4) -> str:
    """Two classes of 1200x960 JPEGs (crops of scikit-learn's sample photos, enlarged as a camera's are)."""
    pics = photos()
    rng = np.random.default_rng(0)
    for cls, name in (("china", "china.jpg"), ("flower", "flower.jpg")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            y, x = int(rng.integers(0, 100)), int(rng.integers(0, 200))
            crop = Image.fromarray(pics[name][y:y + 300,
                                              x:x + 375]).resize((1200, 960), Image.Resampling.BILINEAR)
            crop.save(root / cls / f"{i}.jpg", quality=90)
    return f"folder:{root}"


def test_photo_folder_is_decoded_once_at_the_training_scale_and_stats_come_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _large_jpegs(tmp_path / "set")
    calls: list[tuple[int, int]] = []
    real = processing.decode

    def counting(img: Image.Image, spec: Preprocess | None = None, where: str = "") -> Image.Image:
        out = real(img, spec, where)
        calls.append(out.size)
        return out

    monkeypatch.setattr(processing, "decode", counting)
    train, val = open_dataset(data)
    cfg = TrainConfig(data=data, model="resnet18", out=str(tmp_path / "run"))
    s = resolve_settings(cfg, train)
    train_ds, val_ds = s.task.torch_datasets(s.cfg, train, val, s.pre)
    assert s.pre.size == (224, 224)  # the data's side, bounded: 960 px photos need a 1/2-scale decode
    assert len(calls) == len(train) + len(val) == 8  # one decode per file: check, cache, mean/std, tensors
    assert set(calls) == {(600, 480)}  # at the DCT scale (1/2), never in full
    monkeypatch.setattr(processing, "decode", real)

    base = s.pre.model_copy(update={"mean": [0.0], "std": [1.0]})
    fresh = [to_unit(load_image(str(p), spec=s.pre), base)[0] for p in train.images]
    assert (s.pre.mean, s.pre.std) == channel_stats(fresh)  # the stats of what training feeds the model
    for i, path in enumerate(val.images):  # the cached tensors are what serving computes from the file
        served = to_unit(load_image(str(path), spec=s.pre), s.pre)[0]
        assert val_ds.cached is not None
        assert np.array_equal(val_ds.cached[i].numpy(), np.rint(served * 255).astype(np.uint8))


def test_a_spec_with_another_scale_decodes_the_file_again(tmp_path: Path) -> None:
    data = _large_jpegs(tmp_path / "set", per_class=2)
    train, _ = open_dataset(data)
    small = Preprocess(mode="resize", size=(112, 112), channels="RGB", mean=[0.0] * 3, std=[1.0] * 3)
    assert train.cache_fits(0,
                            Preprocess(mode="resize", size=(224, 224), channels="RGB", mean=[0.0] * 3,
                                       std=[1.0] * 3))
    assert not train.cache_fits(0, small) and not train.cache_fits(0, None)
    assert np.array_equal(np.asarray(train.image(0, small)),
                          np.asarray(load_image(str(train.images[0]), spec=small)))
    assert np.array_equal(np.asarray(train.image(0)), np.asarray(load_image(str(train.images[0]))))


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize(("stored", "spec"), [
    ((1920, 1080), Preprocess(mode="resize", size=(224, 224), channels="RGB", mean=[0.0] * 3, std=[1.0] * 3)),
    ((1920, 1080), Preprocess(mode="resize", size=(64, 64), channels="RGB", mean=[0.0] * 3, std=[1.0] * 3)),
    ((4000, 900),
     Preprocess(mode="letterbox", size=(320, 320), channels="RGB", mean=[0.0] * 3, std=[1.0] * 3)),
    ((1000, 1000), Preprocess(mode="center_crop", size=(224, 224), resize_size=256, channels="RGB",
                              mean=[0.0] * 3, std=[1.0] * 3)),
    ((3000, 2000), Preprocess(mode="resize", size=(32, 32), channels="RGB", mean=[0.0] * 3, std=[1.0] * 3,
                              decode="full")),
])
def test_dct_scale_is_the_scale_decode_takes(tmp_path: Path, stored: tuple[int, int], spec: Preprocess,
                                             orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    path = tmp_path / "photo.jpg"
    Image.new("RGB", stored, (90, 120, 30)).save(path, quality=80, exif=exif)
    with Image.open(path) as im:
        shown = displayed_size(im)
    assert dct_scale(spec, shown) == source_size(load_image(str(path), spec=spec))[2]
