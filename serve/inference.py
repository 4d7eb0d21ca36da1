"""One inference request, whatever protocol brought it: the model's input read (encoded images or a
tensor), decoded and preprocessed, run on the model's batcher, and the outputs returned.

Every protocol (native ``/v1``, KServe v2 REST, KServe v2 gRPC) is an adapter around :func:`infer`: it
looks the model up in the registry, gives :func:`infer` an awaitable that reads its wire format into the
model's input, and turns the outputs (and the typed errors raised here, through
:data:`kiln.serve.errors.ERRORS`) into its own answer. A request goes protocol module -> this module ->
:mod:`kiln.serve.batcher` (and :mod:`kiln.serve.images` for encoded images).

The read runs inside :meth:`Batcher.announce`, so a batch being formed waits for a request whose body is
still being read or decoded; a lone request on an idle, cheap backend runs inline on the event loop
(:meth:`Batcher.run_inline`), anything else is queued for the batch worker and awaited with the
request's deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from kiln.processing import Letterbox
from kiln.runtime.base import Backend
from kiln.serve.batcher import wait_result
from kiln.serve.images import DecodePool, prepare
from kiln.serve.registry import ServedModel
from kiln.serve.settings import Settings
from kiln.serve.triton_ext import Stats

T = TypeVar("T")

# The model's input as a protocol read it: encoded images (decoded and preprocessed here, within the
# settings' pixel budget) or the input tensor itself, with its leading batch axis.
Input = list[bytes] | np.ndarray
Outputs = dict[str, np.ndarray]

_UNCOUNTED = contextlib.nullcontext()  # reusable: a protocol without Triton's statistics


async def infer(
    model: ServedModel,
    read: Coroutine[Any, Any, tuple[Input, T]],
    request_id: str,
    settings: Settings,
    slots: DecodePool,
    stats: Stats | None = None,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[Outputs, list[Letterbox] | None, T, Backend]:
    """Run one request on ``model``; ``read`` yields its input and whatever the protocol needs again to
    answer (its controls, the outputs it asked for), returned as is.

    Returns the outputs, the letterbox of each encoded image (None for a tensor), the protocol's part and
    the backend that ran it. Raises the typed errors of :mod:`kiln.serve.batcher` (not ready, queue full,
    timeout, failure), :class:`~kiln.processing.ImageDecodeError` and whatever ``read`` raises. With
    ``stats``, the request is counted as a success or a failure (Triton's statistics extension);
    ``disconnected`` is polled while the request waits, to give up on a client that went away.
    """
    try:
        backend = model.check_ready()
    except BaseException:
        read.close()  # never started: no "coroutine was never awaited" warning
        raise
    timeout = settings.timeout_s
    with stats.request(model.name) if stats is not None else _UNCOUNTED:
        with model.batcher.announce() as arrival:
            data, part = await read
            if isinstance(data, list):
                x, boxes = await prepare(data, model.manifest.preprocess, settings.max_image_pixels, settings.max_request_pixels, slots, settings.max_pixels_per_byte)  # noqa: E501
            else:
                x, boxes = data, None
            del data  # the request's bytes are not needed while it waits for the batcher
            feeds = {model.manifest.input.name: x}
            out = model.batcher.run_inline(feeds, request_id)  # a lone request on an idle, cheap backend
            if out is None:
                fut = arrival.submit(feeds, request_id, timeout)
        if out is None:
            out = await wait_result(fut, timeout, disconnected)
    return out, boxes, part, backend


__all__ = ["Input", "Outputs", "infer"]
