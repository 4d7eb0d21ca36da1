"""Photo decode: speed of the DCT-scaled JPEG decode against the full decode, and whether it changes a
classifier's answers. Not collected by pytest.

    .venv/bin/python tests/perf/bench_decode.py [--repeat 50] [--variants 12] [--json out.json]

1. time, single-threaded, median of ``--repeat`` after warm-up, of a 1920x1080 camera JPEG (real photo
   content, ~0.5 MB) to a 224x224 model input (decode + EXIF + one resize + normalisation), through
   ``kiln.processing`` with ``decode="full"`` and ``decode="draft"`` (PIL's ``Image.draft``: libjpeg's
   DCT-domain downscaling to DRAFT_MARGIN times the input), the same without the margin, and
   simplejpeg's scaled decode (``min_width``/``min_height``, same margin) plus the same resize when
   simplejpeg is installed; PyTurboJPEG is reported when its system library is found;
2. top-1 agreement of a torchvision resnet18 (seeded; no pretrained weights are available offline) between
   full and draft decodes of real photos: scikit-learn's two sample photos and scikit-image's bundled
   ``skimage.data`` photos when installed, each saved as camera-like JPEGs at several sizes and crops
   (beside the draft decode without margin and a full decode of a quality-95 re-save, the noise floor),
   through the resize 224 and centre-crop 224 (shorter side 256) recipes. The untrained network's logits are
   standardised per class over the set so its answer follows the image; the report prints how many
   distinct classes it answered, so an agreement that a constant answer would give is visible.

3. with ``--trained BUNDLE`` (repeatable; a classifier or a detector that ``kiln train`` wrote), the same
   decode on a trained model: the first ``--limit`` images of the bundle's validation split, each scaled
   up to camera size (``--width`` px wide, bicubic, sensor-like grain, JPEG quality 90), run through the
   bundle with ``decode="full"`` and ``decode="draft"``: top-1 agreement between the two and each one's
   top-1 (classifier; target >= 99.5% agreement), or each one's mAP with the boxes scaled with the image
   (detector; target: within 0.5 point). For example::

       .venv/bin/kiln train --data folder:/tmp/crops --model resnet18 --image-size 64 --epochs 8 \\
           --out /tmp/photo-cls
       .venv/bin/kiln train --data shapes --epochs 5 --out /tmp/shapes-det
       .venv/bin/python tests/perf/bench_decode.py --trained /tmp/photo-cls --trained /tmp/shapes-det \\
           --skip-untrained

   (``/tmp/crops`` from ``tests/train/photos.py``'s ``write_photo_crops``).

Print ``uptime``'s load average beside the figures: on a shared machine timings move with it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kiln import processing  # noqa: E402
from kiln.bundle import Bundle, Preprocess  # noqa: E402
from tests.corpus import photo, photos  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RESIZE = Preprocess(mode="resize", size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
CROP = Preprocess(mode="center_crop", size=(224, 224), resize_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(max(3, repeat // 10)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def kiln_input(data: bytes, spec: Preprocess) -> np.ndarray:
    x, _ = processing.preprocess([processing.decode_image(data, spec=spec)], spec)
    return x


def simplejpeg_input(data: bytes, spec: Preprocess) -> np.ndarray:
    import simplejpeg

    exif = Image.open(io.BytesIO(data))  # header only: EXIF orientation
    turned = processing.displayed_size(exif) != exif.size
    w, h = (
        v * processing.DRAFT_MARGIN for v in processing.covering_size(spec, processing.displayed_size(exif))
    )
    arr = simplejpeg.decode_jpeg(data, min_width=h if turned else w, min_height=w if turned else h)
    img = Image.fromarray(arr)
    img.info["exif"] = exif.info.get("exif", b"")
    img = ImageOps.exif_transpose(img)
    x, _ = processing.preprocess([img], spec)
    return x


def turbojpeg_decoder() -> Callable[[bytes, Preprocess], np.ndarray] | str:
    try:
        from turbojpeg import TurboJPEG
    except ImportError:
        return "not installed"
    try:
        tj = TurboJPEG()
    except RuntimeError as exc:  # the wheel carries no libturbojpeg: it must come from the system
        return f"unavailable ({str(exc).splitlines()[0]})"

    def decode(data: bytes, spec: Preprocess) -> np.ndarray:
        w0, h0, _, _ = tj.decode_header(data)
        w, h = (v * processing.DRAFT_MARGIN for v in processing.covering_size(spec, (w0, h0)))
        factor = next(f for f in ((1, 8), (1, 4), (1, 2), (1, 1)) if w0 * f[0] / f[1] >= w
                      and h0 * f[0] / f[1] >= h)
        arr = tj.decode(data, pixel_format=0, scaling_factor=factor)  # TJPF_RGB
        x, _ = processing.preprocess([Image.fromarray(arr)], spec)
        return x

    return decode


def timings(repeat: int) -> dict[str, object]:
    data = jpeg(photo((1920, 1080), which=1, grain=3.0), quality=90)
    full = RESIZE.model_copy(update={"decode": "full"})
    out: dict[str, object] = {"jpeg_bytes": len(data)}
    out["full_ms"] = median_ms(lambda: kiln_input(data, full), repeat)
    out["draft_ms"] = median_ms(lambda: kiln_input(data, RESIZE), repeat)
    out["draft_no_margin_ms"] = median_ms(lambda: draft_with_margin(data, RESIZE, 1), repeat)
    try:
        import simplejpeg  # noqa: F401

        out["simplejpeg_ms"] = median_ms(lambda: simplejpeg_input(data, RESIZE), repeat)
        out["simplejpeg_vs_draft_mean_abs"] = float(
            np.abs(simplejpeg_input(data, RESIZE) - kiln_input(data, RESIZE)).mean()
        )
    except ImportError:
        out["simplejpeg_ms"] = "not installed"
    tj = turbojpeg_decoder()
    out["turbojpeg_ms"] = tj if isinstance(tj, str) else median_ms(lambda: tj(data, RESIZE), repeat)
    unit = RESIZE.model_copy(update={"mean": [0.0] * 3, "std": [1.0] * 3})
    diff = np.abs(kiln_input(data, unit) - kiln_input(data, unit.model_copy(update={"decode": "full"})))
    out["draft_vs_full_mean_abs_255"] = float(diff.mean() * 255)
    return out


def real_photos() -> list[tuple[str, np.ndarray]]:
    found = [("sklearn:china", photos()[0]), ("sklearn:flower", photos()[1])]
    try:
        import skimage.data as data
    except ImportError:
        return found
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina",
                 "camera", "coins"):
        try:
            arr = getattr(data, name)()
        except Exception:  # the ones that are not bundled need a download: skipped offline
            continue
        found.append((f"skimage:{name}", np.asarray(Image.fromarray(arr).convert("RGB"))))
    return found


def photo_jpegs(variants: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Each photo as a camera-like JPEG at its own size, upscaled to 1920 and 4000 wide, and ``variants``
    random crops resized to 640-2400 px wide."""
    rng = np.random.default_rng(seed)
    out = []
    for name, arr in real_photos():
        img = Image.fromarray(arr)
        out.append((f"{name}", jpeg(img)))
        for width in (1920, 4000):
            size = (width, round(width * img.height / img.width))
            out.append((f"{name}@{width}", jpeg(img.resize(size, Image.Resampling.BICUBIC), quality=92)))
        for k in range(variants):
            cw, ch = rng.uniform(0.4, 0.9) * img.width, rng.uniform(0.4, 0.9) * img.height
            x0, y0 = rng.uniform(0, img.width - cw), rng.uniform(0, img.height - ch)
            width = int(rng.integers(640, 2400))
            crop = img.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch)))
            crop = crop.resize((width, max(1, round(width * ch / cw))), Image.Resampling.BICUBIC)
            out.append((f"{name}#crop{k}", jpeg(crop, quality=int(rng.integers(75, 96)))))
    return out


