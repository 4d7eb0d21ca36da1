"""Pre- and post-processing shared by training, eval, calibration, serving and bench.

Pure numpy / PIL, no torch: the serving image imports this without PyTorch. Shapes are in the
docstrings; ``N`` is the batch, ``C`` channels, ``H``/``W`` the model input size.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from kiln.bundle import ClassifyPost, DetectPost, Preprocess
from kiln.errors import KilnError, unknown_choice

# A truncated file must be an error, never a silently half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

DEFAULT_MAX_PIXELS = 40_000_000
# A JPEG decoded at a DCT scale keeps at least this many times the size the model input needs, so the one
# resize after it still does most of the downscaling: measured on real photos (tests/perf/bench_decode.py),
# decoding just to the input size changed an untrained resnet18's standardised top-1 on 7-13% of them,
# twice the size on 2-4% (a JPEG re-save at quality 95: 1%), for a decode still about twice as fast as
# the full one.
DRAFT_MARGIN = 2


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


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, where: str = "") -> Image.Image:
    """Open image bytes from their header only (no pixel is decoded) and check the pixel limit.

    Raises :class:`ImageDecodeError` (its message prefixed with ``where``) for empty or non-image data
    and for an image over ``max_pixels``, so a decompression bomb costs no decode time.
    """
    if not data:
        raise ImageDecodeError(f"{where}empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{where}not an image: the data is not in a format PIL can read") from None
    except Exception as exc:  # PIL raises many types for malformed headers
        raise ImageDecodeError(f"{where}cannot read image header: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"{where}image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    return img


def decode(img: Image.Image, spec: Preprocess | None = None, where: str = "") -> Image.Image:
    """Decode an image opened by :func:`open_image` into 8-bit ``L`` or ``RGB`` pixels as displayed.

    The one decode of kiln: serving (every protocol), ``kiln predict``, ``kiln eval``, calibration and
    training's file datasets all call it, so accuracy is measured on what serving computes. In order:

    1. a JPEG with ``spec.decode == "draft"`` is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose
       result still covers :data:`DRAFT_MARGIN` times what the model input needs (libjpeg's DCT-domain
       downscaling: a 1920x1080 photo for a 224 model decodes at 960x540, about twice as fast, and
       :func:`to_unit`'s one resize does the rest); any other format, or ``spec`` None, decodes in full;
    2. EXIF Orientation is applied (a phone photo stored sideways comes out upright); a malformed EXIF
       block is ignored and the pixels are used as stored;
    3. the mode becomes 8-bit (:func:`to_8bit`): alpha over black, 16-bit scaled by 255/65535.

    A downscaled image records the displayed size of the file and the DCT scale in
    ``info[SOURCE_SIZE]`` (W, H, scale), which :func:`to_unit` uses so boxes map back to the file's
    pixels. Raises :class:`ImageDecodeError` for a
    truncated or corrupt image.
    """
    displayed = displayed_size(img)
    stored_width = img.width
    scale = 1.0
    if spec is not None and spec.decode == "draft" and img.format in ("JPEG", "MPO"):  # MPO: a camera JPEG
        need = covering_size(spec, displayed)
        want = (need[0] * DRAFT_MARGIN, need[1] * DRAFT_MARGIN)
        if displayed != img.size:  # EXIF turns it: the DCT scale is chosen on the stored sides
            want = (want[1], want[0])
        drafted = img.draft(None, want)  # None: keep the colour space, only the scale changes
        if drafted is not None:
            scale = stored_width / drafted[1][2]  # the box is the stored size over the DCT scale
    try:
        img.load()
    except Exception as exc:
        raise ImageDecodeError(f"{where}cannot decode image ({img.format}): {exc}") from None
    # Before the mode conversion, which may drop the EXIF block; in place: no copy when upright.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    out = to_8bit(img)
    if scale != 1.0:
        out.info[SOURCE_SIZE] = (*displayed, scale)
    return out


def covering_size(spec: Preprocess, size: tuple[int, int]) -> tuple[int, int]:
    """``(W, H)`` that an image of displayed ``size`` (W, H) must keep for ``spec`` to make the model
    input from it without upsampling: the input itself (resize), the image scaled to fit (letterbox),
    or a square of the shorter side's target (centre crop)."""
    h, w = spec.size
    if spec.mode == "resize":
        return (w, h)
    if spec.mode == "center_crop":
        short = spec.resize_size or min(h, w)
        return (short, short)
    scale = min(w / size[0], h / size[1])
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 spec: Preprocess | None = None) -> Image.Image:
    """:func:`open_image` then :func:`decode`: bytes to 8-bit ``L``/``RGB`` pixels as displayed."""
    return decode(open_image(data, max_pixels), spec)


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
               spec: Preprocess | None = None) -> Image.Image:
    """The file at ``path`` through :func:`decode_image`: decoded for ``spec`` (a JPEG may come out
    downscaled, see :func:`decode`), or in full when ``spec`` is None (to show or draw on)."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), max_pixels, spec)


def to_8bit(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to ``L`` or ``RGB``.

    Alpha (RGBA, LA, P with transparency) is composited over black, everywhere: what training saw is
    what serving computes. 16-bit (``I;16*``) is scaled by 255/65535, never clipped; 32-bit ``I`` is
    taken as 8-bit data when it fits and as 16-bit otherwise; ``F`` is clipped to [0, 255]; CMYK,
    YCbCr, LAB and HSV are converted to RGB.
    """
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


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """``(W, H)`` of an opened (not necessarily decoded) image as displayed: EXIF Orientation 5-8 swap
    the sides, so labels drawn on the displayed image line up with what :func:`load_image` returns."""
    try:
        turned = img.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)
    except Exception:  # a malformed EXIF block is ignored by decode too
        turned = False
    return (img.height, img.width) if turned else img.size


