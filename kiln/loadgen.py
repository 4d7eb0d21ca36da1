"""A load generator for a running kiln server, in the spirit of Triton's perf_analyzer.

* Closed loop (``--concurrency 1,8,32``): C workers each keep one request in flight; one level after
  another. Throughput is what the server sustains at that concurrency.
* Open loop (``--rate R``): requests start at Poisson arrival times (exponential gaps, mean 1/R) whether
  or not earlier ones finished, the way independent clients arrive; the in-flight count is capped
  (``--max-inflight``) and arrivals beyond the cap are counted as ``dropped``.

Each level reports latency percentiles of successful requests, requests/s, errors by HTTP status (or
transport error name), the generator's own CPU use, and the server-side batch size distribution: the
difference of the batch size histogram on ``/metrics`` before and after the level.

One asyncio event loop and one httpx connection pool sized to the concurrency drive everything, and
request bodies are encoded once, so the generator stays cheap. On a small machine the client and the
server still share the same cores: its CPU use is reported, with a warning when it is high.
Every loop is bounded in time (``--duration``) and count (``--max-requests``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import math
import os
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.bench import environment, render_table, summarize, write_json
from kiln.errors import ConfigError, InputError, KilnError

log = logging.getLogger("kiln.bench")

# One core fully busy in the generator means it may be what limits the numbers.
HIGH_CPU_FRACTION = 0.7
DEFAULT_CONCURRENCY = [1, 8, 32, 64]
PERCENTILES = (50, 90, 95, 99)


class ServerError(KilnError):
    """The server cannot be benchmarked (unreachable, unknown model, metadata missing)."""


@dataclass
class LoadConfig:
    url: str
    model: str
    concurrency: list[int] | None = None
    rate: float | None = None
    duration: float = 10.0
    warmup: int = 20
    protocol: str = "native"
    encoding: str = "json"
    image: str | None = None
    images_per_request: int = 1
    timeout: float = 30.0
    max_requests: int = 100_000
    max_inflight: int = 512
    api_key: str | None = None
    batch_metric: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got '{self.url}'")
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(self.url)
            port = parts.port  # raises ValueError when out of range or not a number
        except ValueError as exc:
            raise ConfigError(f"--url '{self.url}' is not a valid URL: {exc}") from None
        if not parts.hostname or (port is not None and port == 0):
            raise ConfigError(f"--url '{self.url}' needs a host and a port in 1-65535")
        if not self.model:
            raise ConfigError("--model is required with --url (the model name on the server)")
        if self.concurrency is not None and self.rate is not None:
            raise ConfigError("give either --concurrency (closed loop) or --rate (open loop), not both")
        if self.concurrency is None and self.rate is None:
            self.concurrency = list(DEFAULT_CONCURRENCY)
        if self.protocol not in ("native", "v2"):
            raise ConfigError(f"--protocol: unknown protocol '{self.protocol}'. Valid: native, v2")
        if self.encoding not in ("json", "multipart"):
            raise ConfigError(f"--encoding: unknown encoding '{self.encoding}'. Valid: json, multipart")
        if self.protocol == "v2" and self.image is not None:
            raise ConfigError("--image is for the native protocol; v2 sends a random tensor of the model's input shape")
        for name in ("duration", "timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_requests", "max_inflight", "images_per_request"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class Request:
    """A pre-encoded request: sent as is every time so encoding costs nothing per request."""

    path: str
    content: bytes
    content_type: str


@dataclass
class Level:
    """What one concurrency level or rate measured."""

    mode: str  # "concurrency" | "rate"
    value: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0  # the measured window: the run (closed loop) or the arrival window (open loop)
    drain_s: float = 0.0  # open loop: waiting for requests still in flight after the last arrival
    cpu_s: float = 0.0
    dropped: int = 0
    lag_ms: list[float] = field(default_factory=list)
    server_batches: dict[str, Any] | None = None
    metrics_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        sent = sum(self.statuses.values())
        ok = sum(n for s, n in self.statuses.items() if s.startswith("2"))
        out: dict[str, Any] = {
            "mode": self.mode,
            self.mode: self.value,
            "requests": sent,
            "ok": ok,
            "errors": {s: n for s, n in sorted(self.statuses.items()) if not s.startswith("2")},
            "elapsed_s": self.elapsed_s,
            "requests_per_s": sent / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            "ok_per_s": ok / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            "latency_ms": summarize(self.latencies_ms, PERCENTILES) if self.latencies_ms else None,
            "drain_s": self.drain_s,
            "client_cpu_s": self.cpu_s,
            "client_cpu_fraction": (self.cpu_s / (self.elapsed_s + self.drain_s)
                                    if self.elapsed_s + self.drain_s > 0 else 0.0),
            "server_batch_size": self.server_batches,
            "samples_ms": [round(x, 4) for x in self.latencies_ms],
        }
        if self.mode == "rate":
            out["dropped"] = self.dropped
            out["schedule_lag_ms"] = summarize(self.lag_ms, PERCENTILES) if self.lag_ms else None
        if self.metrics_note:
            out["metrics_note"] = self.metrics_note
        return out


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


def native_request(model: str, image: bytes, n: int = 1, encoding: str = "json",
                   filename: str = "image.png") -> Request:
    """POST /v1/models/{model}/predict with ``n`` copies of ``image`` (JSON base64 or multipart)."""
    path = f"/v1/models/{model}/predict"
    if encoding == "json":
        b64 = base64.b64encode(image).decode("ascii")
        return Request(path, json.dumps({"images": [b64] * n}).encode(), "application/json")
    import httpx

    # Let httpx build the multipart body once, then reuse its bytes and boundary.
    built = httpx.Request("POST", "http://x" + path, files=[("file", (filename, image, "application/octet-stream"))] * n)
    return Request(path, built.read(), built.headers["content-type"])


def v2_request(model: str, metadata: dict[str, Any], n: int = 1, seed: int = 0) -> Request:
    """POST /v2/models/{model}/infer with a random tensor shaped like the model's first input."""
    try:
        spec = metadata["inputs"][0]
        shape = [n, *[int(d) for d in spec["shape"][1:]]]
        datatype = str(spec["datatype"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ServerError(f"v2 metadata of model '{model}' has no usable input: {exc}") from None
    if any(d < 1 for d in shape):
        raise ServerError(f"v2 metadata of model '{model}' has a dynamic non-batch dimension: {spec['shape']}")
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
    values = data.round(4).tolist() if datatype.startswith("FP") else (data * 100).astype(int).tolist()
    body = {"inputs": [{"name": spec["name"], "shape": shape, "datatype": datatype, "data": values}]}
    return Request(f"/v2/models/{model}/infer", json.dumps(body).encode(), "application/json")


# ---- /metrics ------------------------------------------------------------------------------------


def batch_histogram(text: str, model: str | None = None, metric: str | None = None) -> dict[str, Any] | None:
    """The batch size histogram in a Prometheus exposition: ``{"name", "buckets": {le: cumulative}, "count", "sum"}``.

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
    edges = sorted(after["buckets"], key=_le_key)
    dist: list[dict[str, Any]] = []
    below = 0.0
    lower = 0.0
    for le in edges:
        cum = after["buckets"][le] - prev.get(le, 0.0)
        n = cum - below
        below = cum
        upper = _le_key(le)
        if n > 0:
            lo = math.floor(lower) + 1
            label = f">{lower:g}" if math.isinf(upper) else (f"{upper:g}" if lo >= upper else f"{lo}-{upper:g}")
            dist.append({"le": le, "range": label, "batches": int(round(n))})
        lower = upper
    return {
        "metric": after["name"],
        "batches": int(round(count)),
        "items": total,
        "mean": total / count if count > 0 else None,
        "distribution": dist,
    }


# ---- the generator -------------------------------------------------------------------------------


class LoadGenerator:
    """Runs the levels of a :class:`LoadConfig` against one server from one event loop."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.request: Request | None = None
        self.server_info: dict[str, Any] = {}

    async def _get(self, client: Any, path: str) -> Any:
        return await client.get(self.cfg.url + path, headers=self.cfg.headers, timeout=self.cfg.timeout)

    async def prepare(self, client: Any) -> None:
        """Check the server answers, read the model's metadata and encode the request body once."""
        import httpx

        cfg = self.cfg
        try:
            meta = await self._get(client, f"/v2/models/{cfg.model}")
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise ServerError(f"cannot reach {cfg.url}: {type(exc).__name__}: {exc}") from None
        if meta.status_code == 404:
            raise ServerError(f"{cfg.url} has no model '{cfg.model}' (GET /v2/models/{cfg.model} answered 404)")
        try:
            metadata = meta.json() if meta.status_code == 200 else {}
        except ValueError:
            raise ServerError(f"{cfg.url} is not a kiln/KServe v2 server: GET /v2/models/{cfg.model} is not JSON") from None
        self.server_info = {k: metadata.get(k) for k in ("name", "platform", "parameters") if k in metadata}
        if cfg.protocol == "v2":
            if meta.status_code != 200:
                raise ServerError(f"GET /v2/models/{cfg.model} answered {meta.status_code}: {meta.text[:200]}")
            self.request = v2_request(cfg.model, metadata, cfg.images_per_request, cfg.seed)
            return
        if cfg.image is not None:
            try:
                with open(cfg.image, "rb") as fh:
                    image = fh.read()
            except OSError as exc:
                raise InputError(f"--image: cannot read {cfg.image}: {exc.strerror}") from None
            name = os.path.basename(cfg.image)
        else:
            c, h, w = 3, 64, 64
            try:
                c, h, w = (int(d) for d in metadata["inputs"][0]["shape"][1:4])
            except (KeyError, IndexError, TypeError, ValueError):
                log.info("bench: no input shape in the v2 metadata; sending a 64x64 RGB noise image")
            image, name = noise_png(h, w, 1 if c == 1 else 3, cfg.seed), "noise.png"
        self.request = native_request(cfg.model, image, cfg.images_per_request, cfg.encoding, name)

    async def _send(self, client: Any) -> tuple[str, float]:
        """One request: (status code or transport error name, latency ms)."""
        import httpx

        req = self.request
        if req is None:
            raise RuntimeError("LoadGenerator.prepare() must run before requests are sent")
        headers = {"content-type": req.content_type, **self.cfg.headers}
        t0 = time.perf_counter()
        try:
            resp = await client.post(self.cfg.url + req.path, content=req.content, headers=headers)
            await resp.aread()
            status = str(resp.status_code)
        except httpx.TimeoutException:
            status = "timeout"
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return status, (time.perf_counter() - t0) * 1000.0

    async def _scrape(self, client: Any) -> tuple[dict[str, Any] | None, str | None]:
        import httpx

        try:
            resp = await self._get(client, "/metrics")
        except httpx.HTTPError as exc:
            return None, f"/metrics unreachable: {type(exc).__name__}"
        if resp.status_code != 200:
            return None, f"/metrics answered {resp.status_code}"
        try:
            hist = batch_histogram(resp.text, self.cfg.model, self.cfg.batch_metric)
        except ValueError as exc:
            return None, f"/metrics is not a Prometheus exposition: {exc}"
        if hist is None:
            return None, "no batch size histogram on /metrics"
        return hist, None

    def _client(self, pool: int) -> Any:
        import httpx

        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        return httpx.AsyncClient(limits=limits, timeout=self.cfg.timeout)

    async def closed_level(self, concurrency: int) -> Level:
        cfg = self.cfg
        level = Level("concurrency", concurrency)
        async with self._client(concurrency) as client:
            if self.request is None:
                await self.prepare(client)
            await self._warm(client, concurrency)
            before, note = await self._scrape(client)
            sent = 0
            deadline = time.perf_counter() + cfg.duration

            async def worker() -> None:
                nonlocal sent
                while sent < cfg.max_requests and time.perf_counter() < deadline:
                    sent += 1
                    status, ms = await self._send(client)
                    level.statuses[status] += 1
                    if status.startswith("2"):
                        level.latencies_ms.append(ms)

            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            level.elapsed_s = time.perf_counter() - t0
            level.cpu_s = time.process_time() - cpu0
            await self._attach_batches(client, level, before, note)
        return level

    async def open_level(self, rate: float) -> Level:
        cfg = self.cfg
        level = Level("rate", rate)
        rng = random.Random(cfg.seed)
        async with self._client(cfg.max_inflight) as client:
            if self.request is None:
                await self.prepare(client)
            await self._warm(client, min(cfg.max_inflight, max(1, math.ceil(rate / 100))))
            before, note = await self._scrape(client)
            inflight: set[asyncio.Task[None]] = set()

            async def one(scheduled: float) -> None:
                level.lag_ms.append((time.perf_counter() - scheduled) * 1000.0)
                status, ms = await self._send(client)
                level.statuses[status] += 1
                if status.startswith("2"):
                    level.latencies_ms.append(ms)

            cpu0, t0 = time.process_time(), time.perf_counter()
            at = t0
            for _ in range(cfg.max_requests):
                at += rng.expovariate(rate)
                if at - t0 > cfg.duration:
                    break
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(inflight) >= cfg.max_inflight:
                    level.dropped += 1
                    continue
                task = asyncio.create_task(one(at))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            # Rates are per arrival window: the drain below would otherwise dilute them on a slow server.
            level.elapsed_s = time.perf_counter() - t0
            if inflight:
                # Bounded: every request has its own timeout, so this ends within cfg.timeout.
                await asyncio.wait(set(inflight), timeout=cfg.timeout + 5)
            level.drain_s = time.perf_counter() - t0 - level.elapsed_s
            level.cpu_s = time.process_time() - cpu0
            await self._attach_batches(client, level, before, note)
        return level

    async def _warm(self, client: Any, concurrency: int) -> None:
        left = self.cfg.warmup

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self._send(client)

        if left:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, left))))

    async def _attach_batches(self, client: Any, level: Level, before: dict[str, Any] | None,
                              note: str | None) -> None:
        after, note_after = await self._scrape(client)
        if after is not None and before is not None:
            level.server_batches = histogram_diff(before, after)
        else:
            level.metrics_note = note or note_after

    async def run(self) -> list[Level]:
        levels: list[Level] = []
        if self.cfg.rate is not None:
            levels.append(await self.open_level(self.cfg.rate))
        else:
            for c in self.cfg.concurrency or []:
                level = await self.closed_level(c)
                levels.append(level)
                log.info("bench: concurrency %d: %d requests in %.1f s", c, sum(level.statuses.values()), level.elapsed_s)
        return levels


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run every level and return the report (environment, config, server, levels, warnings)."""
    gen = LoadGenerator(cfg)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    levels = asyncio.run(gen.run())
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    warnings: list[str] = []
    rows = [lv.to_json() for lv in levels]
    for row in rows:
        if row["client_cpu_fraction"] > HIGH_CPU_FRACTION:
            what = f"{row['mode']} {row[row['mode']]:g}"
            warnings.append(
                f"{what}: the load generator used {row['client_cpu_fraction']:.0%} of a core; it may be the "
                "bottleneck (run it on another machine, or with fewer images per request)"
            )
        if row["mode"] == "rate" and row.get("dropped"):
            warnings.append(f"rate {row['rate']:g}: {row['dropped']} arrivals dropped at --max-inflight {cfg.max_inflight}")
    cfg_json = {k: v for k, v in cfg.__dict__.items() if k != "api_key"}
    cfg_json["api_key"] = "***" if cfg.api_key else None
    return {
        "mode": "server",
        "url": cfg.url,
        "model": cfg.model,
        "server": gen.server_info,
        "environment": environment(),
        "config": cfg_json,
        "client_rusage": {
            "user_s": usage1.ru_utime - usage0.ru_utime,
            "system_s": usage1.ru_stime - usage0.ru_stime,
            "max_rss_kb": usage1.ru_maxrss,
        },
        "levels": rows,
        "warnings": warnings,
    }


# ---- output and CLI ------------------------------------------------------------------------------


def _ms(stats: dict[str, float] | None, key: str) -> str:
    return f"{stats[key]:.2f}" if stats else "-"


def load_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    header = ["level", "requests", "req/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "errors", "batch mean", "client cpu"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for lv in report["levels"]:
        mode = lv["mode"]
        label = f"c={lv[mode]:g}" if mode == "concurrency" else f"rate={lv[mode]:g}/s"
        lat = lv["latency_ms"]
        errors = ", ".join(f"{k}:{v}" for k, v in lv["errors"].items()) or "0"
        sb = lv.get("server_batch_size")
        mean = f"{sb['mean']:.2f}" if sb and sb.get("mean") is not None else "-"
        rows.append([label, str(lv["requests"]), f"{lv['ok_per_s']:.1f}", _ms(lat, "p50"), _ms(lat, "p90"),
                     _ms(lat, "p95"), _ms(lat, "p99"), errors, mean, f"{lv['client_cpu_fraction']:.0%}"])
        if sb and sb["distribution"]:
            notes.append(f"{label} server batch sizes: " + ", ".join(f"{d['range']}: {d['batches']}" for d in sb["distribution"]))
        elif lv.get("metrics_note"):
            notes.append(f"{label}: {lv['metrics_note']}")
    notes.extend(f"warning: {w}" for w in report["warnings"])
    return header, rows, notes


def run_cli(args: argparse.Namespace) -> int:
    if args.model is None:
        raise ConfigError("--model NAME is required with --url (the model name on the server)")
    engine_only = [f for f in ("iters", "threads", "device", "images", "plot") if getattr(args, f, None) is not None]
    if engine_only:
        raise ConfigError(f"--{engine_only[0]} is an engine-mode option (it needs BUNDLE, not --url)")
    cfg = LoadConfig(
        url=args.url, model=args.model, concurrency=args.concurrency, rate=args.rate,
        duration=args.duration if args.duration is not None else 10.0,
        warmup=20 if args.warmup is None else args.warmup,
        protocol=args.protocol, encoding=args.encoding, image=args.image,
        images_per_request=args.images_per_request, timeout=args.timeout, max_requests=args.max_requests,
        max_inflight=args.max_inflight, api_key=args.api_key or os.environ.get("KILN_API_KEY") or None,
        batch_metric=args.batch_metric, seed=args.seed,
    )
    report = run_load(cfg)
    header, rows, notes = load_table(report)
    server = report["server"].get("parameters") or {}
    where = f"{server.get('backend', '?')} {server.get('precision', '')}".strip()
    title = (f"kiln bench {cfg.url} model {cfg.model} ({cfg.protocol}, {where}; "
             f"{cfg.duration:g} s per level; client and server share {os.cpu_count()} cores if on one machine)")
    print(render_table(title, header, rows, notes, left=1), end="")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    ok = any(lv["ok"] for lv in report["levels"])
    return 0 if ok else 1