def resaved(data: bytes, quality: int = 95) -> bytes:
    """The photo as a user's re-save at ``quality`` leaves it: the noise floor of a decode comparison."""
    with Image.open(io.BytesIO(data)) as img:
        return jpeg(img.convert("RGB"), quality)


def draft_with_margin(data: bytes, spec: Preprocess, margin: float) -> np.ndarray:
    """The DCT scale kiln would choose with ``margin`` in place of DRAFT_MARGIN, then the recipe's resize."""
    k = margin / processing.DRAFT_MARGIN
    h, w = spec.size
    other = spec.model_copy(update={"size": (max(1, round(h * k)), max(1, round(w * k))),
                                    "resize_size": spec.resize_size and max(1, round(spec.resize_size * k))})
    x, _ = processing.preprocess([processing.decode_image(data, spec=other)], spec)
    return x


def agreement(variants: int) -> dict[str, object]:
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    files = photo_jpegs(variants)
    out: dict[str, object] = {"photos": len(real_photos()), "images": len(files),
                              "model": "torchvision resnet18, seeded init (no pretrained weights offline)"}
    for label, spec in (("resize224", RESIZE), ("center_crop224", CROP)):
        full = spec.model_copy(update={"decode": "full"})
        decoders: dict[str, Callable[[bytes], np.ndarray]] = {
            "draft (kiln)": lambda d, spec=spec: kiln_input(d, spec),  # type: ignore[misc]
            "draft at the input size (no margin)": lambda d, spec=spec: draft_with_margin(d, spec, 1),  # type: ignore[misc]
            "full decode of a q95 re-save (noise floor)": lambda d, full=full: kiln_input(resaved(d), full),  # type: ignore[misc]
        }
        with torch.inference_mode():
            a = model(torch.from_numpy(np.concatenate([kiln_input(d, full) for _, d in files]))).numpy()
            # An untrained network answers nearly one class for everything: standardise each class's
            # logit over the full-decode set (a per-class bias and scale, as a trained head's would be),
            # so the answer follows the image and the margins stay small: a strict test of the decode.
            mu, sd = a.mean(0), a.std(0) + 1e-6
            za = (a - mu) / sd
            rows: dict[str, object] = {"distinct_top1_classes": int(len(np.unique(za.argmax(1)))),
                                       "raw_logits_distinct_top1": int(len(np.unique(a.argmax(1))))}
            for name, fn in decoders.items():
                b = model(torch.from_numpy(np.concatenate([fn(d) for _, d in files]))).numpy()
                zb = (b - mu) / sd
                same = za.argmax(1) == zb.argmax(1)
                rows[name] = {"top1_agreement_with_full": round(float(same.mean()), 4),
                              "raw_top1_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4),
                              "disagree": [files[i][0] for i in np.flatnonzero(~same)][:8]}
        out[label] = rows
    return out


