"""Property-based: no signal function raises on data, and none invents a number."""

import math

import numpy as np
import pandas as pd
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from otel_dl import drift, quality
from otel_dl._config import resolve_config
from otel_dl.confidence import summarize
from otel_dl.monitor import FeatureMonitor, confidence_attributes
from otel_dl.provenance import data_fingerprint
from otel_dl.reference import Reference

dtypes = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int64, np.bool_])
arrays = dtypes.flatmap(
    lambda dtype: hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements=None if dtype in (np.bool_,) else hnp.from_dtype(np.dtype(dtype)),
    )
)
REFERENCE = Reference.fit(np.random.default_rng(0).standard_normal((200, 3)))


def _all_finite_or_absent(mapping):
    return all(not isinstance(v, float) or math.isfinite(v) for v in mapping.values())


@given(arrays)
def test_monitor_and_pure_functions_never_raise(array):
    monitor = FeatureMonitor(REFERENCE, config=resolve_config({"drift_method": "ks"}))
    attributes = monitor.observe(array)
    assert _all_finite_or_absent(attributes)
    auto = FeatureMonitor(config=resolve_config({"baseline_rows": 2}))
    auto.observe(array)
    assert _all_finite_or_absent(auto.observe(array))
    assert _all_finite_or_absent(summarize(array))
    with np.errstate(over="ignore"):
        tensor = torch.as_tensor(array.astype(np.float32))
    assert _all_finite_or_absent(confidence_attributes(tensor))
    assert data_fingerprint(array) is not None
    fraction = quality.nan_fraction(array)
    assert fraction is None or 0 <= fraction <= 1


@given(arrays, arrays, st.sampled_from(drift.METHODS))
def test_drift_scores_are_finite_or_explained(ref, cur, method):
    try:
        scores = drift.score(ref, cur, method=method)
    except ValueError:
        return  # no tabular reading: reported, not guessed
    assert all(math.isfinite(v) and v >= 0 for v in scores.values())


@given(st.lists(st.one_of(st.none(), st.text(max_size=3), st.integers()), max_size=20))
def test_object_columns(values):
    frame = pd.DataFrame({"c": pd.Series(values, dtype=object), "x": np.arange(len(values))})
    monitor = FeatureMonitor(config=resolve_config({"baseline_rows": 5}))
    for _ in range(3):
        assert _all_finite_or_absent(monitor.observe(frame))


def test_huge_values_and_unseen_categories():
    ref = Reference.fit({"x": np.array([1e308, -1e308, 0.0]), "c": np.array(["a", "b", "a"])})
    monitor = FeatureMonitor(ref, config=resolve_config({"drift_min_rows": 1}))
    attributes = monitor.observe({"x": np.array([np.inf, 1e308, 5.0]), "c": np.array(["z"] * 3)})
    assert attributes["dl.quality.nan_fraction"] == 1 / 6
    assert attributes["dl.drift.feature"] == "c"
