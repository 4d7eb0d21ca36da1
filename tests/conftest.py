"""Shared fixtures: a small trained digits bundle, built once per test session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_port()


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lenet5 trained 4 epochs on digits (about 95% top-1): a real bundle for downstream stages.

    Tests must not modify it; copy it (shutil.copytree) to change anything.
    """
    from kiln.train.config import TrainConfig
    from kiln.train.loop import train

    out = tmp_path_factory.mktemp("bundles") / "digits"
    train(TrainConfig(data="digits", model="lenet5", epochs=4, out=str(out)), progress=False)
    return out
