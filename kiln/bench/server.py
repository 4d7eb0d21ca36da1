"""What the load generator needs from the server under test: its model metadata, request bodies built
from it, and the batch size histogram on ``/metrics``."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.bench.client import Endpoint, encode_request, http_get
from kiln.errors import InputError, KilnError

log = logging.getLogger("kiln.bench")


class ServerError(KilnError):
    """The server cannot be benchmarked (unreachable, unknown model, metadata missing)."""


@dataclass(frozen=True)
class Request:
    """A request body encoded once: every request of a run sends the same bytes."""

    path: str
    content: bytes
    content_type: str

    def payload(self, endpoint: Endpoint, headers: Mapping[str, str]) -> bytes:
        """The whole request on the wire (line, headers, body)."""
        return encode_request("POST", self.path, endpoint, {"Content-Type": self.content_type, **headers},
                              self.content)


# ---- request bodies ------------------------------------------------------------------------------


def noise_png(height: int = 64, width: int = 64, channels: int = 3, seed: int = 0) -> bytes:
    """A random-noise PNG, the default image when --image is not given."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode="L" if channels == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def multipart_body(files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data body of ``(field, filename, data)`` parts."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, filename, data in files:
        # Quotes and line breaks would end the header value early; browsers percent-encode them.
        safe = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def native_request(model: str, image: bytes, n: int = 1, encoding: str = "json",
                   filename: str = "image.png") -> Request:
    """POST /v1/models/{model}/predict with ``n`` copies of ``image`` (JSON base64 or multipart)."""
    path = f"/v1/models/{model}/predict"
    if encoding == "json":
        b64 = base64.b64encode(image).decode("ascii")
        return Request(path, json.dumps({"images": [b64] * n}).encode(), "application/json")
    body, ctype = multipart_body([("file", filename, image)] * n)
    return Request(path, body, ctype)


def v2_request(model: str, metadata: dict[str, Any], n: int = 1, seed: int = 0) -> Request:
    """POST /v2/models/{model}/infer with a random tensor shaped like the model's first input."""
    try:
        spec = metadata["inputs"][0]
        shape = [n, *[int(d) for d in spec["shape"][1:]]]
        datatype = str(spec["datatype"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ServerError(f"v2 metadata of model '{model}' has no usable input: {exc}") from None
    if any(d < 1 for d in shape):
        raise ServerError(
            f"v2 metadata of model '{model}' has a dynamic non-batch dimension: {spec['shape']}")
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
    values = data.round(4).tolist() if datatype.startswith("FP") else (data * 100).astype(int).tolist()
    body = {"inputs": [{"name": spec["name"], "shape": shape, "datatype": datatype, "data": values}]}
    return Request(f"/v2/models/{model}/infer", json.dumps(body).encode(), "application/json")


def read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InputError(f"--image: cannot read {path}: {exc.strerror}") from None


def prepare_request(url: str, model: str, headers: Mapping[str, str], timeout: float, *, protocol: str,
                    encoding: str, image: str | None, images_per_request: int,
                    seed: int) -> tuple[Request, dict[str, Any]]:
    """Check the server answers, read the model's metadata and encode the request body once.

    Returns the request and what the metadata says about the server (name, platform, parameters).
    """
    try:
        status, body = http_get(url, f"/v2/models/{model}", headers, timeout)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ServerError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if status == 404:
        raise ServerError(f"{url} has no model '{model}' (GET /v2/models/{model} answered 404)")
    try:
        metadata = json.loads(body) if status == 200 else {}
    except ValueError:
        raise ServerError(
            f"{url} is not a kiln/KServe v2 server: GET /v2/models/{model} is not JSON") from None
    info = {k: metadata.get(k) for k in ("name", "platform", "parameters") if k in metadata}
    if protocol == "v2":
        if status != 200:
            raise ServerError(
                f"GET /v2/models/{model} answered {status}: {body[:200].decode(errors='replace')}")
        return v2_request(model, metadata, images_per_request, seed), info
    if image is not None:
        data, name = read_image(image), os.path.basename(image)
    else:
        c, h, w = 3, 64, 64
        try:
            c, h, w = (int(d) for d in metadata["inputs"][0]["shape"][1:4])
        except (KeyError, IndexError, TypeError, ValueError):
            # Without metadata (a 401 here, say) the requests still go out and their statuses are counted.
            log.info("bench: no input shape in the v2 metadata; sending a 64x64 RGB noise image")
        data, name = noise_png(h, w, 1 if c == 1 else 3, seed), "noise.png"
    return native_request(model, data, images_per_request, encoding, name), info


# ---- /metrics ------------------------------------------------------------------------------------


def batch_histogram(text: str, model: str | None = None, metric: str | None = None) -> dict[str, Any] | None:
    """The batch size histogram in a Prometheus exposition: ``{"name", "buckets": {le: cumulative}, "count",
    "sum"}``.

    ``metric`` names the family; by default the first histogram whose name contains ``batch_size``.
    With several label sets (models), only samples whose ``model`` label equals ``model`` are summed.
    Returns None when there is no such histogram.
    """
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        if metric is not None and family.name != metric.removesuffix("_bucket"):
            continue
        if metric is None and "batch_size" not in family.name:
            continue
        buckets: dict[str, float] = {}
        count = total = 0.0
        for s in family.samples:
            if model is not None and "model" in s.labels and s.labels["model"] != model:
                continue
            if s.name.endswith("_bucket"):
                le = s.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum"):
                total += s.value
        return {"name": family.name, "buckets": buckets, "count": count, "sum": total}
    return None


def _le_key(le: str) -> float:
    return math.inf if le in ("+Inf", "Inf", "inf") else float(le)


def histogram_diff(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """Batches observed between two scrapes: count, mean size and counts per bucket (not cumulative)."""
    prev = before["buckets"] if before else {}
    count = after["count"] - (before["count"] if before else 0.0)
    total = after["sum"] - (before["sum"] if before else 0.0)
    dist: list[dict[str, Any]] = []
    below = 0.0
    lower = 0.0
    for le in sorted(after["buckets"], key=_le_key):
        cum = after["buckets"][le] - prev.get(le, 0.0)
        n = cum - below
        below = cum
        upper = _le_key(le)
        if n > 0:
            lo = math.floor(lower) + 1
            label = f">{lower:g}" if math.isinf(upper) else (
                f"{upper:g}" if lo >= upper else f"{lo}-{upper:g}")
            dist.append({"le": le, "range": label, "batches": int(round(n))})
        lower = upper
    return {
        "metric": after["name"],
        "batches": int(round(count)),
        "items": total,
        "mean": total / count if count > 0 else None,
        "distribution": dist,
    }


def scrape_batches(url: str, model: str, metric: str | None, headers: Mapping[str, str],
                   timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """(the batch size histogram, None), or (None, why it could not be read)."""
    try:
        status, body = http_get(url, "/metrics", headers, timeout)
    except (OSError, http.client.HTTPException) as exc:
        return None, f"/metrics unreachable: {type(exc).__name__}"
    if status != 200:
        return None, f"/metrics answered {status}"
    try:
        hist = batch_histogram(body.decode("utf-8", errors="replace"), model, metric)
    except ValueError as exc:
        return None, f"/metrics is not a Prometheus exposition: {exc}"
    if hist is None:
        return None, "no batch size histogram on /metrics"
    return hist, None