def source_size(img: Image.Image) -> tuple[int, int, float]:
    """``(W, H, scale)`` of the displayed file ``img`` was decoded from and the factor it was
    downscaled by: ``(*img.size, 1.0)`` unless :func:`decode` decoded it at a DCT scale."""
    src = img.info.get(SOURCE_SIZE)
    return (int(src[0]), int(src[1]), float(src[2])) if src else (img.width, img.height, 1.0)


ORIENTATION_TAG = 0x0112
SOURCE_SIZE = "kiln.source_size"


def to_unit(img: Image.Image, spec: Preprocess) -> tuple[np.ndarray, Letterbox]:
    """Resize or letterbox ``img`` and return ``[C, H, W]`` float32 in [0, 1] with its placement."""
    img = to_8bit(img).convert(spec.channels)
    h, w = spec.size
    resample = _RESAMPLE[spec.interpolation]
    if spec.mode == "resize":
        placed = img.resize((w, h), resample) if img.size != (w, h) else img
        box = Letterbox(w / img.width, h / img.height, 0.0, 0.0, img.width, img.height)
    elif spec.mode == "center_crop":
        placed, box = _resize_center_crop(img, spec.resize_size or min(h, w), (h, w), resample)
    else:
        scale = min(w / img.width, h / img.height)
        nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        px, py = (w - nw) // 2, (h - nh) // 2
        fill = spec.pad_value if spec.channels == "L" else (spec.pad_value,) * 3
        placed = Image.new(spec.channels, (w, h), fill)
        placed.paste(img.resize((nw, nh), resample), (px, py))
        box = Letterbox(nw / img.width, nh / img.height, float(px), float(py), img.width, img.height)
    src_w, src_h, factor = source_size(img)
    if factor != 1.0:  # decoded at 1/factor (a DCT pixel covers factor x factor file pixels): map to the file
        box = Letterbox(box.scale_x / factor, box.scale_y / factor, box.pad_x, box.pad_y, src_w, src_h)
    arr = np.asarray(placed, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), box


def _resize_center_crop(img: Image.Image, short: int, size: tuple[int, int],
                        resample: Image.Resampling) -> tuple[Image.Image, Letterbox]:
    """Shorter side to ``short``, then the central ``size`` (H, W), rounding as torchvision's
    ``Resize([short])`` + ``CenterCrop`` do, so pretrained weights see what they were evaluated on.
    A crop larger than the resized image is padded with black around it (torchvision pads with 0)."""
    h, w = size
    if img.width <= img.height:
        nw, nh = short, int(short * img.height / img.width)
    else:
        nw, nh = int(short * img.width / img.height), short
    resized = img.resize((nw, nh), resample) if img.size != (nw, nh) else img
    left, top = int(round((nw - w) / 2.0)), int(round((nh - h) / 2.0))
    placed = resized.crop((left, top, left + w, top + h))  # PIL fills outside the image with 0
    return placed, Letterbox(nw / img.width, nh / img.height, float(-left), float(-top), img.width,
                             img.height)


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


