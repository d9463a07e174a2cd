"""Drift scores against scipy and direct transcriptions of the formulas."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance

from otel_dl import drift
from otel_dl.reference import Reference


def _datasets():
    rng = np.random.default_rng(7)
    yield rng.standard_normal((400, 3)), rng.standard_normal((250, 3)) * 1.3 + 0.2
    # ties: small integer support
    yield rng.integers(0, 4, (300, 3)).astype(float), rng.integers(0, 6, (200, 3)).astype(float)
    # adversarial: constant reference, heavy tails, huge values
    ref = np.column_stack([np.ones(100), rng.standard_cauchy(100), rng.standard_normal(100) * 1e12])
    cur = np.column_stack(
        [np.ones(80) * 2, rng.standard_cauchy(80), rng.standard_normal(80) * 1e12]
    )
    yield ref, cur


def _finite(column):
    return column[np.isfinite(column)]


@pytest.mark.parametrize("pair", list(_datasets()))
def test_ks_and_wasserstein_from_raw_equal_scipy(pair):
    ref, cur = pair
    ref = ref.copy()
    ref[3, 0] = np.nan
    cur = cur.copy()
    cur[5, 1] = np.inf
    ks = drift.score(ref, cur, method="ks")
    ws = drift.score(ref, cur, method="wasserstein")
    for j in range(ref.shape[1]):
        r, c = _finite(ref[:, j]), _finite(cur[:, j])
        assert ks[str(j)] == pytest.approx(ks_2samp(r, c).statistic, abs=1e-12)
        expected = wasserstein_distance(r, c) / max(r.std(), 1e-3)
        assert ws[str(j)] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _float32_above(v):
    """The next float32 above the smallest float32 >= v."""
    f = np.float32(v)
    if float(f) < v:
        f = np.nextafter(f, np.float32(np.inf))
    return float(np.nextafter(f, np.float32(np.inf)))


def _transcribed_shares(ref, cur, bins):
    """np.histogram over the documented edges: quantiles, duplicates collapsed, a value
    several quantiles share in a bin of its own (up to the next float32), open ends."""
    values, counts = np.unique(np.quantile(ref, np.arange(1, bins) / bins), return_counts=True)
    edges = np.unique(np.concatenate([values, [_float32_above(v) for v in values[counts > 1]]]))
    full = np.concatenate([[-np.inf], edges, [np.inf]])
    # np.histogram closes the last bin; shift +inf out so bins are [a, b) throughout.
    r = np.histogram(ref, full)[0] / len(ref)
    c = np.histogram(cur, full)[0] / len(cur)
    return r, c


@pytest.mark.parametrize("pair", list(_datasets()))
@pytest.mark.parametrize("bins", [10, 4, 1])
def test_psi_and_js_equal_transcription(pair, bins):
    ref, cur = pair
    psi = drift.score(ref, cur, method="psi", bins=bins)
    js = drift.score(ref, cur, method="js", bins=bins)
    for j in range(ref.shape[1]):
        r, c = _transcribed_shares(ref[:, j], cur[:, j], bins)
        rf, cf = np.maximum(r, 1e-4), np.maximum(c, 1e-4)
        assert psi[str(j)] == pytest.approx(np.sum((cf - rf) * np.log(cf / rf)), abs=1e-12)
        assert js[str(j)] == pytest.approx(jensenshannon(r, c, base=2), abs=1e-9)


@pytest.mark.parametrize("method", ["psi", "js"])
def test_a_shift_above_a_mass_point_is_seen(method):
    """A binary flag whose ones go from 5 % to 50 %, and a feature 95 % zeros whose
    positive values go to half the rows: the ones and the positive values are no longer
    in the zeros' bin, so the shift moves a share; healthy samples stay near 0."""
    rng = np.random.default_rng(3)

    def sample(n, ones, nonzero):
        flag = (rng.random(n) < ones).astype(np.float32)
        inflated = np.where(rng.random(n) < nonzero, rng.exponential(size=n), 0.0)
        return np.column_stack([flag, inflated.astype(np.float32)])

    reference = Reference.fit(sample(5000, 0.05, 0.05))
    alert = drift.DEFAULT_THRESHOLDS[method][1]
    shifted = drift.score(reference, sample(2000, 0.5, 0.5), method=method)
    healthy = drift.score(reference, sample(2000, 0.05, 0.05), method=method)
    for feature in ("0", "1"):
        assert shifted[feature] > alert > 10 * healthy[feature]


