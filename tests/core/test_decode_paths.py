"""One image decode for everything: a file gives the same model input through ``kiln predict``, eval,
training's folder loader, calibration and the server's image preparation, whatever its format, mode,
EXIF orientation or size."""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kiln import processing
from kiln.bundle import Architecture, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.runtime.base import BaseBackend
from tests.corpus import LARGEST, CorpusImage

SPEC = Preprocess(mode="resize", size=(32, 32), channels="RGB", mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])


class Recorder(BaseBackend):
    """Returns zeros and keeps every input batch it was given."""

    def __init__(self, bundle: Bundle) -> None:
        m = bundle.manifest
        self.name, self.inputs, self.outputs = "recorder", [m.input.model_copy()], list(m.outputs)
        self.min_batch, self.max_batch = 1, m.input.batch.max
        self.seen: list[np.ndarray] = []
        self.lock = threading.Lock()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["images"]
        with self.lock:
            self.seen.extend(np.array(row) for row in x)
        return {"logits": np.zeros((len(x), 2), np.float32)}

    def _close(self) -> None:
        pass


def odd_files(corpus: list[CorpusImage]) -> list[CorpusImage]:
    return [c for c in corpus if c.name != LARGEST]  # the 15 MB PNG adds time, not a new decode path


def folder_bundle(root: Path, files: list[CorpusImage]) -> Bundle:
    """A bundle trained (as kiln.json says) on a folder dataset whose two classes each hold every file."""
    data = root / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f.path, data / cls / f.name)
    bundle = Bundle(root / "bundle", Manifest(
        kiln_version="0.1.0", task="classify", classes=["a", "b"],
        input=InputSpec(name="images", shape=[3, 32, 32], batch={"min": 1, "opt": 8, "max": 64}),
        outputs=[TensorSpec(name="logits", shape=[2])], preprocess=SPEC, postprocess={"top_k": 1},
        architecture=Architecture(name="resnet18", args={"num_classes": 2}),
        training={"data": f"folder:{data}", "val_fraction": 0.5, "seed": 0},
    ))
    bundle.root.mkdir()
    bundle.save()
    return bundle


def expected(data: bytes, spec: Preprocess = SPEC) -> np.ndarray:
    x, _ = processing.preprocess([processing.decode_image(data, spec=spec)], spec)
    return x[0]


def test_rgba_png_with_exif_orientation_is_upright_on_every_path() -> None:
    stored = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    stored.paste((0, 0, 255, 128), (20, 0, 40, 20))  # right half half-transparent blue
    exif = Image.Exif()
    exif[processing.ORIENTATION_TAG] = 6
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif.tobytes())
    data = buf.getvalue()
    img = processing.decode_image(data)
    assert img.size == (20, 40) and img.mode == "RGB"
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert tuple(top) == (255, 0, 0)
    assert tuple(bottom) == (0, 0, 128)  # alpha over black: 128/255 of the blue


