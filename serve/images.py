"""Images from a predict request: read the body (multipart files or JSON base64), check the decode budget
from the image headers, then decode and preprocess each image, off the event loop unless the request is
small.

A compressed image says little about its decoding cost: a 35 KB palette PNG can decode to 36 million
pixels, seconds of CPU and hundreds of MB. So every header is read first (PIL's ``Image.open`` reads no
pixel data) and a request over the per-image or per-request pixel limit is refused before any decode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from kiln import processing
from kiln.bundle import Preprocess
from kiln.processing import ImageDecodeError, Letterbox
from kiln.serve.batching import QueueFull
from kiln.serve.errors import ApiError, describe_validation
from kiln.serve.schemas import PredictRequest

T = TypeVar("T")

# A request of at most this many images and pixels (in all) is decoded on the event loop: a thread hop
# costs more than decoding it. Anything larger goes to a worker thread, so the loop keeps serving probes
# and feeding the batcher while it decodes.
INLINE_IMAGES = 4
INLINE_PIXELS = 512 * 512
# After decoding more pixels than this, hand freed memory back to the OS (see release_memory).
TRIM_PIXELS = 4_000_000
# Decompression bombs decode to far more pixels than their bytes could describe as a photo: a 12 Mpx JPEG
# is about 5 pixels per byte, a screenshot PNG 20, a 35 KB palette PNG of 6000x6000 1,000. Above
# BOMB_FLOOR_PIXELS (a 4 Mpx image costs a fraction of a second to decode) an image over the ratio is
# refused from its header, so it costs no decode time.
MAX_PIXELS_PER_BYTE = 256.0
BOMB_FLOOR_PIXELS = 4_000_000


async def read_images(request: Request, max_images: int) -> tuple[list[bytes], PredictRequest | None]:
    """The image files of a predict request and, for a JSON body, the body (its top_k and detection
    controls), parsed once."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = None
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
        body.images = []  # decoded into blobs: the base64 text need not wait with the request
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type '{ctype or 'none'}': send multipart/form-data with `file` fields, "
            'or application/json {"images": ["<base64>", ...]}',
        )
    return blobs, body


def open_images(
    blobs: list[bytes], max_pixels: int, max_request_pixels: int,
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE
) -> list[Image.Image]:
    """Each blob opened from its header only; raises before any pixel is decoded when an image is over
    ``max_pixels`` or decodes to more than ``max_pixels_per_byte`` of its size (400), or all of them
    together over ``max_request_pixels`` (413)."""
    opened: list[Image.Image] = []
    total = 0
    bomb: ImageDecodeError | None = None
    for i, blob in enumerate(blobs):
        where = f"image {i}: " if len(blobs) > 1 else ""
        img = processing.open_image(blob, max_pixels, where)
        w, h = img.size
        if bomb is None and w * h > BOMB_FLOOR_PIXELS and w * h > max_pixels_per_byte * len(blob):
            bomb = ImageDecodeError(
                f"{where}image is {w}x{h} = {w * h} pixels from {len(blob)} bytes, over "
                f"{max_pixels_per_byte:g} "
                "pixels per byte: refused as a decompression bomb (max_pixels_per_byte)"
            )
        total += w * h
        opened.append(img)
    if total > max_request_pixels:
        raise ApiError(413, "too_many_pixels",
                       f"{len(blobs)} image(s) of {total} pixels in all, over the decode budget of "
                       f"{max_request_pixels} pixels per request (max_request_pixels)")
    if bomb is not None:
        raise bomb
    return opened


def pixels(images: list[Image.Image]) -> int:
    return sum(img.width * img.height for img in images)


def decode_preprocess(images: list[Image.Image], spec: Preprocess) -> tuple[np.ndarray, list[Letterbox]]:
    """``[N, C, H, W]`` float32 model input and each image's placement, each image decoded by
    :func:`kiln.processing.decode` (the decode predict, eval and training use). One decoded image is
    alive at a time: each is preprocessed (made model-sized) before the next is decoded."""
    arrays, boxes = [], []
    try:
        for i, img in enumerate(images):
            where = f"image {i}: " if len(images) > 1 else ""
            x, box = processing.preprocess([processing.decode(img, spec, where)], spec)
            img.close()
            arrays.append(x)
            boxes.extend(box)
    finally:
        for img in images:
            img.close()
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), boxes


