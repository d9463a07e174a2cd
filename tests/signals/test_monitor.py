"""FeatureMonitor attributes, auto-baseline, sampling knobs; quality and provenance."""

import threading

import numpy as np
import pytest
import torch

from otel_dl import semconv
from otel_dl._config import resolve_config
from otel_dl.monitor import FeatureMonitor, confidence_attributes, to_features
from otel_dl.provenance import code_version, data_fingerprint, model_fingerprint
from otel_dl.quality import out_of_range_fraction
from otel_dl.reference import Reference

DRIFT_KEYS = {
    semconv.DL_DRIFT_SCORE,
    semconv.DL_DRIFT_METHOD,
    semconv.DL_DRIFT_FEATURE,
    semconv.DL_DRIFT_STATUS,
}


def test_auto_baseline_then_drift():
    config = resolve_config({"baseline_rows": 100, "drift_min_rows": 1})
    monitor = FeatureMonitor(config=config)
    rng = np.random.default_rng(0)
    first = monitor.observe(rng.standard_normal((60, 3)))
    assert not DRIFT_KEYS & first.keys() and monitor.reference is None
    assert semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION not in first
    monitor.observe(rng.standard_normal((60, 3)))  # completes the baseline
    assert monitor.reference is not None and monitor.reference.rows == 100
    shifted = monitor.observe(rng.standard_normal((200, 3)) + 3)
    assert shifted.keys() >= DRIFT_KEYS
    assert shifted[semconv.DL_DRIFT_STATUS] == "alert"
    assert shifted[semconv.DL_QUALITY_SCHEMA_MISMATCH] is False


def test_drift_every_and_row_cap():
    rng = np.random.default_rng(1)
    ref = Reference.fit(rng.standard_normal((500, 2)))
    config = resolve_config(
        {"drift_every": 2, "drift_max_rows": 10, "drift_window_rows": 50, "drift_min_rows": 20}
    )
    monitor = FeatureMonitor(ref, config=config)
    # 10 rows of each batch are queued; the first score comes once they reach drift_min_rows.
    assert not DRIFT_KEYS & monitor.observe(rng.standard_normal((40, 2))).keys()
    first = monitor.observe(rng.standard_normal((40, 2)))
    assert first.keys() >= DRIFT_KEYS and first[semconv.DL_DRIFT_WINDOW_ROWS] == 20
    # Then every drift_every-th batch; the batch between carries the latest score.
    between = monitor.observe(rng.standard_normal((40, 2)) + 5)
    assert between[semconv.DL_DRIFT_SCORE] == first[semconv.DL_DRIFT_SCORE]
    assert monitor.window_rows == 20
    scored = monitor.observe(rng.standard_normal((40, 2)) + 5)
    assert scored[semconv.DL_DRIFT_WINDOW_ROWS] == 40
    assert scored[semconv.DL_DRIFT_STATUS] == "alert"


def test_a_batch_of_drift_min_rows_is_scored_at_once():
    rng = np.random.default_rng(3)
    ref = Reference.fit(rng.standard_normal((2000, 2)))
    monitor = FeatureMonitor(ref, config=resolve_config({"drift_min_rows": 300}))
    assert monitor.observe(rng.standard_normal((400, 2)))[semconv.DL_DRIFT_STATUS] == "ok"
    shifted = monitor.observe(rng.standard_normal((400, 2)) + 4)  # a file read, say
    assert shifted[semconv.DL_DRIFT_STATUS] == "alert"


def test_no_drift_until_the_window_holds_drift_min_rows():
    rng = np.random.default_rng(4)
    ref = Reference.fit(rng.standard_normal((2000, 2)))
    monitor = FeatureMonitor(ref, config=resolve_config({"drift_min_rows": 300}))
    assert not DRIFT_KEYS & monitor.observe(rng.standard_normal((200, 2))).keys()
    assert monitor.observe(rng.standard_normal((200, 2))).keys() >= DRIFT_KEYS


