"""What the studio's routes share: its settings, the job store and runner, and the dataset list."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from kiln.fsutil import atomic_write_json
from kiln.studio.config import StudioConfig
from kiln.studio.jobs import JobRunner
from kiln.studio.paths import PathRefused, confine
from kiln.studio.runs import find_runs
from kiln.studio.store import Job, JobStore


class Studio:
    def __init__(self, cfg: StudioConfig, *, start_runner: bool = True) -> None:
        self.cfg = cfg
        self.store = JobStore(cfg.state_dir / "studio.db")
        self.runner = JobRunner(cfg, self.store)
        self._start_runner = start_runner
        self.datasets_file = cfg.state_dir / "datasets.json"
        self._lock = threading.Lock()
        self.backend_lock = threading.Lock()
        self.backends: dict[tuple[str, str | None, float], Any] = {}
        # the Test page's validation passes (kiln.studio.routes_test), per bundle, precision and
        # kiln.json stamp
        self.val_lock = threading.Lock()
        self.cost_lock = threading.Lock()  # the New run form's parameters/GFLOPs (kiln.studio.routes_runs)
        self.validations: dict[tuple[str, str | None, float], Any] = {}

    def open(self) -> None:
        if self._start_runner:
            self.runner.start()
        else:
            self.runner.recover()

    def close(self) -> None:
        self.runner.close()
        for backend, _bundle in self.backends.values():
            backend.close()
        self.backends.clear()
        self.validations.clear()
        self.store.close()

    # ---- runs ------------------------------------------------------------------------------------

    def run_dir(self, run: str, *, must_exist: bool = True) -> Path:
        """The folder of ``run`` (a path relative to the workspace), confined to the workspace."""
        try:
            path = confine(run, (self.cfg.workspace,))
        except PathRefused as exc:
            raise HTTPException(403, str(exc)) from None
        if path == self.cfg.workspace:
            raise HTTPException(400, "name a run folder inside the workspace")
        if must_exist and not path.is_dir():
            raise HTTPException(404, f"no run {run!r} in the workspace")
        return path

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.cfg.workspace))

    def runs(self) -> list[Path]:
        return find_runs(self.cfg.workspace)

    def latest_job(self, run: str, kind: str | None = None) -> Job | None:
        jobs = self.store.list(run=run, kind=kind)
        return jobs[-1] if jobs else None

    def active_job(self, run: str) -> Job | None:
        jobs = self.store.list(run=run, states=("queued", "running"))
        jobs = [j for j in jobs if j.kind != "serve"]
        return jobs[-1] if jobs else None

    # ---- datasets --------------------------------------------------------------------------------

    def datasets(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.datasets_file.read_text())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def save_datasets(self, items: list[dict[str, Any]]) -> None:
        with self._lock:
            atomic_write_json(self.datasets_file, items)


def studio(request: Request) -> Studio:
    return request.app.state.studio