class DecodePool:
    """The server's decode threads: ``threads`` of them, and at most ``max_waiting`` requests waiting for
    one, served first come, first served.

    A request takes a slot (:meth:`acquire`, or ``async with pool``) and gives it back when its work is
    done; :meth:`run` does both around a call on one of the pool's own threads, so decoding never
    competes with other thread-pool work and never holds more threads than ``threads``. A freed slot is
    handed to the longest-waiting request directly (no newcomer overtakes it), so a request's decode
    starts in arrival order. When ``max_waiting`` requests already wait, :meth:`acquire` raises
    :class:`~kiln.serve.batching.QueueFull` at once (503 with Retry-After): under overload a client is
    told to come back instead of waiting behind an unbounded backlog.

    Bound to the event loop that first waits on it, like :class:`asyncio.Semaphore`.
    """

    def __init__(self, threads: int, max_waiting: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.threads = threads
        self.max_waiting = max_waiting
        self._free = threads
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return sum(not w.done() for w in self._waiters)

    @property
    def busy(self) -> int:
        """Slots held now."""
        return self.threads - self._free

    async def acquire(self) -> None:
        """Take a slot, waiting behind every request that came earlier; raises :class:`QueueFull` when
        ``max_waiting`` requests already wait."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if self.waiting >= self.max_waiting:
            raise QueueFull(f"{self.waiting} requests are waiting to decode images ({self.threads} decode "
                            f"threads, max_decode_queue {self.max_waiting}); retry later")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # the slot was handed over as the wait was cancelled
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the longest-waiting request, else to the pool. On the pool's event loop."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> DecodePool:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on one of the pool's threads once a slot is free. The slot is held until ``fn``
        returns, even when the awaiting request is cancelled while it runs, so the threads are never
        oversubscribed."""
        await self.acquire()
        loop = asyncio.get_running_loop()
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="kiln-decode")
            job = self._executor.submit(fn, *args)
        except BaseException:
            self.release()
            raise

        def done(_: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(self.release)

        job.add_done_callback(done)
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        """Stop the threads once their current work is done; work not started is dropped."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


async def prepare(
    blobs: list[bytes], spec: Preprocess, max_pixels: int, max_request_pixels: int, pool: DecodePool,
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE,
) -> tuple[np.ndarray, list[Letterbox]]:
    """Check the budget, then decode and preprocess ``blobs``: on the event loop when the request is
    small, else on one of the ``pool``'s decode threads, in arrival order (so decoding never takes more
    than ``pool.threads`` cores from the event loop and the batchers, and a full backlog answers 503)."""
    images = open_images(blobs, max_pixels, max_request_pixels, max_pixels_per_byte)
    total = pixels(images)
    if len(images) <= INLINE_IMAGES and total <= INLINE_PIXELS:
        return decode_preprocess(images, spec)
    return await pool.run(_decode_preprocess_and_release, images, spec, total)


def _decode_preprocess_and_release(
    images: list[Image.Image], spec: Preprocess, total: int
) -> tuple[np.ndarray, list[Letterbox]]:
    try:
        return decode_preprocess(images, spec)
    finally:
        images.clear()
        if total > TRIM_PIXELS:
            release_memory()


def release_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps large freed blocks in its arenas (one per decode
    thread), so without this a server's RSS stays at the peak of its largest decode."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def _check_count(n: int, limit: int) -> None:
    if n == 0:
        raise ApiError(400, "no_images",
                       'no images: send one or more multipart `file` fields or JSON {"images": [...]}')
    if n > limit:
        raise ApiError(400, "too_many_images", f"{n} images in one request, over the limit of {limit}")


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):  # a data URL, as a browser's FileReader produces
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"images[{index}] is not valid base64") from None


__all__ = ["DecodePool", "INLINE_IMAGES", "INLINE_PIXELS", "TRIM_PIXELS", "decode_preprocess", "open_images",
           "prepare", "read_images", "release_memory"]
