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
   (beside the draft decode without margin and a full decode of a quality-95 re-save, the noise floor), through
   the resize 224 and centre-crop 224 (shorter side 256) recipes. The untrained network's logits are
   standardised per class over the set so its answer follows the image; the report prints how many
   distinct classes it answered, so an agreement that a constant answer would give is visible.

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

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kiln import processing  # noqa: E402
from kiln.bundle import Preprocess  # noqa: E402
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
    w, h = (v * processing.DRAFT_MARGIN for v in processing.covering_size(spec, processing.displayed_size(exif)))
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
        factor = next(f for f in ((1, 8), (1, 4), (1, 2), (1, 1)) if w0 * f[0] / f[1] >= w and h0 * f[0] / f[1] >= h)
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
        out["simplejpeg_vs_draft_mean_abs"] = float(np.abs(simplejpeg_input(data, RESIZE) - kiln_input(data, RESIZE)).mean())
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
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--variants", type=int, default=12, help="random crops per photo for the agreement check")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report: dict[str, object] = {
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "pillow": Image.__version__, "decode_1920x1080_to_224": timings(args.repeat),
        "agreement_full_vs_draft": agreement(args.variants),
    }
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