def test_one_file_gives_identical_tensors_on_every_path(tmp_path: Path, corpus: list[CorpusImage],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from kiln import cli, runtime
    from kiln.calib.data import CalibrationReader
    from kiln.evaluate import bundle_split, run_split
    from kiln.serve.images import decode_preprocess, open_images
    from kiln.train.tasks import ClassifyDataset

    files = odd_files(corpus)
    bundle = folder_bundle(tmp_path, files)
    want = {f.name: expected(f.data) for f in files}

    # kiln predict, through its command line
    recorders: list[Recorder] = []
    monkeypatch.setattr(runtime, "load", lambda b, **_: recorders.append(Recorder(b)) or recorders[-1])
    assert cli.main(["predict", str(bundle.root), *[str(f.path) for f in files], "--json"]) == 0
    order = [Path(p["image"]).name for p in json.loads(capsys.readouterr().out)["predictions"]]
    got = dict(zip(order, recorders[0].seen, strict=True))
    for f in files:
        np.testing.assert_array_equal(got[f.name], want[f.name], err_msg=f"kiln predict: {f.name}")

    # kiln eval's split runner and training's dataset, over the folder dataset
    val = bundle_split(bundle, "val")
    rec = Recorder(bundle)
    run_split(bundle, rec, val)
    train = bundle_split(bundle, "train")
    train_set = ClassifyDataset(train, SPEC, augment=None)
    for ds, seen, where in ((val, rec.seen, "eval"),
                            (train, [train_set[i][0].numpy() for i in range(len(train))], "training")):
        for path, x in zip(ds.images, seen, strict=True):
            np.testing.assert_allclose(x, want[Path(path).name], rtol=0, atol=1e-6,
                                       err_msg=f"{where}: {path}")

    # calibration draws from the train split through the same decode
    calib = CalibrationReader.from_bundle(bundle, count=len(train))
    for path, x in zip(train.images, calib.images, strict=True):
        np.testing.assert_array_equal(x, want[Path(path).name], err_msg=f"calibration: {path}")

    # the server's image preparation (every protocol's encoded images go through it)
    for f in files:
        x, _ = decode_preprocess(open_images([f.data], 10**8, 10**8), SPEC)
        np.testing.assert_array_equal(x[0], want[f.name], err_msg=f"serving: {f.name}")


@pytest.mark.parametrize("mode", ["resize", "letterbox", "center_crop"])
def test_jpeg_is_decoded_at_a_dct_scale_that_covers_the_input(corpus: list[CorpusImage], mode: str) -> None:
    (hd,) = [c for c in corpus if c.name == "phone-exif6-1920.jpg"]  # 1080x1920 as displayed
    spec = Preprocess(mode=mode, size=(224, 224), mean=[0, 0, 0], std=[1, 1, 1], resize_size=256)
    fast = processing.decode_image(hd.data, spec=spec)
    full = processing.decode_image(hd.data, spec=spec.model_copy(update={"decode": "full"}))
    assert full.size == hd.size
    assert fast.width < full.width and fast.height < full.height  # downscaled in the DCT domain
    need = processing.covering_size(spec, hd.size)
    assert fast.width >= need[0] and fast.height >= need[1]  # but never below what the input needs
    want = (need[0] * processing.DRAFT_MARGIN, need[1] * processing.DRAFT_MARGIN)
    assert fast.width >= want[0] and fast.height >= want[1]  # with the margin that keeps answers unchanged
    scale = round(full.width / fast.width)
    assert scale == 8 or -(-full.width // (2 * scale)) < want[0] or -(-full.height // (2 * scale)) < want[1]
    xf, bf = processing.to_unit(fast, spec)
    xs, bs = processing.to_unit(full, spec)
    assert np.abs(xf - xs).mean() < 3 / 255  # the same picture
    # the placement maps to the file's pixels, so boxes and sizes answer in the file's coordinates
    assert (bf.width, bf.height) == (bs.width, bs.height) == hd.size
    assert bf.scale_x == pytest.approx(bs.scale_x, rel=0.01) and bf.scale_y == pytest.approx(
        bs.scale_y, rel=0.01
    )
    assert (bf.pad_x, bf.pad_y) == pytest.approx((bs.pad_x, bs.pad_y), abs=1)


def test_png_and_webp_decode_in_full_whatever_the_mode(corpus: list[CorpusImage]) -> None:
    for f in corpus:
        if f.name.endswith((".png", ".webp")) and f.name != LARGEST:
            img = processing.decode_image(f.data, spec=SPEC)
            assert img.size == f.size and img.mode in ("L", "RGB"), f.name
            assert processing.SOURCE_SIZE not in img.info, f.name


def test_16_bit_png_is_scaled_to_8_bit_not_clipped() -> None:
    levels = np.array([[0, 1, 128, 200, 255]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(levels * 257).save(buf, format="PNG")  # 16-bit: 0, 257, ..., 65535
    img = processing.decode_image(buf.getvalue())
    assert img.mode == "L" and np.asarray(img).tolist() == levels.tolist()


def test_bundle_without_a_decode_mode_reads_as_full_decode(tmp_path: Path) -> None:
    bundle = folder_bundle(tmp_path, [])
    assert bundle.manifest.preprocess.decode == "draft"  # new recipes take the fast decode
    raw = json.loads((bundle.root / "kiln.json").read_text())
    assert raw["preprocess"]["decode"] == "draft"
    del raw["preprocess"]["decode"]
    raw["schema_version"] = 1  # as kiln.json was written before decode modes existed
    (bundle.root / "kiln.json").write_text(json.dumps(raw))
    assert Bundle.load(bundle.root).manifest.preprocess.decode == "full"  # what its accuracy was measured on


def test_drawn_boxes_land_on_the_file_pixels_of_a_downscaled_decode() -> None:
    from kiln.draw import class_color, render

    buf = io.BytesIO()
    Image.new("RGB", (1920, 1080), (128, 128, 128)).save(buf, format="JPEG")
    spec = Preprocess(mode="letterbox", size=(64, 64), mean=[0, 0, 0], std=[1, 1, 1])
    small = processing.decode_image(buf.getvalue(), spec=spec)
    assert small.width < 1920
    res: dict[str,
              Any] = {"boxes": [{"box": [960.0, 540.0, 1800.0, 1000.0], "label": "x", "index": 0,
                                 "score": 0.9}]}
    canvas = np.asarray(render(small, res))
    ys, xs = np.nonzero((canvas == np.asarray(class_color(0), np.uint8)).all(axis=2))
    zoom = canvas.shape[1] / 1920
    assert abs(xs.max() - 1800 * zoom) <= 3 and abs(ys.max() - 1000 * zoom) <= 3
