"""The accuracy-budget search, as pure logic over a fake `measure(method, excluded)`: what it reports
(method, layers kept in float, sensitivity, trials, the budget), and the calibration settings' limits,
each checked at its edge and with its error message."""

from __future__ import annotations

import pytest

from kiln.calib.quantize import METHODS, CalibSettings, SearchResult, Trial, search
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
    measure, calls = make_measure({"minmax": 2.0, "entropy": 0.4, "percentile": 0.8},
                                  dict.fromkeys(LAYERS, 0.1))
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


def additive(base: dict[str, float], gains: dict[str, float], baseline: float = 95.0):  # type: ignore[no-untyped-def]
    """``make_measure``'s measure alone."""
    return make_measure(base, gains, baseline)[0]


def test_result_within_budget_carries_the_budget_and_every_trial() -> None:
    r = search(("minmax", "entropy"), ["conv1"], additive({"minmax": 2.0, "entropy": 0.5}, {"conv1": 0.0}),
               95.0, 1.0)
    assert r == SearchResult("entropy", (), 94.5, 95.0, 1.0, True,
                             [Trial("minmax", (), 93.0), Trial("entropy", (), 94.5)], [])


def test_result_after_the_sensitivity_search_carries_the_budget_trials_and_sensitivity() -> None:
    measure = additive({"minmax": 3.0}, {"conv1": 0.5, "fc1": 2.0})
    r = search(("minmax",), ["conv1", "fc1"], measure, 95.0, 1.0)
    assert r == SearchResult(
        "minmax", ("fc1",), 94.0, 95.0, 1.0, True,
        [Trial("minmax", (), 92.0), Trial("minmax", ("conv1",), 92.5), Trial("minmax", ("fc1",), 94.0),
         Trial("minmax", ("fc1",), 94.0)],
        [{"layer": "fc1", "gain": 2.0}, {"layer": "conv1", "gain": 0.5}])


def test_result_over_budget_names_the_method_and_says_so() -> None:
    measure = additive({"minmax": 5.0, "entropy": 4.0}, {"conv1": 0.5, "fc1": 1.0})
    r = search(("minmax", "entropy"), ["conv1", "fc1"], measure, 95.0, 1.0)
    assert r.within_budget is False and r.method == "entropy" and r.budget == 1.0
    assert r.excluded == ("fc1", "conv1") and r.metric == 92.5 and r.drop == 2.5
    assert len(r.trials) == 6 and [t.excluded for t in r.trials][-2:] == [("fc1",), ("fc1", "conv1")]
    assert r.sensitivity == [{"layer": "fc1", "gain": 1.0}, {"layer": "conv1", "gain": 0.5}]


def test_equal_scores_pick_the_method_listed_first() -> None:
    r = search(("percentile", "minmax"), [], additive({"minmax": 0.5, "percentile": 0.5}, {}), 95.0, 1.0)
    assert r.method == "percentile"
    r = search(("minmax", "percentile"), [], additive({"minmax": 0.5, "percentile": 0.5}, {}), 95.0, 1.0)
    assert r.method == "minmax"


def test_equal_sensitivity_keeps_graph_order_not_name_order() -> None:
    measure = additive({"minmax": 3.0}, {"fc": 0.5, "conv": 0.5})
    r = search(("minmax",), ["fc", "conv"], measure, 95.0, 0.1)
    assert [s["layer"] for s in r.sensitivity] == ["fc", "conv"]


def test_sensitivity_gain_is_rounded_to_four_decimals() -> None:
    measure = additive({"minmax": 3.0}, {"conv1": 0.123456})
    r = search(("minmax",), ["conv1"], measure, 95.0, 0.1)
    assert r.sensitivity == [{"layer": "conv1", "gain": 0.1235}]


def test_over_budget_keeps_the_fewest_layers_that_reach_the_best_accuracy() -> None:
    # fc1 helps, conv1 and fc2 do not: keeping them in float too costs speed for nothing
    measure = additive({"minmax": 5.0}, {"fc1": 1.0, "conv1": 0.0, "fc2": 0.0})
    r = search(("minmax",), ["conv1", "fc1", "fc2"], measure, 95.0, 1.0)
    assert not r.within_budget and r.excluded == ("fc1",) and r.metric == 91.0


def test_over_budget_with_no_layer_helping_keeps_none_in_float() -> None:
    measure = additive({"minmax": 5.0}, {"conv1": -0.5, "fc1": 0.0})
    r = search(("minmax",), ["conv1", "fc1"], measure, 95.0, 1.0)
    assert not r.within_budget and r.excluded == () and r.metric == 90.0


def test_auto_tries_every_method_a_named_method_only_itself() -> None:
    assert CalibSettings().methods() == METHODS
    assert CalibSettings(method="auto").methods() == METHODS
    assert CalibSettings(method="entropy").methods() == ("entropy",)


def test_unknown_method_names_the_flag_the_choices_and_the_nearest() -> None:
    with pytest.raises(ConfigError) as err:
        CalibSettings(method="entropi")
    assert str(err.value) == ("--calib-method: unknown calibration method 'entropi'. "
                              "Valid: auto, entropy, minmax, percentile. Did you mean 'entropy'?")
    with pytest.raises(ConfigError, match="unknown calibration method 'AUTO'"):
        CalibSettings(method="AUTO")


def test_calibration_images_at_least_one() -> None:
    assert CalibSettings(images=1).images == 1
    with pytest.raises(ConfigError) as err:
        CalibSettings(images=0)
    assert str(err.value) == "--calib-images must be >= 1, got 0"


def test_max_accuracy_drop_may_be_zero_not_negative() -> None:
    assert CalibSettings(max_accuracy_drop=0.0).max_accuracy_drop == 0.0
    assert CalibSettings(max_accuracy_drop=0.5).max_accuracy_drop == 0.5
    with pytest.raises(ConfigError) as err:
        CalibSettings(max_accuracy_drop=-0.1)
    assert str(err.value) == "--max-accuracy-drop must be >= 0, got -0.1"


@pytest.mark.parametrize("percentile", [0.5, 99.999, 100.0])
def test_percentile_in_range(percentile: float) -> None:
    assert CalibSettings(percentile=percentile).percentile == percentile


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5])
def test_percentile_out_of_range(percentile: float) -> None:
    with pytest.raises(ConfigError) as err:
        CalibSettings(percentile=percentile)
    assert str(err.value) == f"percentile must be in (0, 100], got {percentile}"