def test_bins_are_closed_on_the_left():
    ref = np.arange(10.0)
    profile = Reference.fit(ref, bins=2)  # one edge, at the median 4.5
    assert profile.numeric.edges[0, 0] == 4.5
    shares = drift.score(profile, np.array([4.5, 4.5]), method="js")
    # all current mass in the upper bin [4.5, inf): js of [.5,.5] vs [0,1]
    assert shares["0"] == pytest.approx(jensenshannon([0.5, 0.5], [0, 1], base=2))


def test_categorical_with_unseen_levels():
    ref = {"c": np.array(["a"] * 60 + ["b"] * 40)}
    cur = {"c": np.array(["a"] * 10 + ["b"] * 20 + ["z"] * 5 + ["y"] * 5)}
    r = np.array([0.6, 0.4, 0.0])
    c = np.array([10, 20, 10]) / 40
    psi = drift.score(ref, cur, method="psi")
    rf, cf = np.maximum(r, 1e-4), np.maximum(c, 1e-4)
    assert psi["c"] == pytest.approx(np.sum((cf - rf) * np.log(cf / rf)))
    for method in ("js", "ks", "wasserstein"):
        scores = drift.score(ref, cur, method=method)
        assert scores["c"] == pytest.approx(jensenshannon(r, c, base=2))
        assert scores.methods["c"] == "js"


def test_forced_categorical_numeric_codes():
    rng = np.random.default_rng(3)
    ref = Reference.fit(rng.integers(0, 3, (200, 1)), categorical=["code"], feature_names=["code"])
    scores = drift.score(ref, np.array([[0], [1], [7]]), method="psi")
    assert set(scores) == {"code"} and scores.methods["code"] == "psi"


@pytest.mark.parametrize("method", ["ks", "wasserstein"])
def test_profile_estimate_within_stored_bound(method):
    rng = np.random.default_rng(11)
    for trial in range(5):
        ref = rng.standard_normal((1000 + 500 * trial, 2))
        ref[:, 1] = np.round(ref[:, 1] * 2)  # ties
        cur = rng.standard_normal((700, 2)) * (1 + trial / 5) + trial / 10
        profile = Reference.fit(ref)
        exact = drift.score(ref, cur, method=method)
        approx = drift.score(profile, cur, method=method)
        bounds = profile.numeric.ks_bound if method == "ks" else profile.numeric.wasserstein_bound
        for j in range(2):
            assert abs(approx[str(j)] - exact[str(j)]) <= bounds[j] + 1e-12
        if method == "ks":
            # the documented ceiling for 100 atoms
            assert bounds.max() <= 1 / 100 + 1 / len(ref)


def test_reasons_instead_of_made_up_numbers():
    ref = np.column_stack([np.full(50, np.nan), np.arange(50.0)])
    cur = np.column_stack([np.arange(5.0), np.full(5, np.nan)])
    for method in drift.METHODS:
        scores = drift.score(ref, cur, method=method)
        assert dict(scores) == {}
        assert "reference has no finite values" in scores.reasons["0"]
        assert "no finite values in the current data" in scores.reasons["1"]


def test_status_thresholds():
    assert drift.drift_status(0.05, "psi") == "ok"
    assert drift.drift_status(0.1, "psi") == "warn"
    assert drift.drift_status(0.25, "psi") == "alert"
    assert drift.drift_status(0.15, "js") == "warn"
    assert drift.drift_status(0.15, "ks", warn=0.2, alert=0.3) == "ok"
    with pytest.raises(ValueError, match="unknown drift method"):
        drift.score(np.ones(3), np.ones(3), method="kl")


@pytest.mark.parametrize("method", drift.METHODS)
def test_tracker_window_equals_batch_score_of_last_rows(method):
    rng = np.random.default_rng(5)
    profile = Reference.fit(rng.standard_normal((2000, 4)))
    tracker = drift.DriftTracker(profile, method=method, window_rows=300)
    seen = []
    for i in range(7):
        batch = rng.standard_normal((int(rng.integers(1, 160)), 4)) + i / 10
        seen.append(batch)
        result = tracker.update(batch)
    window = np.concatenate(seen)[-300:]
    assert tracker.rows == 300
    expected = drift.score(profile, window, method=method)
    assert result.feature == max(expected, key=expected.__getitem__)
    assert result.score == pytest.approx(expected[result.feature], abs=1e-12)
    assert result.status == drift.drift_status(result.score, method)