def test_quality_attributes():
    ref = Reference.fit(np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32))
    batch = np.array([[0.5, 2.0], [np.nan, 1.0], [-1.0, 1.0]], dtype=np.float32)
    attributes = FeatureMonitor(ref).observe(batch)
    assert attributes[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(1 / 6)
    assert attributes[semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] == pytest.approx(2 / 5)
    assert attributes[semconv.DL_BATCH_SIZE] == 3
    mismatch = FeatureMonitor(ref).observe(batch.astype(np.float64))
    assert mismatch[semconv.DL_QUALITY_SCHEMA_MISMATCH] is True
    # float32 comparisons are exact against float64 bounds: float32(0.1) lies above 0.1
    # (inside [0.1, 0.3]) and float32(0.3) above 0.3 (outside).
    tight = Reference.fit(np.array([[0.1], [0.3]]))
    assert out_of_range_fraction(tight, np.array([[0.1], [0.3]], dtype=np.float32)) == 0.5


def test_nan_the_reference_holds_is_not_excess():
    """``dl.quality.nan_excess_fraction`` counts, per feature, the missing values above
    floor(n*p + 4*sqrt(n*p*(1-p)) + 1) for a reference missing share p > 0, and every one
    where p is 0; over all the batch's values, like ``dl.quality.nan_fraction``."""
    import pandas as pd

    rng = np.random.default_rng(5)
    rows = 1000
    frame = pd.DataFrame(
        {
            "legal": np.where(np.arange(rows) % 5 == 0, np.nan, rng.standard_normal(rows)),
            "clean": rng.standard_normal(rows),
            "city": np.where(np.arange(rows) % 10 == 0, None, "paris").astype(object),
        }
    )
    ref = Reference.fit(frame)
    monitor = FeatureMonitor(ref)

    def batch(legal_missing: int, clean_missing: int, city_missing: int) -> dict:
        part = frame.iloc[1:101].copy()  # 100 rows, 20 legal NaN, 10 missing cities
        part["legal"] = np.where(np.arange(100) < legal_missing, np.nan, 1.0)
        part.iloc[:clean_missing, 1] = np.nan
        part["city"] = np.where(np.arange(100) < city_missing, None, "paris").astype(object)
        return monitor.observe(part)

    # As often as the reference: NaN, but none of it unexplained.
    usual = batch(20, 0, 10)
    assert usual[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(30 / 300)
    assert usual[semconv.DL_QUALITY_NAN_EXCESS_FRACTION] == 0.0
    # legal: p = 0.2, n = 100: floor(20 + 4 * 4 + 1) = 37 allowed; city: floor(10 + 12 + 1).
    assert batch(37, 0, 23)[semconv.DL_QUALITY_NAN_EXCESS_FRACTION] == 0.0
    assert batch(60, 0, 30)[semconv.DL_QUALITY_NAN_EXCESS_FRACTION] == pytest.approx(30 / 300)
    # A feature never missing in the reference: every NaN is excess.
    assert batch(20, 1, 10)[semconv.DL_QUALITY_NAN_EXCESS_FRACTION] == pytest.approx(1 / 300)
    # Without a reference nothing explains a NaN: no excess attribute, readers use the share.
    learning = FeatureMonitor().observe(frame.iloc[:100])
    assert semconv.DL_QUALITY_NAN_EXCESS_FRACTION not in learning


def test_values_out_of_range_by_chance_are_not_excess():
    """``dl.quality.out_of_range_excess_fraction``: a value drawn like the reference's N
    finite values lies outside their range with probability 2/(N+1); per feature, the
    count outside above floor(n*p + 4*sqrt(n*p*(1-p)) + 1) is excess."""
    rng = np.random.default_rng(6)
    ref = Reference.fit(rng.uniform(0, 1, (999, 2)))  # p = 2/1000: 2 of 100 rows allowed
    monitor = FeatureMonitor(ref)
    inside = rng.uniform(0.1, 0.9, (100, 2))
    for outside, excess in ((0, 0.0), (2, 0.0), (10, 8 / 200)):
        batch = inside.copy()
        batch[:outside, 0] = 5.0
        attrs = monitor.observe(batch)
        assert attrs[semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] == pytest.approx(outside / 200)
        # Left out at a share of 0 (a reader takes the share in its place).
        got = attrs.get(semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION, 0.0)
        assert got == pytest.approx(excess)
    assert semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION not in monitor.observe(inside)
    # One row with one value outside: half its values, and chance enough (one is allowed).
    one = monitor.observe(np.array([[5.0, 0.5]]))
    assert one[semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] == 0.5
    assert one[semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION] == 0.0


def test_thread_safety():
    rng = np.random.default_rng(2)
    monitor = FeatureMonitor(config=resolve_config({"baseline_rows": 500}))
    batches = [rng.standard_normal((50, 4)) for _ in range(40)]
    threads = [threading.Thread(target=lambda b=b: monitor.observe(b)) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert monitor.reference is not None and monitor.reference.rows == 500


def test_confidence_attributes_and_features():
    attributes = confidence_attributes(np.array([[0.9, 0.1], [0.4, 0.6]]), threshold=0.7)
    assert attributes[semconv.DL_PREDICTION_COUNT] == 2
    assert attributes[semconv.DL_CONFIDENCE_LOW_FRACTION] == 0.5
    assert confidence_attributes([]) == {semconv.DL_PREDICTION_COUNT: 0}
    values, names = to_features({"a": np.arange(3), "s": np.array(["x", "y", "z"])})
    assert values.shape == (3, 1) and names == ["a"]


def test_fingerprints():
    data = np.arange(100_000, dtype=np.float32).reshape(1000, 100)
    assert data_fingerprint(data) == data_fingerprint(data.copy())
    assert data_fingerprint(data) != data_fingerprint(data[:-1])
    model = torch.nn.Linear(3, 2)
    first = model_fingerprint(model)
    assert first == model_fingerprint(model)
    assert first != model_fingerprint(torch.nn.Linear(3, 2))
    assert model_fingerprint(b"abc") == model_fingerprint(bytearray(b"abc"))


def test_code_version(monkeypatch):
    monkeypatch.setenv("OTEL_DL_CODE_VERSION", "v1.2")
    assert code_version() == "v1.2"
    assert code_version("explicit") == "explicit"


def test_wide_batches_drift_on_an_evenly_spaced_feature_subset():
    rng = np.random.default_rng(5)
    config = resolve_config({"baseline_rows": 200, "drift_min_rows": 50, "drift_max_features": 8})
    monitor = FeatureMonitor(config=config)
    for _ in range(4):
        monitor.observe(rng.standard_normal((50, 2, 10)))  # 20 features, flattened
    assert monitor.reference is not None
    assert list(monitor.reference.numeric_names) == [str((k * 20) // 8) for k in range(8)]
    batch = rng.standard_normal((50, 2, 10))
    batch[:, 0, 5] += 4.0  # feature "5" is in the subset ((2 * 20) // 8 == 5)
    batch[0, 1, 9] = np.nan  # feature "19" is not: quality still counts it
    attributes = monitor.observe(batch)
    assert attributes[semconv.DL_QUALITY_NAN_FRACTION] == 1 / 1000
    assert attributes[semconv.DL_DRIFT_FEATURE] == "5"
    assert attributes[semconv.DL_DRIFT_STATUS] == "alert"
    assert monitor.feature_count == 20


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_quality_equals_the_quality_functions(dtype):
    from otel_dl.quality import batch_quality, nan_fraction

    rng = np.random.default_rng(11)
    ref = Reference.fit(rng.standard_normal((300, 5)).astype(dtype))
    for case in range(40):
        batch = (rng.standard_normal((64, 5)) * (1 + case % 3)).astype(dtype)
        if case % 4 == 1:
            batch[rng.integers(64), rng.integers(5)] = np.nan
        if case % 4 == 2:
            batch[rng.integers(64), rng.integers(5)] = np.inf * rng.choice([-1, 1])
        if case % 5 == 0:
            batch[:, 1] = ref.numeric.maximum[1]  # the range is closed: inside
        table = ref.read(batch)
        nan, outside = batch_quality(ref, table)
        assert nan == nan_fraction(table)
        assert outside == out_of_range_fraction(ref, table)


def test_drift_false_alarm_rate_zero_judges_by_the_thresholds_alone():
    """A reference of 150 rows of digits against the other 1,647: sampling alone scores
    psi about 0.15, which the default bar for chance keeps ``ok``, and
    ``drift_false_alarm_rate=0`` reads as ``warn``, as before the bar."""
    from sklearn.datasets import load_digits

    x = load_digits().data
    order = np.random.default_rng(0).permutation(len(x))
    reference = Reference.fit(x[order[:150]])
    rest = x[order[150:]]
    statuses = {}
    for rate in (0.001, 0.0):
        config = resolve_config({"drift_false_alarm_rate": rate}, environ={})
        attrs = FeatureMonitor(reference, config=config).observe(rest)
        statuses[rate] = attrs[semconv.DL_DRIFT_STATUS]
    assert statuses == {0.001: "ok", 0.0: "warn"}
