"""The accuracy budget at its edge: a drop exactly equal to ``--max-accuracy-drop`` is within budget."""

from __future__ import annotations

import pytest

from kiln.calib.quantize import search

LAYERS = ["conv1", "fc1"]


def constant(metric: float, gains: dict[str, float] | None = None):  # type: ignore[no-untyped-def]
    def measure(method: str, excluded: tuple[str, ...]) -> float:
        return metric + sum((gains or {}).get(layer, 0.0) for layer in excluded)

    return measure


@pytest.mark.parametrize(("baseline", "metric", "budget"), [
    (95.0, 94.0, 1.0),  # exact in binary floating point
    (95.0, 95.0, 0.0),  # a zero budget accepts no drop at all, and no drop is fine
    (0.95, 0.94, 0.01),  # 0.95 - 0.94 is 0.010000000000000009 in floating point
    (97.3, 96.8, 0.5),
])
def test_drop_equal_to_the_budget_is_within_it(baseline: float, metric: float, budget: float) -> None:
    r = search(("minmax",), LAYERS, constant(metric), baseline, budget)
    assert r.within_budget
    assert r.excluded == ()  # accepted as quantized, no layer kept in float
    assert r.drop == pytest.approx(budget)


@pytest.mark.parametrize(("baseline", "metric", "budget"), [
    (95.0, 93.99, 1.0),
    (95.0, 94.999, 0.0),
    (0.95, 0.9399, 0.01),
])
def test_drop_just_over_the_budget_is_not_within_it(baseline: float, metric: float, budget: float) -> None:
    r = search(("minmax",), LAYERS, constant(metric), baseline, budget)
    assert not r.within_budget


def test_sensitivity_search_stops_when_the_drop_reaches_the_budget_exactly() -> None:
    # quantized: drop 3.0; conv1 in float recovers 2.0 -> drop exactly 1.0 == budget: stop there.
    r = search(("minmax",), LAYERS, constant(92.0, {"conv1": 2.0, "fc1": 0.5}), 95.0, 1.0)
    assert r.within_budget and r.excluded == ("conv1",)
