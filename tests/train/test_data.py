import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.data import DataSpec, open_dataset
from kiln.data.classify import read_idx
from kiln.errors import ConfigError, DatasetError


def test_digits_split_is_fixed_and_stratified():
    tr, va = open_dataset("digits", val_fraction=0.2, seed=0)
    tr2, va2 = open_dataset("digits", val_fraction=0.2, seed=0)
    assert len(tr) + len(va) == 1797 and abs(len(va) - 360) < 10
    assert va.targets == va2.targets and np.array_equal(va.images, va2.images)
    assert set(va.targets) == set(range(10))
    assert va.image(0).mode == "L" and va.image(0).size == (8, 8)


def test_unknown_dataset_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'digits'"):
        DataSpec.parse("digit")
    with pytest.raises(DatasetError, match="mnist:DIR"):
        DataSpec.parse("mnist")


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path: Path, gz: bool):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 8)):
        for kind, arr in (("images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28))),
                          ("labels-idx1-ubyte", rng.integers(0, 10, n))):
            data = _idx(arr)
            path = tmp_path / f"{prefix}-{kind}"
            if gz:
                with gzip.open(str(path) + ".gz", "wb") as fh:
                    fh.write(data)
            else:
                path.write_bytes(data)
    tr, va = open_dataset(f"mnist:{tmp_path}")
    assert len(tr) == 20 and len(va) == 8 and tr.native_size == (28, 28)
    assert read_idx(next(tmp_path.glob("train-images*"))).shape == (20, 28, 28)


def test_mnist_missing_file_says_where(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.*no download"):
        open_dataset(f"mnist:{tmp_path}")


def test_cifar10_batches(tmp_path: Path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": list(range(4))},
                        fh)
    tr, va = open_dataset(f"cifar10:{tmp_path}")
    assert len(tr) == 20 and len(va) == 4 and tr.classes[3] == "c3"
    assert tr.image(0).mode == "RGB" and tr.image(0).size == (32, 32)


def _folder(root: Path, n: int = 6) -> None:
    for c, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 16), colour).save(root / c / f"{i}.png")


def test_folder_split_and_train_val(tmp_path: Path):
    _folder(tmp_path / "one")
    tr, va = open_dataset(f"folder:{tmp_path / 'one'}", val_fraction=0.5, seed=3)
    assert tr.classes == ["cat", "dog"] and len(tr) + len(va) == 12 and len(va) == 6
    _folder(tmp_path / "two" / "train")
    _folder(tmp_path / "two" / "val", 2)
    tr, va = open_dataset(f"folder:{tmp_path / 'two'}")
    assert len(tr) == 12 and len(va) == 4 and tr.channels == "RGB"


def test_folder_bad_image_reported_or_skipped(tmp_path: Path):
    _folder(tmp_path)
    bad = tmp_path / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png.*--skip-bad-images"):
        open_dataset(f"folder:{tmp_path}")
    tr, va = open_dataset(f"folder:{tmp_path}", skip_bad_images=True)
    assert len(tr) + len(va) == 12
