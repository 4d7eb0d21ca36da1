"""The models a server serves: one :class:`ServedModel` (bundle + batcher) per name, their readiness,
and :meth:`Registry.get`, the one place a protocol (native REST, KServe v2) asks for a model.

Protocol-neutral: errors are typed (:class:`ModelNotFound`, the batcher's :class:`ModelNotReady`) and
each protocol maps them to its own status codes.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from kiln import runtime
from kiln.bundle import Bundle, Manifest
from kiln.errors import ConfigError, KilnError
from kiln.runtime.base import Backend
from kiln.serve.batcher import Batcher, ModelNotReady
from kiln.serve.schemas import BatchInfo, ModelInfo, TensorInfo
from kiln.serve.settings import Settings

Loader = Callable[[Bundle, Settings], Backend]
LoadErrorHook = Callable[[str, BaseException], None]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelNotFound(KilnError):
    """A request named a model this server does not serve. The message lists the served models;
    :attr:`short` does not, for callers that may not learn them (no API key)."""

    def __init__(self, message: str, short: str | None = None) -> None:
        super().__init__(message)
        self.short = short or message


@dataclass
class ServedModel:
    name: str
    bundle: Bundle
    batcher: Batcher

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def check_ready(self) -> Backend:
        backend = self.batcher.backend
        if self.batcher.load_error is not None:
            raise ModelNotReady(f"model '{self.name}' failed to load: {self.batcher.load_error}")
        if backend is None:
            raise ModelNotReady(f"model '{self.name}' is still loading")
        return backend

    def info(self) -> ModelInfo:
        m = self.manifest
        b = self.batcher.backend
        return ModelInfo(
            name=self.name,
            task=m.task,
            labels=m.classes,
            ready=self.batcher.ready,
            backend=b.name if b else None,
            precision=b.precision if b else None,
            device=b.device if b else None,
            batch=BatchInfo(min=b.min_batch if b else m.input.batch.min,
                            max=self.batcher.max_items if b else m.input.batch.max),
            input=TensorInfo(name=m.input.name, shape=m.input.shape, dtype=m.input.dtype),
            outputs=[TensorInfo(name=o.name, shape=o.shape, dtype=o.dtype)
                     for o in (b.outputs if b else m.outputs)],
            preprocess=m.preprocess.model_dump(mode="json"),
            postprocess=m.postprocess,
            error=str(self.batcher.load_error) if self.batcher.load_error is not None else None,
        )


def default_loader(bundle: Bundle, settings: Settings) -> Backend:
    opts = {"threads": settings.threads} if settings.threads is not None else {}
    return runtime.load(bundle, backend=settings.backend, precision=settings.precision,
                        end_to_end=settings.end_to_end, **opts)


class Registry:
    """Served models by name, in the order given. ``stopping`` turns true when shutdown begins: at
    SIGTERM, while the server still drains (``/readyz`` then answers 503), or at :meth:`close`."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        self.stopping = False

    @classmethod
    def build(
        cls,
        sources: Sequence[tuple[str, str | os.PathLike[str] | Bundle]],
        settings: Settings,
        loader: Loader | None = None,
    ) -> Registry:
        """One batcher per (name, bundle or bundle path); nothing loads until :meth:`start`."""
        load = loader or default_loader
        if not sources:
            raise ConfigError("no models to serve: give at least one bundle")
        served: dict[str, ServedModel] = {}
        for name, source in sources:
            if not _NAME.match(name):
                raise ConfigError(f"model name '{name}' must be letters, digits, '.', '_' or '-' (max 128)")
            if name in served:
                raise ConfigError(f"model name '{name}' is given twice: use --name to tell the bundles apart")
            bundle = source if isinstance(source, Bundle) else Bundle.load(source)

            def factory(bundle: Bundle = bundle) -> Backend:
                return load(bundle, settings)

            batcher = Batcher(
                factory,
                name=name,
                max_batch=settings.max_batch,
                max_delay=settings.max_delay,
                max_queue=settings.max_queue,
                warmup=settings.warmup,
            )
            served[name] = ServedModel(name, bundle, batcher)
        return cls(list(served.values()))

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models.values())

    def get(self, name: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            short = f"unknown model '{name}'"
            raise ModelNotFound(f"{short}; served: {', '.join(sorted(self.models))}", short)
        return m

    def not_ready_reason(self, names: bool = True) -> str | None:
        """Why the server is not ready (shutting down, a model failed or is loading), or None when it is.
        ``names=False``: without the model names and load errors, for callers without the API key."""
        if self.stopping:
            return "shutting down"
        items = self.models.items()
        loading = [n for n, m in items if m.batcher.backend is None and m.batcher.load_error is None]
        failed = [f"{n} ({m.batcher.load_error})" for n, m in items if m.batcher.load_error is not None]
        if failed:
            return ("failed to load: " + "; ".join(failed) if names
                    else f"{len(failed)} model(s) failed to load")
        if loading:
            return "loading: " + ", ".join(loading) if names else f"{len(loading)} model(s) loading"
        return None

    # -- lifecycle --

    def start(self) -> None:
        """Start every batcher; each loads its backend on its own worker thread."""
        for m in self:
            m.batcher.start()

    async def watch_loads(
        self, on_loaded: Callable[[ServedModel], None], on_error: LoadErrorHook | None = None
    ) -> None:
        """Wait for each model in turn; call ``on_loaded(model)`` or ``on_error(name, exc)`` on the event
        loop."""
        for m in self:
            await asyncio.to_thread(m.batcher.wait_ready)
            if m.batcher.load_error is not None:
                if on_error is not None:
                    on_error(m.name, m.batcher.load_error)
            else:
                on_loaded(m)

    async def close(self, timeout: float) -> None:
        """Stop taking requests and drain each model's queue, waiting up to ``timeout`` seconds per model."""
        self.stopping = True
        for m in self:
            await asyncio.to_thread(m.batcher.close, True, timeout)


__all__ = ["LoadErrorHook", "Loader", "ModelNotFound", "Registry", "ServedModel", "default_loader"]