def _window_counts_match(tracker, profile, window, method):
    expected = drift.score(profile, window, method=method)
    result = tracker._result()
    assert dict(result.scores) == pytest.approx(dict(expected), abs=1e-12)
    assert result.scores.reasons == expected.reasons


@pytest.mark.parametrize("method", ["psi", "js"])
def test_tracker_bins_survive_eviction_nonfinite_and_dtype_changes(method):
    """Rows leave the window through their stored bins, whatever part of a chunk goes."""
    rng = np.random.default_rng(9)
    ref = rng.standard_normal((3000, 3))
    ref[:, 2] = np.round(ref[:, 2])  # ties: collapsed edges
    profile = Reference.fit(ref)
    tracker = drift.DriftTracker(profile, method=method, window_rows=250)
    seen = []
    for i in range(40):
        rows = int(rng.integers(1, 300))
        batch = rng.standard_normal((rows, 3)) * (1 + i / 20) + 5 * (i % 7 == 0)
        batch[rng.random(batch.shape) < 0.05] = np.nan
        batch[rng.random(batch.shape) < 0.02] = np.inf
        batch[rng.random(batch.shape) < 0.02] = -np.inf
        if i % 3 == 0:
            batch = batch.astype(np.float32)
        seen.append(batch.astype(np.float64) if batch.dtype == np.float32 else batch)
        tracker.update(batch)
        window = np.concatenate(seen)[-250:]
        assert tracker.rows == len(window)
        # float32 rows bin exactly as their float64 values do
        _window_counts_match(tracker, profile, window, method)


def test_tracker_with_a_profile_whose_range_does_not_hold_its_edges(tmp_path):
    """A hand-edited file may put edges outside [min, max]: bins stay exact."""
    rng = np.random.default_rng(12)
    profile = Reference.fit(rng.standard_normal((400, 2)))
    document = profile.to_dict()
    document["features"][0]["min"] = 0.5  # above the lower edges
    edited = Reference.from_dict(document)
    tracker = drift.DriftTracker(edited, window_rows=120)
    seen = []
    for _ in range(5):
        batch = rng.standard_normal((70, 2))
        batch[0, 0] = np.inf
        seen.append(batch)
        tracker.update(edited.read(batch))
    _window_counts_match(tracker, edited, np.concatenate(seen)[-120:], "psi")


def test_free_text_or_ids_get_no_category_drift_score() -> None:
    """A categorical feature whose reference values are mostly distinct (raw texts, ids):
    every new value is unseen, so its share says nothing of drift."""
    rng = np.random.default_rng(0)
    ids = np.array([f"user-{i}" for i in range(1000)])
    country = rng.choice(["fr", "de", "it"], 1000)
    reference = Reference.fit({"id": ids, "country": country})
    current = {"id": np.array([f"user-{i}" for i in range(5000, 5500)]), "country": country[:500]}
    scores = drift.score(reference, current, method="psi")
    assert "id" not in scores and "free text or an identifier" in scores.reasons["id"]
    assert scores["country"] < 0.1
    # Few distinct values stay categories, however few the reference rows.
    small = Reference.fit({"c": np.array(["a", "b", "c", "d"])})
    assert "c" in drift.score(small, {"c": np.array(["x", "y"])}, method="psi")


