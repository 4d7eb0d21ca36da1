"""Pre- and post-processing shared by training, eval, calibration, serving and bench.

Pure numpy / PIL, no torch: the serving image imports this without PyTorch. Shapes are in the
docstrings; ``N`` is the batch, ``C`` channels, ``H``/``W`` the model input size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from kiln.bundle import ClassifyPost, DetectPost, Preprocess
from kiln.errors import KilnError

# A truncated file must be an error, never a silently half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}

DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(KilnError, ValueError):
    """The bytes are not a decodable image, or the image breaks a limit."""


@dataclass(frozen=True)
class Letterbox:
    """How an original image was placed in the model input: ``input = original * scale + (pad_x, pad_y)``."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    width: int
    height: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map boxes ``[K, 4]`` (x1, y1, x2, y2 in input pixels) back to original pixels, clipped."""
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale_y
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.height)
        return out


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an 8-bit RGB or L image, fully loaded.

    CMYK, palette, 16-bit and alpha images are converted, not rejected. Raises
    :class:`ImageDecodeError` for empty, non-image, truncated or too large input; the pixel limit is
    checked from the header before any pixel is decoded (decompression bombs).
    """
    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: the data is not in a format PIL can read") from None
    except Exception as exc:  # PIL raises many types for malformed headers
        raise ImageDecodeError(f"cannot read image header: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    try:
        img.load()
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image ({img.format}): {exc}") from None
    return to_8bit(img)


def to_8bit(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to ``L`` or ``RGB``; alpha is composited over black (what training saw)."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("LA", "La"):
        rgba = img.convert("RGBA")
        return _composite(rgba).convert("L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        return _composite(img)
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba.convert("RGBA")).convert("RGB")


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    with open(path, "rb") as fh:
        return decode_image(fh.read(), max_pixels)


def to_unit(img: Image.Image, spec: Preprocess) -> tuple[np.ndarray, Letterbox]:
    """Resize or letterbox ``img`` and return ``[C, H, W]`` float32 in [0, 1] with its placement."""
    img = to_8bit(img).convert(spec.channels)
    h, w = spec.size
    resample = _RESAMPLE[spec.interpolation]
    if spec.mode == "resize":
        placed = img.resize((w, h), resample) if img.size != (w, h) else img
        box = Letterbox(w / img.width, h / img.height, 0.0, 0.0, img.width, img.height)
    else:
        scale = min(w / img.width, h / img.height)
        nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        px, py = (w - nw) // 2, (h - nh) // 2
        fill = spec.pad_value if spec.channels == "L" else (spec.pad_value,) * 3
        placed = Image.new(spec.channels, (w, h), fill)
        placed.paste(img.resize((nw, nh), resample), (px, py))
        box = Letterbox(nw / img.width, nh / img.height, float(px), float(py), img.width, img.height)
    arr = np.asarray(placed, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), box


def normalize(x: np.ndarray, spec: Preprocess) -> np.ndarray:
    """``(x - mean) / std`` per channel for ``[C, H, W]`` or ``[N, C, H, W]`` float32 input."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32, copy=False)


def preprocess(images: list[Image.Image], spec: Preprocess) -> tuple[np.ndarray, list[Letterbox]]:
    """Turn PIL images into the model input ``[N, C, H, W]`` float32 and the per-image placements."""
    arrays, boxes = [], []
    for img in images:
        arr, box = to_unit(img, spec)
        arrays.append(normalize(arr, spec))
        boxes.append(box)
    c = 1 if spec.channels == "L" else 3
    if not arrays:
        return np.zeros((0, c, *spec.size), dtype=np.float32), []
    return np.stack(arrays), boxes


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[N, K]`` logits, computed in float64 for stability."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def classify_topk(logits: np.ndarray, classes: list[str], post: ClassifyPost) -> list[list[dict[str, object]]]:
    """Top-k labels and probabilities for each row of ``[N, K]`` logits."""
    probs = softmax(logits)
    k = min(post.top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"label": classes[j], "index": int(j), "score": float(row[j])} for j in idx]
        for row, idx in zip(probs, order, strict=True)
    ]


__all__ = [
    "ClassifyPost",
    "DetectPost",
    "ImageDecodeError",
    "Letterbox",
    "classify_topk",
    "decode_image",
    "load_image",
    "normalize",
    "preprocess",
    "softmax",
    "to_8bit",
    "to_unit",
]


# ---- detection (owned by the detection stage) -----------------------------------------------------

PRE_NMS_TOP_K = 1000  # candidates per image kept (by score) before NMS: bounds the NMS cost


def box_iou_one(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy ``box [4]`` with ``others [K, 4]`` (areas as torchvision computes them)."""
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float32).tiny)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of ``boxes [K, 4]`` kept, best score first; a box is dropped when its IoU
    with a kept, better box is above ``iou_threshold`` (torchvision.ops.nms semantics)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[box_iou_one(boxes[i], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def detect_postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    letterboxes: list[Letterbox] | None,
    post: DetectPost,
    classes: list[str],
) -> list[list[dict[str, object]]]:
    """Detections per image from a detector's raw outputs.

    ``boxes [N, A, 4]`` xyxy in model-input pixels and ``scores [N, A, C]`` per-class scores in [0, 1]
    -> for each image a list of ``{"box": [x1, y1, x2, y2], "label", "index", "score"}``, best first:
    (location, class) pairs over ``post.score_threshold`` (at most :data:`PRE_NMS_TOP_K`), NMS per class
    at ``post.iou_threshold``, the best ``post.max_detections``, boxes mapped to original pixels with
    each image's :class:`Letterbox` (left in input pixels when ``letterboxes`` is None).
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"expected boxes [N, A, 4] and scores [N, A, C], got {boxes.shape} and {scores.shape}")
    if letterboxes is not None and len(letterboxes) != len(boxes):
        raise ValueError(f"{len(letterboxes)} letterboxes for {len(boxes)} images")
    num_classes = scores.shape[2]
    out: list[list[dict[str, object]]] = []
    for i in range(boxes.shape[0]):
        flat = scores[i].reshape(-1).astype(np.float32)
        cand = np.flatnonzero(flat > post.score_threshold)
        if cand.size > PRE_NMS_TOP_K:
            cand = cand[np.argsort(-flat[cand], kind="stable")[:PRE_NMS_TOP_K]]
        anchor, cls = cand // num_classes, cand % num_classes
        b, s = boxes[i][anchor].astype(np.float32), flat[cand]
        kept = [np.flatnonzero(cls == c)[nms(b[cls == c], s[cls == c], post.iou_threshold)] for c in np.unique(cls)]
        keep = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        keep = keep[np.argsort(-s[keep], kind="stable")][: post.max_detections]
        final = b[keep]
        if letterboxes is not None:
            final = letterboxes[i].to_original(final)
        out.append([
            {"box": [float(v) for v in box], "label": classes[int(c)], "index": int(c), "score": float(sc)}
            for box, c, sc in zip(final, cls[keep], s[keep], strict=True)
        ])
    return out


__all__ += ["PRE_NMS_TOP_K", "detect_postprocess", "nms"]
