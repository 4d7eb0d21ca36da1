"""Server settings as the operator gives them: a flag overrides its ``KILN_*`` variable, a flag not given
leaves the variable in force, ``--max-delay-ms`` reaches the batcher in seconds, and the API key is
read back as given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.serve.registry import Registry
from kiln.serve.settings import Settings

from .conftest import FakeBackend, make_bundle


def test_a_flag_given_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_MAX_BATCH", "16")
    assert Settings.from_flags(max_batch=4).max_batch == 4


def test_a_flag_not_given_leaves_the_environment_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_MAX_BATCH", "16")
    monkeypatch.setenv("KILN_PORT", "9001")
    s = Settings.from_flags(max_batch=None, port=None, max_queue=8)
    assert (s.max_batch, s.port, s.max_queue) == (16, 9001, 8)


def test_max_delay_is_in_seconds() -> None:
    assert Settings(max_delay_ms=2.5).max_delay == pytest.approx(0.0025)
    assert Settings(max_delay_ms=0).max_delay == 0.0


def test_api_key_value_is_the_key_given_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    assert Settings(api_key="s3cret").api_key_value() == "s3cret"
    assert Settings().api_key_value() is None
    assert Settings(api_key="  ").api_key_value() is None


def test_max_delay_ms_reaches_the_batcher_in_seconds(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "digits")
    registry = Registry.build([("digits", bundle)], Settings(max_delay_ms=40, warmup=False),
                              loader=lambda b, _s: FakeBackend(b))
    batcher = registry.get("digits").batcher
    assert batcher.max_delay == pytest.approx(0.040)
    registry.start()
    try:
        assert batcher.wait_ready(10)
        # A request announced as on its way keeps the batch open for max_delay: 40 ms, not 40 s.
        with batcher.announce():
            fut = batcher.submit({"images": np.ones((1, 1, 28, 28), np.float32)})
            out = fut.result(10)
        assert out["logits"].shape == (1, 10)
    finally:
        batcher.close(drain=False, timeout=5)
