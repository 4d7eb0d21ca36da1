"""Statistics and the /metrics histogram arithmetic the reports rest on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kiln.bench.environment import cpu_model, library_versions
from kiln.bench.server import batch_histogram, histogram_diff
from kiln.bench.stats import percentile, summarize


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = np.random.default_rng(1).exponential(3.0, 257)
    assert percentile(sorted(values), q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_edges() -> None:
    assert percentile([4.0], 99) == 4.0
    assert percentile([1.0, 3.0], 50) == 2.0
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0, 100"):
        percentile([1.0], 101)


def test_summarize() -> None:
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0], percentiles=(50, 90, 99))
    assert s["count"] == 5
    assert s["mean"] == 3.0
    assert s["min"] == 1.0 and s["max"] == 5.0
    assert s["p50"] == 3.0
    assert s["p90"] == pytest.approx(4.6)
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ValueError):
        summarize([])


def _exposition(observations: dict[str, list[float]]) -> str:
    reg = CollectorRegistry()
    other = Histogram("kiln_request_duration_seconds", "latency", ["model"], registry=reg)
    other.labels(model="a").observe(0.1)
    h = Histogram("kiln_batch_size", "items per batch", ["model"], buckets=(1, 2, 4, 8, 16), registry=reg)
    for model, values in observations.items():
        for v in values:
            h.labels(model=model).observe(v)
    return generate_latest(reg).decode()


def test_batch_histogram_picks_the_batch_family_and_model() -> None:
    text = _exposition({"a": [1, 1, 3], "b": [8]})
    a = batch_histogram(text, model="a")
    assert a is not None and a["name"] == "kiln_batch_size"
    assert a["count"] == 3 and a["sum"] == 5
    assert a["buckets"]["1.0"] == 2 and a["buckets"]["4.0"] == 3 and a["buckets"]["+Inf"] == 3
    both = batch_histogram(text)
    assert both is not None and both["count"] == 4
    assert batch_histogram(text, metric="kiln_request_duration_seconds") is not None
    assert batch_histogram(text, metric="nope") is None
    assert batch_histogram("# nothing here\n") is None


def test_histogram_diff_counts_only_the_new_batches() -> None:
    before = batch_histogram(_exposition({"a": [1, 1]}), model="a")
    after = batch_histogram(_exposition({"a": [1, 1, 1, 2, 3, 4, 7, 40]}), model="a")
    assert after is not None
    d = histogram_diff(before, after)
    assert d["batches"] == 6
    assert d["items"] == 57
    assert d["mean"] == pytest.approx(57 / 6)
    assert [(x["range"], x["batches"]) for x in d["distribution"]] == [
        ("1", 1), ("2", 1), ("3-4", 2), ("5-8", 1), (">16", 1)]
    empty = histogram_diff(after, after)
    assert empty["batches"] == 0 and empty["mean"] is None and empty["distribution"] == []


def test_environment_helpers() -> None:
    assert cpu_model()
    versions = library_versions()
    assert versions["numpy"] == np.__version__
    assert "python" in versions and "kiln" in versions
