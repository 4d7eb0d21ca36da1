"""Images from a predict request: read the body (multipart files or JSON base64) and decode each one."""

from __future__ import annotations

import base64
import binascii
import io

from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from kiln import processing
from kiln.processing import ImageDecodeError
from kiln.serve.errors import ApiError, describe_validation
from kiln.serve.schemas import PredictRequest

# Images up to this many pixels are decoded on the event loop: a thread hop costs more than decoding
# a small image. Anything larger (up to the pixel limit) is decoded in the thread pool.
INLINE_PIXELS = 512 * 512


async def read_images(request: Request, max_images: int) -> tuple[list[bytes], int | None]:
    """The image files of a predict request and an optional top_k from the JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    top_k = None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 8)
        try:
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if len(files) != len(form.getlist("file")):
                raise ApiError(400, "invalid_request", "the `file` fields must be file uploads, not text")
            _check_count(len(files), max_images)
            blobs = [await f.read() for f in files]
        finally:
            await form.close()
    elif ctype == "application/json":
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise ApiError(400, "invalid_request", describe_validation(exc.errors())) from None
        _check_count(len(body.images), max_images)
        blobs = [_b64(s, i) for i, s in enumerate(body.images)]
        top_k = body.top_k
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type '{ctype or 'none'}': send multipart/form-data with `file` fields, "
            'or application/json {"images": ["<base64>", ...]}',
        )
    return blobs, top_k


def header_pixels(blob: bytes) -> int | None:
    """Width x height from the image header (no pixel data decoded), or None if PIL cannot tell."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return img.width * img.height
    except Exception:
        return None  # decode_images will say what is wrong


def decode_images(blobs: list[bytes], max_pixels: int) -> list[Image.Image]:
    """Decode each blob; with several, an error names the image's index."""
    images = []
    for i, blob in enumerate(blobs):
        try:
            images.append(processing.decode_image(blob, max_pixels))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"image {i}: {exc}" if len(blobs) > 1 else str(exc)) from None
    return images


def _check_count(n: int, limit: int) -> None:
    if n == 0:
        raise ApiError(400, "no_images", 'no images: send one or more multipart `file` fields or JSON {"images": [...]}')
    if n > limit:
        raise ApiError(400, "too_many_images", f"{n} images in one request, over the limit of {limit}")


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):  # a data URL, as a browser's FileReader produces
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"images[{index}] is not valid base64") from None


__all__ = ["INLINE_PIXELS", "decode_images", "header_pixels", "read_images"]
