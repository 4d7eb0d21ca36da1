"""Prometheus metrics: request latency, batch sizes, backend time, queue depth, and the backend in use.

With ``kiln serve --workers N`` every worker process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, set up by the parent in
:mod:`kiln.serve.workers`) and ``/metrics``, whichever worker answers it, shows the sum over all of them.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, Info, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from kiln.serve.registry import ServedModel

_BACKEND_LABELS = ("backend", "device", "max_batch", "model", "precision")


def multiprocess_dir() -> str | None:
    """The shared sample folder when this process is one of several workers (prometheus_client reads
    the same variable when it is imported, so it must be set before then)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Prometheus metrics in their own registry (one per app, so tests can build many apps); in
    multiprocess mode the registry collects every worker's files instead."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        shared = multiprocess_dir()
        self.registry = CollectorRegistry()
        # Multiprocess metrics are written to files, not kept in a registry; the registry reads the files.
        own = None if shared else self.registry
        if shared:
            MultiProcessCollector(self.registry, path=shared)
        self.multiprocess = shared is not None
        self.latency = Histogram(
            "kiln_request_duration_seconds",
            "HTTP request latency by model, route and status",
            ["model", "route", "status"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=own,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "items per inference batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=own,
        )
        self.inference = Histogram(
            "kiln_inference_duration_seconds",
            "backend time per batch",
            ["model"],
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=own,
        )
        # Summed over live workers; in one process it follows the queue at each scrape.
        self.queue_depth = Gauge("kiln_queue_depth", "requests waiting per model", ["model"], registry=own,
                                 multiprocess_mode="livesum")
        # Info does not work across processes: the same sample from a gauge (every worker agrees on it).
        self.backend: Any = (
            Gauge("kiln_backend_info", "the runtime serving each model", _BACKEND_LABELS, registry=own,
                  multiprocess_mode="max")
            if shared else Info("kiln_backend", "the runtime serving each model", ["model"], registry=own)
        )
        self._latency_children: dict[tuple[str, str, int], Any] = {}
        self._watched: list[ServedModel] = []

    def observe_latency(self, model: str, route: str, status: int, seconds: float) -> None:
        """``latency.labels(...).observe``, with each label set's child looked up once: ``labels()``
        validates and locks on every call, a cost every request would pay. The label values are bounded
        (served model names, route templates, status codes), so the cache is too."""
        key = (model, route, status)
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self.latency.labels(model, route, str(status))
        child.observe(seconds)

    def watch(self, model: ServedModel) -> None:
        """Follow the model's queue depth and record every batch its worker runs."""
        depth = self.queue_depth.labels(model.name)
        if not self.multiprocess:
            depth.set_function(model.batcher.qsize)
        self._watched.append(model)
        batch, infer = self.batch_size.labels(model.name), self.inference.labels(model.name)
        multiprocess = self.multiprocess

        def on_batch(items: int, seconds: float) -> None:
            batch.observe(items)
            infer.observe(seconds)
            if multiprocess:  # sampled once per batch: a scrape reaches one worker, not all of them
                depth.set(model.batcher.qsize())

        model.batcher.on_batch = on_batch

    def loaded(self, model: ServedModel) -> None:
        """Record which backend, precision and device won once the model has loaded."""
        b = model.batcher.backend
        if b is None:
            return
        labels = {"backend": b.name, "precision": b.precision, "device": b.device,
                  "max_batch": str(model.batcher.max_items)}
        if self.multiprocess:
            self.backend.labels(model=model.name, **labels).set(1)
        else:
            self.backend.labels(model.name).info(labels)

    def render(self) -> bytes:
        """The text exposition format, served with :attr:`content_type`."""
        if self.multiprocess:
            for m in self._watched:
                self.queue_depth.labels(m.name).set(m.batcher.qsize())
        return generate_latest(self.registry)


__all__ = ["Metrics", "multiprocess_dir"]