def _digits(reference_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, shuffled: the first rows, and every other row once."""
    from sklearn.datasets import load_digits

    x = load_digits().data
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order[:reference_rows]], x[order[reference_rows:]]


@pytest.mark.parametrize("method", ["psi", "js", "ks"])
def test_a_small_reference_meeting_fresh_rows_of_the_same_data_is_no_drift(method):
    """A reference fitted on 150 rows of digits, against the other 1,647 rows (each
    once): the scores are what two samples of one law give (psi about 0.15), and the
    status is ok. By the thresholds alone the same window is past ok, as every window
    against that reference was before the status counted only scores beyond chance. A
    real shift over the same sizes (three pixels 4 levels brighter) is still an alert."""
    reference, rest = _digits(150)
    profile = Reference.fit(reference)
    result = drift.DriftTracker(profile, method=method).update(rest)
    assert result.status == "ok"
    assert result.score == pytest.approx(drift.score(profile, rest, method)[result.feature])
    by_thresholds = drift.DriftTracker(profile, method=method, false_alarm_rate=None)
    assert by_thresholds.update(rest).status != "ok"

    live = np.flatnonzero((reference == 0).mean(axis=0) < 0.5)[:3]
    brighter = rest.copy()
    brighter[:, live] += 4
    shifted = drift.DriftTracker(profile, method=method).update(brighter)
    assert shifted.status == "alert"
    assert int(shifted.feature) in live


@pytest.mark.parametrize("method", ["psi", "js", "ks", "wasserstein"])
def test_unshifted_windows_against_small_references_rarely_leave_ok(method):
    """200 references of 200 normal rows (8 features), each against a window of 2,000
    new rows of the same law: at the false-alarm rate of 1e-3 about 0.2 of them would
    leave ok (the wasserstein bar is above its true point, so fewer); 1, 1, 0 and 0 did
    here. By the thresholds alone 46 (psi), 196 (js), 77 (ks) and 199 (wasserstein) did."""
    rng = np.random.default_rng(3)
    past_ok = by_thresholds = 0
    for _ in range(200):
        profile = Reference.fit(rng.standard_normal((200, 8)))
        window = rng.standard_normal((2000, 8))
        past_ok += drift.DriftTracker(profile, method).update(window).status != "ok"
        alone = drift.DriftTracker(profile, method, false_alarm_rate=None).update(window)
        by_thresholds += alone.status != "ok"
    assert past_ok <= 2, past_ok
    assert by_thresholds >= 30, by_thresholds


def test_the_chance_bar_follows_the_laws_it_is_drawn_from():
    """chi2_exceeded and kolmogorov_exceeded against scipy; the wasserstein bar above the
    simulated 99.9 % point of two normal samples' distance."""
    from scipy import stats as scipy_stats

    from otel_dl.stats import chi2_exceeded, kolmogorov_exceeded

    for p in (1e-3, 3e-5, 1e-6):
        df = np.arange(1, 101)
        exact = scipy_stats.chi2.isf(p, df)
        found = chi2_exceeded(p, df)
        assert found[:2] == pytest.approx(exact[:2], rel=1e-9)
        assert np.all(found >= exact * 0.999) and np.all(found <= exact * 1.1)
        assert kolmogorov_exceeded(p) == pytest.approx(scipy_stats.kstwobign.isf(p), rel=0.01)

    rng = np.random.default_rng(11)
    profile = Reference.fit(rng.standard_normal((300, 1)))
    tracker = drift.DriftTracker(profile, method="wasserstein")
    bar = tracker.chance(1e-3, np.array([500.0]))[0]
    distances = [
        wasserstein_distance(rng.standard_normal(300), rng.standard_normal(500))
        for _ in range(3000)
    ]
    assert np.quantile(distances, 0.999) < bar < 2 * np.quantile(distances, 0.999)


def test_false_alarm_rate_is_checked():
    profile = Reference.fit(np.random.default_rng(0).standard_normal((50, 2)))
    for bad in (0.0, 1.0, -1e-3, 2):
        with pytest.raises(ValueError, match="false_alarm_rate must lie strictly between 0 and 1"):
            drift.DriftTracker(profile, false_alarm_rate=bad)


def test_values_a_constant_reference_feature_leaves_open_are_no_wasserstein_drift():
    """wasserstein divides by the reference's std: against a feature constant in 150
    reference rows, any other value scores in the tens. 150 rows all equal leave open
    that a share up to ln(1/p)/150 of values differs, so 1 % of them is within chance
    (a digits pixel: 0 in all 150 rows, 1 to 6 in 1.3 % of the rest); 20 % is drift."""
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((150, 3))
    reference[:, 0] = 0.0
    profile = Reference.fit(reference)
    window = rng.standard_normal((2000, 3))
    window[:, 0] = 0.0
    window[rng.choice(2000, 20, replace=False), 0] = 5.0
    result = drift.DriftTracker(profile, method="wasserstein").update(window)
    assert result.scores["0"] > 20  # far above the thresholds
    assert result.status == "ok"
    window[rng.choice(2000, 400, replace=False), 0] = 5.0
    shifted = drift.DriftTracker(profile, method="wasserstein").update(window)
    assert (shifted.status, shifted.feature) == ("alert", "0")
