"""Prometheus metrics: request latency, batch sizes, backend time, queue depth, and the backend in use."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, Info, generate_latest

from kiln.serve.registry import ServedModel


class Metrics:
    """Prometheus metrics in their own registry (one per app, so tests can build many apps)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "kiln_request_duration_seconds",
            "HTTP request latency by model, route and status",
            ["model", "route", "status"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "items per inference batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.inference = Histogram(
            "kiln_inference_duration_seconds",
            "backend time per batch",
            ["model"],
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.queue_depth = Gauge("kiln_queue_depth", "requests waiting per model", ["model"], registry=self.registry)
        self.backend = Info("kiln_backend", "the runtime serving each model", ["model"], registry=self.registry)

    def watch(self, model: ServedModel) -> None:
        """Follow the model's queue depth and record every batch its worker runs."""
        self.queue_depth.labels(model.name).set_function(model.batcher.qsize)
        batch, infer = self.batch_size.labels(model.name), self.inference.labels(model.name)

        def on_batch(items: int, seconds: float) -> None:
            batch.observe(items)
            infer.observe(seconds)

        model.batcher.on_batch = on_batch

    def loaded(self, model: ServedModel) -> None:
        """Record which backend, precision and device won once the model has loaded."""
        b = model.batcher.backend
        if b is not None:
            self.backend.labels(model.name).info(
                {"backend": b.name, "precision": b.precision, "device": b.device, "max_batch": str(model.batcher.max_items)}
            )

    def render(self) -> bytes:
        """The text exposition format, served with :attr:`content_type`."""
        return generate_latest(self.registry)


__all__ = ["Metrics"]
