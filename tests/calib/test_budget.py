"""The accuracy-budget search, as pure logic over a fake `measure(method, excluded)`."""

from __future__ import annotations

import pytest

from kiln.calib.quantize import CalibSettings, search
from kiln.errors import ConfigError

LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def make_measure(base_drop: dict[str, float], gains: dict[str, float], baseline: float = 95.0):
    """Accuracy = baseline - method drop + what keeping each excluded layer in float recovers."""
    calls: list[tuple[str, tuple[str, ...]]] = []

    def measure(method: str, excluded: tuple[str, ...]) -> float:
        calls.append((method, excluded))
        return baseline - base_drop[method] + sum(gains[layer] for layer in excluded)

    return measure, calls


def test_best_method_within_budget_needs_no_sensitivity_search() -> None:
    measure, calls = make_measure({"minmax": 2.0, "entropy": 0.4, "percentile": 0.8}, dict.fromkeys(LAYERS, 0.1))
    r = search(("minmax", "entropy", "percentile"), LAYERS, measure, 95.0, 1.0)
    assert r.within_budget and r.method == "entropy" and r.excluded == ()
    assert r.sensitivity == [] and len(calls) == 3


def test_sensitivity_search_keeps_most_sensitive_layers_in_float() -> None:
    gains = {"conv1": 1.5, "conv2": 0.2, "fc1": 0.9, "fc2": 0.0}
    measure, calls = make_measure({"minmax": 3.0, "entropy": 3.5, "percentile": 2.8}, gains)
    r = search(("minmax", "entropy", "percentile"), LAYERS, measure, 95.0, 1.0)
    # percentile is best (2.8); conv1 (+1.5) alone leaves 1.3 > 1.0, conv1 + fc1 leaves 0.4.
    assert r.within_budget and r.method == "percentile"
    assert r.excluded == ("conv1", "fc1")
    assert [s["layer"] for s in r.sensitivity] == ["conv1", "fc1", "conv2", "fc2"]
    assert r.drop == pytest.approx(0.4)
    assert ("percentile", ("conv1",)) in calls and ("minmax", ("conv1",)) not in calls


def test_budget_that_cannot_be_met_is_reported() -> None:
    measure, _ = make_measure({"minmax": 5.0}, dict.fromkeys(LAYERS, 0.5))
    r = search(("minmax",), LAYERS, measure, 95.0, 1.0)
    assert not r.within_budget
    assert r.excluded == tuple(LAYERS) and r.drop == pytest.approx(3.0)  # the best it found, all in float


def test_settings_validate() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'entropy'"):
        CalibSettings(method="entropi")
    with pytest.raises(ConfigError):
        CalibSettings(images=0)
    assert CalibSettings(method="minmax").methods() == ("minmax",)
