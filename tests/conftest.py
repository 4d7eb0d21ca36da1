"""Shared fixtures: a small trained digits bundle, built once per test session."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def free_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 where nothing listens: connecting to it is refused.

    The port stays bound (never listening) by this fixture until the test ends, so no other process
    can take it in between. A server a test starts binds port 0 itself (``--port 0``, a socket handed
    to uvicorn, ``torchrun --standalone``) instead of asking for a number here.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Every image of tests/corpus.py (photos from 24x24 to 4000x3000, 1 KB to 15 MB, odd modes), encoded
    once per session: ``CorpusImage`` objects, smallest first."""
    from tests.corpus import build_corpus

    return build_corpus(tmp_path_factory.getbasetemp() / "corpus")
