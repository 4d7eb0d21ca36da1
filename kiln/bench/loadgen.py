"""A load generator for a running kiln server, in the spirit of Triton's perf_analyzer.

* Closed loop (``concurrency=[1, 8, 32]``): C connections each keep one request in flight; one level
  after another. Throughput is what the server sustains at that concurrency.
* Open loop (``rate=R``): requests start at Poisson arrival times (exponential gaps, mean 1/R) whether or
  not earlier ones finished, the way independent clients arrive; the in-flight count is capped
  (``max_inflight``) and arrivals beyond the cap are counted as ``dropped``.

Each level reports latency percentiles of successful requests, requests/s, errors by HTTP status (or
transport error name), the client's own CPU time, and the server-side batch size distribution: the
difference of the batch size histogram on ``/metrics`` before and after the level.

The generator must not be what limits the numbers. Each client process runs one event loop (uvloop when
installed) over raw keep-alive HTTP/1.1 connections (:mod:`kiln.bench.client`) sending one pre-encoded
request; ``client_procs`` > 1 splits every level across that many processes (connections, rate, caps
and warm-up divided between them; a sum of Poisson processes is a Poisson process) and merges their
samples. Connections are opened and warmed before the timed window starts, at the same instant in
every process. Every loop is bounded in time (``duration``) and count (``max_requests``).
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kiln.bench.client import Endpoint
from kiln.bench.environment import environment
from kiln.bench.server import histogram_diff, prepare_request, scrape_batches
from kiln.bench.stats import PERCENTILES, summarize
from kiln.bench.worker import ClientProcesses, Share, ShareResult, client_loop_name, run_share, split
from kiln.errors import ConfigError, unknown_choice

log = logging.getLogger("kiln.bench")

# One client process using this much of its core may be what limits the numbers.
HIGH_CPU_FRACTION = 0.7
DEFAULT_CONCURRENCY = [1, 8, 32, 64]
PROTOCOLS = ("native", "v2")
ENCODINGS = ("json", "multipart")


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
    client_procs: int = 1

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got '{self.url}'")
        try:
            endpoint = Endpoint.from_url(self.url)  # the port is checked here: a number in 0-65535
        except ValueError as exc:
            raise ConfigError(f"--url '{self.url}' is not a valid URL: {exc}") from None
        if endpoint.port == 0:
            raise ConfigError(f"--url '{self.url}' needs a host and a port in 1-65535")
        if not self.model:
            raise ConfigError("--model is required with --url (the model name on the server)")
        if self.concurrency is not None and self.rate is not None:
            raise ConfigError("give either --concurrency (closed loop) or --rate (open loop), not both")
        if self.concurrency is None and self.rate is None:
            self.concurrency = list(DEFAULT_CONCURRENCY)
        if self.protocol not in PROTOCOLS:
            raise unknown_choice("protocol", self.protocol, PROTOCOLS, flag="--protocol")
        if self.encoding not in ENCODINGS:
            raise unknown_choice("encoding", self.encoding, ENCODINGS, flag="--encoding")
        if self.protocol == "v2" and self.image is not None:
            raise ConfigError(
                "--image is for the native protocol; v2 sends a random tensor of the model's input shape")
        for name in ("duration", "timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_requests", "max_inflight", "images_per_request", "client_procs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.concurrency is not None and any(c < 1 for c in self.concurrency):
            raise ConfigError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def levels(self) -> list[tuple[str, float]]:
        if self.rate is not None:
            return [("rate", self.rate)]
        return [("concurrency", c) for c in self.concurrency or []]

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        out["api_key"] = "***" if self.api_key else None
        return out


def make_shares(cfg: LoadConfig, mode: str, value: float, endpoint: Endpoint, payload: bytes) -> list[Share]:
    if mode == "concurrency":
        n = min(cfg.client_procs, int(value))
        conc = split(int(value), n)
        rates = [0.0] * n
    else:
        n = min(cfg.client_procs, cfg.max_inflight)
        conc = split(cfg.max_inflight, n)
        rates = [value / n] * n
    warm, caps = split(cfg.warmup, n), split(cfg.max_requests, n)
    return [Share(mode, endpoint, payload, conc[i], rates[i], cfg.duration, caps[i], warm[i], cfg.timeout,
                  cfg.seed + i) for i in range(n)]



# ---- levels and the report -----------------------------------------------------------------------


@dataclass
class Level:
    """What one concurrency level or rate measured, merged over the client processes."""

    mode: str  # "concurrency" | "rate"
    value: float
    results: list[ShareResult]
    server_batches: dict[str, Any] | None = None
    metrics_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        rs = self.results
        statuses: Counter[str] = sum((r.statuses for r in rs), Counter())
        latencies = [x for r in rs for x in r.latencies_ms]
        start = min(r.start for r in rs)
        elapsed = max(r.end for r in rs) - start  # closed loop: the run; open loop: the arrival window
        drain = max(r.drained for r in rs) - start - elapsed
        window = elapsed + drain
        sent = sum(statuses.values())
        ok = sum(n for s, n in statuses.items() if s.startswith("2"))
        cpu = [r.cpu_s for r in rs]
        out: dict[str, Any] = {
            "mode": self.mode,
            self.mode: self.value,
            "requests": sent,
            "ok": ok,
            "errors": {s: n for s, n in sorted(statuses.items()) if not s.startswith("2")},
            "elapsed_s": elapsed,
            "requests_per_s": sent / elapsed if elapsed > 0 else 0.0,
            "ok_per_s": ok / elapsed if elapsed > 0 else 0.0,
            "latency_ms": summarize(latencies, PERCENTILES) if latencies else None,
            "drain_s": drain,
            "client_procs": len(rs),
            "client_cpu_s": sum(cpu),
            # In cores: above 1 with several client processes.
            "client_cpu_fraction": sum(cpu) / window if window > 0 else 0.0,
            "client_cpu_max_fraction": max(cpu) / window if window > 0 else 0.0,
            "connections_opened": sum(r.connections for r in rs),
            "retries": sum(r.retries for r in rs),
            "server_batch_size": self.server_batches,
            "samples_ms": [round(x, 4) for x in latencies],
        }
        if self.mode == "rate":
            lags = [x for r in rs for x in r.lag_ms]
            out["dropped"] = sum(r.dropped for r in rs)
            out["schedule_lag_ms"] = summarize(lags, PERCENTILES) if lags else None
        if self.metrics_note:
            out["metrics_note"] = self.metrics_note
        return out


def _run_level(cfg: LoadConfig, mode: str, value: float, endpoint: Endpoint, payload: bytes,
               procs: ClientProcesses | None) -> Level:
    shares = make_shares(cfg, mode, value, endpoint, payload)
    before: dict[str, Any] = {}

    def scrape_before() -> None:
        before["hist"], before["note"] = scrape_batches(cfg.url, cfg.model, cfg.batch_metric, cfg.headers,
                                                        cfg.timeout)

    def scrape_then_start() -> float:
        scrape_before()
        return time.monotonic()

    results = [run_share(shares[0], scrape_then_start)] if procs is None else procs.run(shares, scrape_before)
    level = Level(mode, value, results)
    after, note_after = scrape_batches(cfg.url, cfg.model, cfg.batch_metric, cfg.headers, cfg.timeout)
    if after is not None and before["hist"] is not None:
        level.server_batches = histogram_diff(before["hist"], after)
    else:
        level.metrics_note = before["note"] or note_after
    return level


def _warnings(cfg: LoadConfig, rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for row in rows:
        what = f"{row['mode']} {row[row['mode']]:g}"
        if row["client_cpu_max_fraction"] > HIGH_CPU_FRACTION:
            out.append(
                f"{what}: a load generator process used {row['client_cpu_max_fraction']:.0%} of a core; it "
                "may be the bottleneck (add --client-procs, run it on another machine, "
                "or send fewer images per request)")
        if row["mode"] == "rate" and row.get("dropped"):
            out.append(
                f"rate {row['rate']:g}: {row['dropped']} arrivals "
                f"dropped at --max-inflight {cfg.max_inflight}")
    return out


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run every level and return the report (environment, config, server, levels, warnings)."""
    endpoint = Endpoint.from_url(cfg.url)
    request, server_info = prepare_request(
        cfg.url, cfg.model, cfg.headers, cfg.timeout, protocol=cfg.protocol, encoding=cfg.encoding,
        image=cfg.image, images_per_request=cfg.images_per_request, seed=cfg.seed)
    payload = request.payload(endpoint, cfg.headers)
    usage0 = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    procs = ClientProcesses(cfg.client_procs) if cfg.client_procs > 1 else None
    levels: list[Level] = []
    try:
        for mode, value in cfg.levels():
            levels.append(_run_level(cfg, mode, value, endpoint, payload, procs))
            log.info("bench: %s %g: %d requests", mode, value,
                     sum(sum(r.statuses.values()) for r in levels[-1].results))
    finally:
        if procs is not None:
            procs.close()  # joined first, so RUSAGE_CHILDREN below includes them
    usage1 = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    rows = [lv.to_json() for lv in levels]
    return {
        "mode": "server",
        "url": cfg.url,
        "model": cfg.model,
        "server": server_info,
        "environment": environment(),
        "config": cfg.to_json(),
        "client": {"procs": cfg.client_procs, "event_loop": client_loop_name(),
                   "request_bytes": len(payload)},
        "client_rusage": {
            "user_s": sum(b.ru_utime - a.ru_utime for a, b in zip(usage0, usage1, strict=True)),
            "system_s": sum(b.ru_stime - a.ru_stime for a, b in zip(usage0, usage1, strict=True)),
            "max_rss_kb": max(u.ru_maxrss for u in usage1),
        },
        "levels": rows,
        "warnings": _warnings(cfg, rows),
    }
