"""`--threads` / KILN_THREADS reaches the runtime, so N workers need not oversubscribe the cores."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.serve import registry
from kiln.serve.settings import Settings


def test_threads_setting_is_passed_to_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_load(bundle: Any, **kwargs: Any) -> str:
        seen.update(kwargs)
        return "backend"

    monkeypatch.setattr(registry.runtime, "load", fake_load)
    monkeypatch.setenv("KILN_THREADS", "1")
    assert registry.default_loader("bundle", Settings()) == "backend"  # type: ignore[arg-type]
    assert seen["threads"] == 1


def test_no_threads_setting_leaves_the_runtime_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(registry.runtime, "load", lambda bundle, **kw: seen.update(kw))
    monkeypatch.delenv("KILN_THREADS", raising=False)
    registry.default_loader("bundle", Settings())  # type: ignore[arg-type]
    assert "threads" not in seen


def test_threads_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_THREADS", "0")
    with pytest.raises(ValueError, match="threads"):
        Settings()
