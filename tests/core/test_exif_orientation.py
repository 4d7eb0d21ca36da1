"""Images are seen as displayed: EXIF Orientation is applied when files are read (predict, eval,
datasets), as the server does with uploads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kiln.data import open_dataset
from kiln.processing import ORIENTATION_TAG, displayed_size, load_image


def sideways_jpeg(path: Path, orientation: int = 6) -> Path:
    """Stored 40x20, red on the left and blue on the right; Orientation 6 displays it turned 90 degrees
    clockwise: 20x40, red on top."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif)
    return path


def test_load_image_applies_orientation_6(tmp_path: Path) -> None:
    img = load_image(str(sideways_jpeg(tmp_path / "photo.jpg")))
    assert img.size == (20, 40) and img.mode == "RGB"
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red
    assert bottom[2] > 200 and bottom[0] < 60  # blue


def test_upright_and_untagged_images_are_unchanged(tmp_path: Path) -> None:
    sideways_jpeg(tmp_path / "upright.jpg", orientation=1)
    Image.new("L", (30, 10), 7).save(tmp_path / "plain.png")
    assert load_image(str(tmp_path / "upright.jpg")).size == (40, 20)
    plain = load_image(str(tmp_path / "plain.png"))
    assert plain.size == (30, 10) and plain.mode == "L"


def test_displayed_size_reads_the_header(tmp_path: Path) -> None:
    with Image.open(sideways_jpeg(tmp_path / "photo.jpg")) as pil:
        assert displayed_size(pil) == (20, 40)
    with Image.open(sideways_jpeg(tmp_path / "upright.jpg", orientation=1)) as pil:
        assert displayed_size(pil) == (40, 20)


def test_folder_dataset_sees_the_displayed_image(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(3):
            sideways_jpeg(tmp_path / "f" / c / f"{i}.jpg")
    train, val = open_dataset(f"folder:{tmp_path / 'f'}", val_fraction=0.5, seed=0)
    assert train.image(0).size == (20, 40) and val.image(0).size == (20, 40)
