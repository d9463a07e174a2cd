"""Confidence summaries and ECE against numpy transcriptions and torchmetrics."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from otel_dl.calibration import CalibrationTracker, expected_calibration_error
from otel_dl.confidence import summarize, to_scores


def _expected(p, threshold):
    top = np.sort(p, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0).sum(axis=1)
    return {
        "mean": top[:, -1].mean(),
        "min": top[:, -1].min(),
        "margin_mean": (top[:, -1] - top[:, -2]).mean(),
        "entropy_mean": entropy.mean(),
        "low_fraction": (top[:, -1] < threshold).mean(),
        "count": len(p),
    }


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_probabilities_and_logits_agree_with_transcription(classes):
    rng = np.random.default_rng(classes)
    z = rng.standard_normal((64, classes)) * 3
    expected = _expected(_softmax(z), 0.3)
    for outputs in (z, _softmax(z), torch.tensor(z, requires_grad=True), z.tolist()):
        got = summarize(outputs, threshold=0.3)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_single_column_is_two_classes():
    p = np.array([0.1, 0.5, 0.8])
    got = summarize(p)
    assert got == pytest.approx(_expected(np.column_stack([1 - p, p]), 0.5))
    logits = np.array([[-2.0], [0.0], [40.0]])
    sig = 1 / (1 + np.exp(-logits[:, 0]))
    assert summarize(logits) == pytest.approx(_expected(np.column_stack([1 - sig, sig]), 0.5))


def test_ort_outputs_and_zipmap():
    probs = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    labels = np.array([1, 0], dtype=np.int64)
    assert summarize([labels, probs]) == summarize(probs)
    zipmap = [{0: 0.2, 1: 0.8}, {0: 0.6, 1: 0.4}]
    assert summarize(zipmap) == pytest.approx(summarize(probs))


def test_class_maps_read_as_rows_in_class_order():
    """ZipMap rows ({class: probability}) become one row each, the classes in sorted
    order whatever each dict's own order, extra keys ignored; a missing score (None)
    reads as NaN; a row without a class, or with a value that is no number, is an
    error, not a wrong row."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(10), 40)
    rows = [{c: float(p[c]) for c in range(10)} for p in probs]
    rows[5] = dict(reversed(list(rows[5].items())))  # another insertion order
    rows[7] = {**rows[7], "extra": 0.0}
    got = to_scores(rows)
    assert got.dtype == np.float64 and got.shape == (40, 10)
    assert np.array_equal(got, probs)
    named = [{"cat": 0.3, "ant": 0.7}, {"ant": 0.1, "cat": 0.9}]
    assert np.array_equal(to_scores(named), [[0.7, 0.3], [0.1, 0.9]])
    assert to_scores([{0: 0.4}, {0: 0.6}]).shape == (2, 1)
    with pytest.raises(KeyError):
        to_scores([{0: 0.5, 1: 0.5}, {0: 1.0}])
    with_none = to_scores([{0: 0.5, 1: 0.5}, {0: None, 1: 1.0}])
    assert np.isnan(with_none[1, 0]) and with_none[1, 1] == 1.0
    with pytest.raises(ValueError):
        to_scores([{0: 0.5, 1: 0.5}, {0: "high", 1: 1.0}])


def test_masked_logits_and_nan_rows():
    z = np.array([[0.0, -np.inf, 1.0], [np.nan, 1.0, 2.0]])
    got = summarize(z)
    assert got["count"] == 2
    assert got["mean"] == pytest.approx(_softmax(np.array([[0.0, 1.0]]))[0].max())
    empty = summarize(np.full((3, 2), np.nan))
    assert set(empty) == {"count"} and empty.reason


def test_ece_equals_torchmetrics_and_transcription():
    rng = np.random.default_rng(2)
    for trial in range(4):
        p = torch.softmax(torch.tensor(rng.standard_normal((400, 6)) * (trial + 1)), 1).float()
        y = torch.tensor(rng.integers(0, 6, 400))
        expected = multiclass_calibration_error(p, y, num_classes=6, n_bins=15, norm="l1")
        assert expected_calibration_error(p, y) == pytest.approx(expected.item(), abs=1e-6)
        pn, yn = p.double().numpy(), y.numpy()
        conf, correct = pn.max(1), pn.argmax(1) == yn
        bins = np.minimum((conf * 15).astype(int), 15)
        manual = sum(
            (bins == b).mean() * abs(correct[bins == b].mean() - conf[bins == b].mean())
            for b in range(16)
            if (bins == b).any()
        )
        assert expected_calibration_error(pn, yn) == pytest.approx(manual, abs=1e-6)


def test_tracker_matches_batch_ece_and_bounds_pending():
    rng = np.random.default_rng(4)
    p = _softmax(rng.standard_normal((300, 4)))
    y = rng.integers(0, 4, 300)
    tracker = CalibrationTracker(max_pending=250)
    assert tracker.ece() is None
    tracker.record(list(range(300)), p)
    assert tracker.pending == 250 and tracker.dropped == 50
    assert not tracker.feedback(0, 1)
    for i in range(50, 300):
        assert tracker.feedback(i, int(y[i]))
    assert tracker.ece() == pytest.approx(expected_calibration_error(p[50:], y[50:]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [2, 3, 10, 64])
def test_class_major_path_equals_row_path(monkeypatch, dtype, classes):
    """Few classes take a classes x rows path; it must agree with the row path, ties,
    masked logits and NaN rows included (those two go to the row path)."""
    from otel_dl import confidence

    rng = np.random.default_rng(classes)
    z = (rng.standard_normal((300, classes)) * 3).astype(dtype)
    z[:20, 1] = z[:20, 0]  # ties for the top
    p = _softmax(z.astype(np.float64)).astype(dtype)
    masked = z.copy()
    masked[5, 0] = -np.inf
    broken = z.copy()
    broken[7, 1] = np.nan
    inputs = [z, p, np.round(p, 1), masked, broken]
    fast = [summarize(x, threshold=0.4) for x in inputs]
    monkeypatch.setattr(confidence, "_CLASS_MAJOR_MAX", 0)
    slow = [summarize(x, threshold=0.4) for x in inputs]
    rel = 1e-5 if dtype == np.float32 else 1e-12
    for got, expected in zip(fast, slow, strict=True):
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=rel, abs=1e-7)


@pytest.mark.parametrize("shape", [(1, 2), (1, 10), (4, 10), (30, 5), (64, 3)])
@pytest.mark.parametrize("probabilities", [False, True])
def test_small_outputs_take_fast_paths_with_the_same_figures(shape, probabilities):
    from otel_dl.confidence import _class_major, _small, _tiny

    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    scores = rng.normal(scale=3, size=shape).astype(np.float32)
    if probabilities:
        scores = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    expected = _class_major(scores, 0.6, "auto")
    for fast in (_tiny, _small):
        got = fast(scores, 0.6, "auto")
        assert got is not None
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (fast, key)
    with_nan = scores.copy()
    with_nan[0, 0] = np.nan
    assert _tiny(with_nan, 0.6, "auto") is None
    assert _small(with_nan, 0.6, "auto") is None
