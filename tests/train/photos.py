"""A small real-photo classification set: crops of the photos scikit-learn ships (and scikit-image's, when
installed), one class per region of a photo, written as a folder set (``root/<class>/<i>.png``).

Used by the photo training test and by tests/perf/bench_photos_train.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# class -> (photo, rows, cols) in the 427x640 photos of sklearn.datasets.load_sample_images()
REGIONS = {
    "temple": ("china.jpg", (40, 340), (100, 320)),
    "trees": ("china.jpg", (180, 427), (520, 640)),
    "petals": ("flower.jpg", (80, 350), (170, 450)),
    "leaves": ("flower.jpg", (0, 427), (0, 160)),
}
# scikit-image bundles a few photos (others download on first use and are left out)
SKIMAGE_PHOTOS = {"coffee": "coffee", "astronaut": "astronaut", "chelsea": "chelsea"}


def photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    out = {Path(name).name: img for name, img in zip(bunch.filenames, bunch.images, strict=True)}
    if importlib.util.find_spec("skimage") is not None:
        import skimage.data

        for cls, fn in SKIMAGE_PHOTOS.items():
            try:
                out[cls] = np.asarray(getattr(skimage.data, fn)())[..., :3]
            except Exception:  # not bundled in this version: it would need a download
                continue
    return out


def write_photo_crops(root: str | Path, *, per_class: int = 60, size: int = 64, seed: int = 0,
                      shuffle_labels: bool = False, extra_photos: bool = True) -> list[str]:
    """Write ``per_class`` random square crops (48-128 px of the photo, resized to ``size``) per class.

    ``shuffle_labels`` files every crop under a random class: a set nothing can be learned from.
    Returns the class names.
    """
    rng = np.random.default_rng(seed)
    pics = photos()
    regions = dict(REGIONS)
    if extra_photos:
        for cls in SKIMAGE_PHOTOS:
            if cls in pics:
                h, w = pics[cls].shape[:2]
                regions[cls] = (cls, (0, h), (0, w))
    crops: list[tuple[str, Image.Image]] = []
    for cls, (photo, (r0, r1), (c0, c1)) in regions.items():
        img = pics[photo]
        for _ in range(per_class):
            side = int(rng.integers(48, min(129, r1 - r0, c1 - c0)))
            y = int(rng.integers(r0, r1 - side + 1))
            x = int(rng.integers(c0, c1 - side + 1))
            crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size),
                                                                       Image.Resampling.BILINEAR)
            crops.append((cls, crop))
    names = list(regions)
    labels = [c for c, _ in crops]
    if shuffle_labels:
        labels = [labels[i] for i in rng.permutation(len(labels))]
    root = Path(root)
    for n, ((_, crop), cls) in enumerate(zip(crops, labels, strict=True)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        crop.save(root / cls / f"{n:04d}.png")
    return names