def classify_topk(logits: np.ndarray, classes: list[str],
                  post: ClassifyPost) -> list[list[dict[str, object]]]:
    """Top-k labels and probabilities for each row of ``[N, K]`` logits."""
    probs = softmax(logits)
    k = min(post.top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    # Python lists first: indexing numpy rows element by element costs more than the softmax.
    return [
        [{"label": classes[j], "index": j, "score": row[j]} for j in idx]
        for row, idx in zip(probs.tolist(), order.tolist(), strict=True)
    ]


__all__ = [
    "ClassifyPost",
    "DetectPost",
    "ImageDecodeError",
    "Letterbox",
    "DRAFT_MARGIN",
    "SOURCE_SIZE",
    "classify_topk",
    "covering_size",
    "decode",
    "decode_image",
    "displayed_size",
    "load_image",
    "open_image",
    "normalize",
    "preprocess",
    "softmax",
    "source_size",
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


def _candidates(scores: np.ndarray, post: DetectPost) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(anchor, class, score)`` of the candidates in one image's ``scores [A, C]``.

    One label per location (its best class) unless ``post.multi_label``: a location scoring for two
    classes is then a candidate twice. The class filter applies after the best class is chosen, so a
    box is never relabelled as a weaker, allowed class.
    """
    num_classes = scores.shape[1]
    if post.multi_label:
        flat = scores.reshape(-1)
        cand = np.flatnonzero(flat > post.score_threshold)
        anchor, cls, s = cand // num_classes, cand % num_classes, flat[cand]
    else:
        best = scores.argmax(1)
        top = scores[np.arange(len(scores)), best]
        anchor = np.flatnonzero(top > post.score_threshold)
        cls, s = best[anchor], top[anchor]
    if post.classes is not None:
        allowed = np.isin(cls, np.asarray(post.classes, dtype=np.int64))
        anchor, cls, s = anchor[allowed], cls[allowed], s[allowed]
    if s.size > PRE_NMS_TOP_K:
        top_k = np.argsort(-s, kind="stable")[:PRE_NMS_TOP_K]
        anchor, cls, s = anchor[top_k], cls[top_k], s[top_k]
    return anchor, cls, s


def nms_keep(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float,
             agnostic: bool) -> np.ndarray:
    """Indices kept by NMS over ``boxes [K, 4]``: per class (``classes [K]``) or across classes
    (``agnostic``: overlapping boxes of different classes suppress each other), best score first."""
    if agnostic:
        return nms(boxes, scores, iou_threshold)
    kept = [np.flatnonzero(classes == c)[nms(boxes[classes == c], scores[classes == c], iou_threshold)]
            for c in np.unique(classes)]
    keep = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return keep[np.argsort(-scores[keep], kind="stable")]


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
    each location's best class (every class over the threshold with ``post.multi_label``) scoring over
    ``post.score_threshold``, only ``post.classes`` when set, at most :data:`PRE_NMS_TOP_K` candidates,
    NMS at ``post.iou_threshold`` per class (across classes with ``post.class_agnostic``), the best
    ``post.max_detections``, boxes mapped to original pixels with each image's :class:`Letterbox`
    (left in input pixels when ``letterboxes`` is None).
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(
            f"expected boxes [N, A, 4] and scores [N, A, C], got {boxes.shape} and {scores.shape}")
    if letterboxes is not None and len(letterboxes) != len(boxes):
        raise ValueError(f"{len(letterboxes)} letterboxes for {len(boxes)} images")
    out: list[list[dict[str, object]]] = []
    for i in range(boxes.shape[0]):
        anchor, cls, s = _candidates(scores[i].astype(np.float32), post)
        b = boxes[i][anchor].astype(np.float32)
        keep = nms_keep(b, s, cls, post.iou_threshold, post.class_agnostic)[: post.max_detections]
        final = b[keep]
        if letterboxes is not None:
            final = letterboxes[i].to_original(final)
        out.append([
            {"box": [float(v) for v in box], "label": classes[int(c)], "index": int(c), "score": float(sc)}
            for box, c, sc in zip(final, cls[keep], s[keep], strict=True)
        ])
    return out


def detect_overrides(post: DetectPost, classes: list[str], *, conf: float | None = None,
                     iou: float | None = None,
                     max_det: int | None = None, agnostic: bool | None = None,
                     multi_label: bool | None = None,
                     only: list[str] | None = None) -> DetectPost:
    """``post`` (kiln.json's defaults) with the controls a caller gave; ``None`` keeps the default.

    ``only`` names classes by label or index (``["car", "3"]``). Raises :class:`DetectControlError`
    naming the first bad value, so the CLI prints one line and the server answers 400.
    """
    changes: dict[str, object] = {}
    for key, value in (("score_threshold", conf), ("iou_threshold", iou), ("max_detections", max_det),
                       ("class_agnostic", agnostic), ("multi_label", multi_label)):
        if value is not None:
            changes[key] = value
    if only is not None:
        changes["classes"] = [class_index(name, classes) for name in only]
    try:
        return DetectPost.model_validate({**post.model_dump(), **changes})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        first = errors()[0] if callable(errors) else None
        flag = {"score_threshold": "conf", "iou_threshold": "iou", "max_detections": "max_det"}
        where = flag.get(str(first["loc"][0]), str(first["loc"][0])) if first else "detection control"
        msg = first["msg"] if first else str(exc)
        raise DetectControlError(f"{where}: {msg}") from None


def class_index(name: str, classes: list[str]) -> int:
    """The index of a class given by label or by index (as text)."""
    if name in classes:
        return classes.index(name)
    if name.strip().isdigit() and int(name) < len(classes):
        return int(name)
    raise DetectControlError(str(unknown_choice("class", name, classes)))


class DetectControlError(KilnError, ValueError):
    """A detection control (threshold, class filter, ...) has an invalid value."""


__all__ += ["PRE_NMS_TOP_K", "DetectControlError", "class_index", "detect_overrides", "detect_postprocess",
            "nms", "nms_keep"]
