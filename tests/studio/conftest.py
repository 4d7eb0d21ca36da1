"""Fixtures for the studio: a workspace, a data root with a small folder dataset of real photo crops,
the studio's app in-process (its job runner driven by the test), and the real ``kiln studio`` command."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from kiln.studio.app import build_app
from kiln.studio.config import StudioConfig

WRITE = {"X-Kiln-Studio": "1"}
# the jobs' torch threads: the machine is shared
JOB_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """``data/photos/<class>/*.jpg``: 64x64 crops of scikit-learn's two sample photos, 8 per class."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path / "data" / "photos"
    sample = load_sample_images()
    for name, arr in zip(("china", "flower"), sample.images, strict=True):
        img = Image.fromarray(arr)
        (root / name).mkdir(parents=True)
        for i in range(8):
            x, y = 40 * i, 30 * (i % 4)
            img.crop((x, y, x + 160, y + 160)).resize((64, 64)).save(root / name / f"{name}-{i}.jpg",
                                                                     quality=90)
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def cfg(workspace: Path, photo_folder: Path) -> StudioConfig:
    return StudioConfig.build(workspace, [str(photo_folder.parent)], extra_env=JOB_ENV)


@pytest.fixture
def client(cfg: StudioConfig) -> Iterator[TestClient]:
    app = build_app(cfg, start_runner=False)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def runner(client: TestClient):  # type: ignore[no-untyped-def]
    return client.app.state.studio.runner  # type: ignore[attr-defined]


def copy_bundle(src: Path, workspace: Path, name: str) -> str:
    """A copy of a trained run folder in the workspace, as ``kiln train --out runs/NAME`` leaves it."""
    dest = workspace / "runs" / name
    shutil.copytree(src, dest)
    return f"runs/{name}"


@dataclass
class LiveStudio:
    url: str
    proc: subprocess.Popen[str]
    workspace: Path


@pytest.fixture
def live_studio(cfg: StudioConfig) -> Iterator[LiveStudio]:
    """``kiln studio --port 0`` in a subprocess; its address read from the line it prints."""
    env = {**os.environ, **JOB_ENV}
    env.pop("KILN_STUDIO_TOKEN", None)
    cmd = [sys.executable, "-m", "kiln.cli", "studio", "--workspace", str(cfg.workspace), "--port", "0",
           *(a for r in cfg.data_roots for a in ("--data-root", str(r)))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"(http://\S+?)/", line)
        assert m, f"kiln studio printed {line!r}"
        url = m.group(1)
        end = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/api/info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "kiln studio did not answer"
            time.sleep(0.1)
        yield LiveStudio(url, proc, cfg.workspace)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        end_jobs(cfg)


def end_jobs(cfg: StudioConfig) -> None:
    """Jobs outlive the studio (their own sessions): end the ones a test left running."""
    from kiln.studio.store import JobStore

    store = JobStore(cfg.state_dir / "studio.db")
    for job in store.list(states=("running",)):
        if job.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.pid, signal.SIGKILL)
    store.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