def camera_jpeg(img: Image.Image, width: int, seed: int = 0, quality: int = 90) -> tuple[bytes, float]:
    """``img`` scaled up to ``width`` px wide (bicubic) with sensor-like grain, as a JPEG, and the factor."""
    factor = width / img.width
    big = img.convert("RGB").resize((width, max(1, round(img.height * factor))), Image.Resampling.BICUBIC)
    arr = np.asarray(big, dtype=np.float32) + np.random.default_rng(seed).normal(
        0, 2.0, (big.height, big.width, 3)
    )
    return jpeg(Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert(img.mode), quality), factor


class CameraSplit:
    """A bundle's validation images as camera-size JPEGs, decoded with one decode mode whatever the spec
    says; detection boxes scaled with the image. Quacks like ``kiln.data.ImageDataset`` for
    ``kiln.evaluate.run_split`` and ``split_metrics``."""

    def __init__(self, dataset: Any, limit: int, width: int) -> None:
        self.files: list[bytes] = []
        self.targets: list[Any] = []
        for i in range(min(limit, len(dataset))):
            data, factor = camera_jpeg(dataset.image(i), width, seed=i)
            self.files.append(data)
            target = dataset.target(i)
            if isinstance(target, dict):
                target = {**target, "boxes": np.asarray(target["boxes"], dtype=np.float32) * factor}
            self.targets.append(target)
        self.mode = "full"

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int, spec: Preprocess | None = None) -> Image.Image:
        assert spec is not None
        return processing.decode_image(self.files[i], spec=spec.model_copy(update={"decode": self.mode}))

    def target(self, i: int) -> Any:
        return self.targets[i]


def trained_agreement(path: Path, limit: int, width: int) -> dict[str, object]:
    """Full against draft decode of camera-size versions of a trained bundle's validation images."""
    from kiln import runtime
    from kiln.evaluate import bundle_split, run_split, split_metrics

    bundle = Bundle.load(path)
    split = CameraSplit(bundle_split(bundle, "val"), limit, width)
    backend = runtime.load(bundle, backend="onnxrt" if bundle.artifact("onnx") else "torch")
    out: dict[str, object] = {"bundle": str(path), "task": bundle.manifest.task, "images": len(split),
                              "width": width, "backend": backend.name,
                              "input": list(bundle.manifest.input.shape)}
    results = {}
    try:
        for mode in ("full", "draft"):
            split.mode = mode
            res = run_split(bundle, backend, split)  # type: ignore[arg-type]
            results[mode] = res
            metrics = split_metrics(bundle, res, split)  # type: ignore[arg-type]
            key = "top1" if bundle.manifest.task == "classify" else "map"
            out[f"{key}_{mode}"] = round(float(metrics[key]) * (1 if key == "top1" else 100), 2)
    finally:
        backend.close()
    if bundle.manifest.task == "classify":
        name = bundle.manifest.outputs[0].name
        same = results["full"].outputs[name].argmax(1) == results["draft"].outputs[name].argmax(1)
        out["top1_agreement"] = round(float(same.mean()), 4)
        out["target"] = "top1_agreement >= 0.995"
    else:
        out["map_points_draft_minus_full"] = round(float(out["map_draft"]) - float(out["map_full"]), 2)  # type: ignore[arg-type]
        out["target"] = "|map_points_draft_minus_full| <= 0.5"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--variants", type=int, default=12,
                        help="random crops per photo for the agreement check")
    parser.add_argument("--trained", type=Path, action="append", default=[],
                        help="a trained bundle: full vs draft decode of its validation images at camera size")
    parser.add_argument("--limit", type=int, default=400, help="validation images per --trained bundle")
    parser.add_argument("--width", type=int, default=1920,
                        help="camera width the validation images are scaled to")
    parser.add_argument("--skip-untrained", action="store_true", help="only the --trained checks")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report: dict[str, object] = {
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "pillow": Image.__version__,
    }
    if not args.skip_untrained:
        report["decode_1920x1080_to_224"] = timings(args.repeat)
        report["agreement_full_vs_draft"] = agreement(args.variants)
    if args.trained:
        report["trained_full_vs_draft"] = [trained_agreement(p, args.limit, args.width) for p in args.trained]
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
