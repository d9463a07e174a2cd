"""The scikit-learn instrumentor on real fitted estimators and Pipelines."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.datasets import make_classification
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import otel_dl
from otel_dl import _config, semconv
from otel_dl.instrumentors.sklearn import SklearnInstrumentor
from tests.support import InternalErrors, SpanList, broken_extractor

X, Y = make_classification(
    n_samples=300, n_features=6, n_informative=4, n_classes=3, random_state=0
)
X = X.astype(np.float64)


@pytest.fixture(autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def _one(spans: SpanList) -> dict:
    got = spans.get(semconv.SPAN_INFERENCE)
    assert len(got) == 1, [s.attributes.get(semconv.DL_MODEL_CLASS) for s in got]
    assert got[0].status.status_code is StatusCode.UNSET
    return dict(got[0].attributes)


def test_logistic_regression_predict_proba(spans: SpanList, tracer) -> None:
    model = LogisticRegression(max_iter=200).fit(X, Y)
    with tracer.start_as_current_span("request") as request:
        proba = model.predict_proba(X[:50])
    attrs = _one(spans)
    assert spans.get(semconv.SPAN_INFERENCE)[0].parent.span_id == (
        request.get_span_context().span_id
    )
    assert attrs[semconv.DL_STAGE] == "inference"
    assert attrs[semconv.DL_COMPONENT] == "sklearn"
    assert attrs[semconv.DL_MODEL_FRAMEWORK] == "sklearn"
    assert attrs[semconv.DL_MODEL_NAME] == "LogisticRegression"
    assert attrs[semconv.DL_MODEL_CLASS].endswith(".LogisticRegression")
    assert attrs[semconv.DL_MODEL_METHOD] == "predict_proba"
    assert len(attrs[semconv.DL_MODEL_FINGERPRINT]) == 32
    assert attrs[semconv.DL_BATCH_SIZE] == 50
    assert attrs[semconv.DL_PREDICTION_COUNT] == 50
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(proba.max(axis=1).mean())
    assert attrs[semconv.DL_CONFIDENCE_MIN] == pytest.approx(proba.max(axis=1).min())
    assert semconv.DL_QUALITY_NAN_FRACTION in attrs


def test_an_estimator_watched_with_confidence_false_gets_none(spans: SpanList) -> None:
    """A classifier's probabilities used as a score, not a decision (a propensity)."""
    model = otel_dl.watch(LogisticRegression(max_iter=200).fit(X, Y), confidence=False)
    model.predict_proba(X[:20])
    attrs = _one(spans)
    assert not any(key.startswith("dl.confidence.") for key in attrs)
    assert attrs[semconv.DL_PREDICTION_COUNT] == 20


def test_predict_calling_other_methods_makes_one_span(spans: SpanList) -> None:
    model = LogisticRegression(max_iter=200).fit(X, Y)
    model.predict(X[:10])  # runs decision_function inside
    attrs = _one(spans)
    assert attrs[semconv.DL_MODEL_METHOD] == "predict"
    assert attrs[semconv.DL_PREDICTION_COUNT] == 10
    assert semconv.DL_CONFIDENCE_MEAN not in attrs
    spans.clear()
    scores = model.decision_function(X[:10])
    attrs = _one(spans)
    assert attrs[semconv.DL_MODEL_METHOD] == "decision_function"
    assert scores.shape == (10, 3)
    assert 0.0 < attrs[semconv.DL_CONFIDENCE_MEAN] <= 1.0


def test_random_forest_trees_on_threads_make_no_spans(spans: SpanList) -> None:
    model = RandomForestClassifier(n_estimators=8, n_jobs=2, random_state=0).fit(X, Y)
    spans.clear()
    model.predict(X[:20])
    assert _one(spans)[semconv.DL_MODEL_METHOD] == "predict"
    spans.clear()
    proba = model.predict_proba(X[:20])
    attrs = _one(spans)
    assert attrs[semconv.DL_MODEL_NAME] == "RandomForestClassifier"
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(proba.max(axis=1).mean())


def test_hist_gradient_boosting(spans: SpanList) -> None:
    model = HistGradientBoostingClassifier(max_iter=10).fit(X, Y)
    spans.clear()
    for method in ("predict", "predict_proba", "decision_function"):
        getattr(model, method)(X[:30])
        attrs = _one(spans)
        assert attrs[semconv.DL_MODEL_METHOD] == method
        assert attrs[semconv.DL_PREDICTION_COUNT] == 30
        spans.clear()


def test_nan_a_model_handles_natively_is_no_alarm_a_new_nan_is(spans: SpanList) -> None:
    """HistGradientBoosting takes NaN as a value: a third of breast_cancer's features
    missing in 15 % of rows, in training and in serving alike, is the data as it is. Its
    spans carry that NaN share, but none is unexplained, so signal-aware sampling and the
    guard see nothing abnormal. A feature that was never missing going NaN (a broken
    upstream join) is unexplained at once."""
    from sklearn.datasets import load_breast_cancer

    from otel_dl.quality import unexplained
    from otel_dl.sampling import is_abnormal

    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    x = x.copy()
    for j in range(0, x.shape[1], 3):
        x[rng.random(len(x)) < 0.15, j] = np.nan
    model = HistGradientBoostingClassifier(max_iter=30).fit(x[:300], y[:300])
    otel_dl.watch(model, reference=otel_dl.Reference.fit(x[:300]))  # the training rows
    for start in range(300, len(x), 16):  # requests of 16 rows
        model.predict_proba(x[start : start + 16])
    served = [dict(s.attributes) for s in spans.get(semconv.SPAN_INFERENCE)]
    assert len(served) == 17
    assert all(a[semconv.DL_QUALITY_NAN_FRACTION] > 0 for a in served)
    excess = semconv.DL_QUALITY_NAN_EXCESS_FRACTION
    assert [unexplained(a, excess) for a in served] == [0.0] * 17
    config = _config.get_config()
    assert not any(is_abnormal(a, False, 0.0, config) for a in served)
    spans.clear()
    broken = x[300:316].copy()
    broken[:, 1] = np.nan  # never missing before
    model.predict_proba(broken)
    (attrs,) = [dict(s.attributes) for s in spans.get(semconv.SPAN_INFERENCE)]
    assert attrs[semconv.DL_QUALITY_NAN_EXCESS_FRACTION] >= 1 / 30
    assert is_abnormal(attrs, False, 0.0, config)


def test_one_row_requests_outside_a_small_reference_by_chance_are_no_alarm(
    spans: SpanList,
) -> None:
    """wine's 89 training rows: about one held-out patient in four lies outside their
    range in some feature, which for a one-row request of 13 features is a share above
    the 5 % that marks a span abnormal. That is chance, not a fault: no span the model is
    sure of is abnormal.
    A batch with three features in other units is."""
    from sklearn.datasets import load_wine

    from otel_dl.quality import unexplained
    from otel_dl.sampling import is_abnormal

    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = x[order[:89]], x[order[89:]]
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=2000))])
    model.fit(train, y[order[:89]])
    otel_dl.watch(model, reference=otel_dl.Reference.fit(train))
    for row in test:
        model.predict_proba(row[None, :])
    served = [dict(s.attributes) for s in spans.get(semconv.SPAN_INFERENCE)]
    assert len(served) == len(test)
    outside = [a[semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] for a in served]
    assert sum(share > 0.05 for share in outside) >= 10
    excess = semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION
    assert [unexplained(a, excess) for a in served] == [0.0] * len(test)
    config = _config.get_config()
    sure = [a for a in served if a[semconv.DL_CONFIDENCE_MEAN] >= config.confidence_threshold]
    assert len(sure) >= len(served) - 2  # a patient or two the model is unsure of
    assert not any(is_abnormal(a, False, 0.0, config) for a in sure)
    spans.clear()
    rescaled = test[:32].copy()
    rescaled[:, :3] *= 100.0
    model.predict_proba(rescaled)
    (attrs,) = [dict(s.attributes) for s in spans.get(semconv.SPAN_INFERENCE)]
    assert attrs[excess] > 0.05
    assert is_abnormal(attrs, False, 0.0, config)


def _fingerprint(spans: SpanList, model: Any, x: np.ndarray) -> str:
    spans.clear()
    model.predict(x)
    return str(_one(spans)[semconv.DL_MODEL_FINGERPRINT])


def test_gradient_boosting_libraries_fingerprint_their_trees(spans: SpanList, tmp_path) -> None:
    """XGBoost and LightGBM through their scikit-learn API: the model loaded with
    load_model, or run with another n_jobs, is the trained one; a refit of the same
    object, or another model loaded into it, is another model."""
    xgboost = pytest.importorskip("xgboost")
    lightgbm = pytest.importorskip("lightgbm")
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    trained = xgboost.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1).fit(x, y)
    first = _fingerprint(spans, trained, x[:4])
    assert _one(spans)[semconv.DL_MODEL_FRAMEWORK] == "xgboost"
    for suffix in ("json", "ubj"):
        trained.save_model(tmp_path / f"model.{suffix}")
        loaded = xgboost.XGBClassifier()
        loaded.load_model(tmp_path / f"model.{suffix}")
        np.testing.assert_array_equal(loaded.predict_proba(x), trained.predict_proba(x))
        assert _fingerprint(spans, loaded, x[:4]) == first, suffix
    assert (
        _fingerprint(spans, pickle.loads(pickle.dumps(trained)).set_params(n_jobs=2), x[:4])
        == first
    )
    other = xgboost.XGBClassifier(n_estimators=10, max_depth=2).fit(x, y)
    other.save_model(tmp_path / "other.json")
    loaded.load_model(tmp_path / "other.json")  # a hot reload into the serving object
    assert _fingerprint(spans, loaded, x[:4]) not in (first, "")
    boosted = lightgbm.LGBMClassifier(n_estimators=10, n_jobs=1, verbose=-1).fit(x, y)
    before = _fingerprint(spans, boosted, x[:4])
    assert _one(spans)[semconv.DL_MODEL_FRAMEWORK] == "lightgbm"
    assert (
        _fingerprint(spans, pickle.loads(pickle.dumps(boosted)).set_params(n_jobs=2), x[:4])
        == before
    )
    boosted.set_params(n_estimators=5).fit(x, y)  # refit in place
    assert _fingerprint(spans, boosted, x[:4]) != before


def test_contributions_and_leaves_carry_no_confidence(spans: SpanList) -> None:
    """LightGBM's predict_proba(pred_contrib=True) returns SHAP values, and
    pred_leaf=True leaf indices: no class scores, so no dl.confidence.*."""
    lightgbm = pytest.importorskip("lightgbm")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    model = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1).fit(x[:1200], y[:1200])
    spans.clear()
    model.predict_proba(x[1200:])
    assert _one(spans)[semconv.DL_CONFIDENCE_MEAN] > 0.8
    for flag in ("pred_contrib", "pred_leaf"):
        spans.clear()
        model.predict_proba(x[1200:], **{flag: True})
        attrs = _one(spans)
        assert semconv.DL_CONFIDENCE_MEAN not in attrs, flag
        assert attrs[semconv.DL_PREDICTION_COUNT] == len(x) - 1200


def test_native_xgboost_boosters_make_spans(spans: SpanList, tmp_path) -> None:
    """Serving code that loads a Booster and calls predict or inplace_predict, with no
    scikit-learn estimator: one span per call, confidence by the objective."""
    xgboost = pytest.importorskip("xgboost")
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    params = {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}
    trained = xgboost.train(params, xgboost.DMatrix(x[:400], label=y[:400]), 10)
    assert spans.get() == []  # training makes no span
    trained.save_model(tmp_path / "model.json")
    booster = xgboost.Booster(model_file=tmp_path / "model.json")
    errors = InternalErrors()
    probability = booster.predict(xgboost.DMatrix(x[400:]))
    attrs = _one(spans)
    assert attrs[semconv.DL_COMPONENT] == attrs[semconv.DL_MODEL_FRAMEWORK] == "xgboost"
    assert attrs[semconv.DL_MODEL_NAME] == "Booster"
    assert attrs[semconv.DL_BATCH_SIZE] == attrs[semconv.DL_PREDICTION_COUNT] == len(x) - 400
    top = np.maximum(probability, 1 - probability)
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(top.mean())
    assert semconv.DL_QUALITY_NAN_FRACTION not in attrs  # a DMatrix's values are not read
    fingerprint = attrs[semconv.DL_MODEL_FINGERPRINT]
    spans.clear()
    trained.predict(xgboost.DMatrix(x[:5]))
    assert _one(spans)[semconv.DL_MODEL_FINGERPRINT] == fingerprint  # loaded = trained
    spans.clear()
    margin = booster.inplace_predict(x[400:], predict_type="margin")
    attrs = _one(spans)
    assert attrs[semconv.DL_MODEL_METHOD] == "inplace_predict"
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(top.mean(), rel=1e-5)
    assert np.allclose(1 / (1 + np.exp(-margin)), probability, atol=1e-6)
    assert attrs[semconv.DL_QUALITY_NAN_FRACTION] == 0.0  # an array's values are
    spans.clear()
    booster.predict(xgboost.DMatrix(x[:5]), pred_contribs=True)
    assert semconv.DL_CONFIDENCE_MEAN not in _one(spans)
    regressor = xgboost.train({"objective": "reg:squarederror"}, xgboost.DMatrix(x, label=y), 3)
    spans.clear()
    regressor.inplace_predict(x[:5])
    assert semconv.DL_CONFIDENCE_MEAN not in _one(spans)
    spans.clear()
    xgboost.XGBClassifier(n_estimators=3).fit(x, y).predict_proba(x[:5])
    assert _one(spans)[semconv.DL_COMPONENT] == "sklearn"  # its booster's call makes none
    assert errors.new() == {}


def test_native_lightgbm_boosters_make_spans(spans: SpanList, tmp_path) -> None:
    lightgbm = pytest.importorskip("lightgbm")
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    params = {"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1}
    trained = lightgbm.train(params, lightgbm.Dataset(x, label=y), 10)
    assert spans.get() == []
    trained.save_model(tmp_path / "model.txt")
    booster = lightgbm.Booster(model_file=tmp_path / "model.txt")  # no params: the header
    errors = InternalErrors()
    probabilities = booster.predict(x[:50])
    attrs = _one(spans)
    assert attrs[semconv.DL_COMPONENT] == attrs[semconv.DL_MODEL_FRAMEWORK] == "lightgbm"
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(probabilities.max(axis=1).mean())
    assert attrs[semconv.DL_BATCH_SIZE] == attrs[semconv.DL_PREDICTION_COUNT] == 50
    assert semconv.DL_QUALITY_NAN_FRACTION in attrs
    spans.clear()
    booster.predict(x[:50], raw_score=True)  # logits: the same confidence
    assert _one(spans)[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(
        probabilities.max(axis=1).mean()
    )
    regressor = lightgbm.train(
        {"objective": "regression", "verbose": -1}, lightgbm.Dataset(x, label=y), 3
    )
    spans.clear()
    regressor.predict(x[:5])
    assert semconv.DL_CONFIDENCE_MEAN not in _one(spans)
    assert errors.new() == {}


def test_sparse_input_gets_its_batch_size(spans: SpanList) -> None:
    from scipy import sparse

    model = LogisticRegression(max_iter=200).fit(sparse.csr_matrix(X), Y)
    spans.clear()
    model.predict(sparse.csr_matrix(X[:7]))
    attrs = _one(spans)
    assert attrs[semconv.DL_BATCH_SIZE] == 7
    assert semconv.DL_QUALITY_NAN_FRACTION not in attrs  # sparse input: no data signals


def test_predictions_inside_fit_make_no_span(spans: SpanList) -> None:
    model = GradientBoostingClassifier(n_estimators=5).fit(X, Y)  # its init estimator predicts
    assert spans.get() == []
    model.predict_proba(X[:10])
    assert _one(spans)[semconv.DL_MODEL_NAME] == "GradientBoostingClassifier"


def test_pipeline_makes_one_span_for_all_its_steps(spans: SpanList) -> None:
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=200))])
    pipe.fit(X, Y)
    proba = pipe.predict_proba(X[:40])
    attrs = _one(spans)
    assert attrs[semconv.DL_MODEL_NAME] == "Pipeline"
    assert attrs[semconv.DL_MODEL_CLASS] == "sklearn.pipeline.Pipeline"
    assert list(attrs[semconv.DL_MODEL_STEPS]) == ["StandardScaler", "LogisticRegression"]
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(proba.max(axis=1).mean())
    assert hasattr(pipe, "predict_proba")
    no_proba = Pipeline([("scale", StandardScaler())])
    assert not hasattr(no_proba, "predict_proba")  # available_if still decides


def test_evaluation_and_log_probabilities_make_one_span_or_none(spans: SpanList) -> None:
    """``score(X, y)`` is evaluation: none of the predictions inside it makes a span, in
    a Pipeline or a cross-validation. ``predict_log_proba`` is one span of its own, with
    the confidence of the probabilities it is the log of."""
    from sklearn.model_selection import cross_val_score

    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=200))])
    pipe.fit(X, Y)
    pipe.score(X[:50], Y[:50])
    cross_val_score(pipe, X, Y, cv=3)
    assert spans.get(semconv.SPAN_INFERENCE) == []
    log_proba = pipe.predict_log_proba(X[:40])
    attrs = _one(spans)
    assert attrs[semconv.DL_MODEL_METHOD] == "predict_log_proba"
    assert attrs[semconv.DL_MODEL_NAME] == "Pipeline"
    mean = np.exp(log_proba).max(axis=1).mean()
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(mean, rel=1e-6)


def test_a_margin_carries_no_confidence_a_log_odds_does(spans: SpanList) -> None:
    """A LinearSVC's or a RidgeClassifier's decision_function is a margin: its softmax is
    no probability (a well-separated healthy model read so had mean 0.4, under the
    low-confidence threshold). Gradient boosting's is a log-odds: its softmax is its
    predict_proba, and the span carries that confidence."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.svm import LinearSVC

    for model in (LinearSVC().fit(X, Y), RidgeClassifier().fit(X, Y)):
        model.decision_function(X[:30])
        attrs = _one(spans)
        assert attrs[semconv.DL_PREDICTION_COUNT] == 30
        assert semconv.DL_CONFIDENCE_MEAN not in attrs
        spans.clear()
    boosting = HistGradientBoostingClassifier(max_iter=10).fit(X, Y)
    spans.clear()
    boosting.decision_function(X[:30])
    with suppress_instrumentation():
        expected = boosting.predict_proba(X[:30]).max(axis=1).mean()
    assert _one(spans)[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(expected, rel=1e-6)


def test_a_multi_output_models_probabilities_count_its_predictions(spans: SpanList) -> None:
    """predict_proba of a multi-output forest is a list of arrays, one per output: the
    span counts the rows, and carries no confidence (no single distribution per row)."""
    targets = np.column_stack([Y, (Y + 1) % 3])
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, targets)
    spans.clear()
    forest.predict_proba(X[:12])
    attrs = _one(spans)
    assert attrs[semconv.DL_PREDICTION_COUNT] == 12
    assert semconv.DL_CONFIDENCE_MEAN not in attrs


def test_an_outlier_detectors_scores_carry_no_confidence(spans: SpanList) -> None:
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=20, random_state=0).fit(X)
    forest.decision_function(X[:30])
    forest.score_samples(X[:30])
    for span in spans.get(semconv.SPAN_INFERENCE):
        assert span.attributes[semconv.DL_PREDICTION_COUNT] == 30
        assert semconv.DL_CONFIDENCE_MEAN not in span.attributes
    assert len(spans.get(semconv.SPAN_INFERENCE)) == 2


def test_a_bound_method_pickles_and_runs_in_worker_processes() -> None:
    """joblib's process backend and ``Pool.map(model.predict, ...)`` pickle the bound
    method: it pickles as the method itself, and the workers' results are the model's."""
    import pickle

    from joblib import Parallel, delayed

    model = LogisticRegression(max_iter=200).fit(X, Y)
    again = pickle.loads(pickle.dumps(model.predict_proba))
    np.testing.assert_array_equal(again(X[:5]), model.predict_proba(X[:5]))
    chunks = np.array_split(X[:60], 3)
    out = Parallel(n_jobs=2, backend="loky")(delayed(model.predict)(c) for c in chunks)
    np.testing.assert_array_equal(np.concatenate(out), model.predict(X[:60]))


FINGERPRINTS_OF_FILES = """
    import sys

    import joblib

    from otel_dl.provenance import model_fingerprint

    print(" ".join(model_fingerprint(joblib.load(path)) for path in sys.argv[1:]))
"""


def test_the_model_fingerprint_is_the_models_in_every_process(tmp_path) -> None:
    """A model trained here, the same model loaded from its file, and that file loaded in
    other processes (with other hash seeds) get one ``dl.model.fingerprint``: the
    collector reads a new fingerprint as a model change. A model fitted otherwise gets
    another. (Pickle's bytes differed: a RandomForest loaded from one file had a new
    fingerprint in every process.)"""
    import os
    import subprocess
    import sys
    import textwrap

    import joblib

    from otel_dl.provenance import model_fingerprint

    models = {
        "forest": RandomForestClassifier(n_estimators=10, random_state=0).fit(X, Y),
        "boosting": HistGradientBoostingClassifier(max_iter=5).fit(X, Y),
        "pipeline": Pipeline([("s", StandardScaler()), ("c", LogisticRegression())]).fit(X, Y),
    }
    paths, here = [], []
    for name, model in models.items():
        paths.append(str(tmp_path / f"{name}.joblib"))
        joblib.dump(model, paths[-1])
        here.append(model_fingerprint(model))
        assert model_fingerprint(joblib.load(paths[-1])) == here[-1], name
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(FINGERPRINTS_OF_FILES), *paths],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split() == here, seed
    other = RandomForestClassifier(n_estimators=10, random_state=1).fit(X, Y)
    assert model_fingerprint(other) != model_fingerprint(models["forest"])


def test_watch_and_drift_against_a_learned_baseline(
    spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every call scored, on all its rows: the second call is the whole drift window.
    config = replace(_config.get_config(), drift_max_rows=1024, drift_every=1)
    monkeypatch.setattr(_config, "_active", config)
    model = otel_dl.watch(
        LogisticRegression(max_iter=200).fit(X, Y), name="churn", version="3", owner="growth"
    )
    model.predict(np.tile(X, (4, 1)))  # 1,200 rows: the baseline
    shifted = np.tile(X, (2, 1))  # 600 rows: past drift_min_rows
    shifted[:, 1] += 10.0
    model.predict(shifted)
    first, second = spans.get(semconv.SPAN_INFERENCE)
    assert first.attributes[semconv.DL_MODEL_NAME] == "churn"
    assert first.attributes[semconv.DL_MODEL_VERSION] == "3"
    assert first.attributes["owner"] == "growth"
    assert second.attributes[semconv.DL_DRIFT_STATUS] == "alert"
    assert second.attributes[semconv.DL_DRIFT_FEATURE] == "1"


class Thresholder(ClassifierMixin, BaseEstimator):
    """A user estimator defined before instrumentation."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Thresholder:
        self.classes_ = np.unique(y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (X[:, 0] > 0).astype(int)


def test_user_estimators_defined_before_and_after_instrumentation(spans: SpanList) -> None:
    class Late(Thresholder):
        def predict(self, X: np.ndarray) -> np.ndarray:
            return super().predict(X) * 2

    Thresholder().fit(X, Y).predict(X)
    assert _one(spans)[semconv.DL_MODEL_NAME] == "Thresholder"
    spans.clear()
    Late().fit(X, Y).predict(X)
    assert _one(spans)[semconv.DL_MODEL_NAME] == "Late"


def test_user_errors_are_recorded_and_reraised_unchanged(spans: SpanList) -> None:
    model = LogisticRegression(max_iter=200).fit(X, Y)
    with suppress_instrumentation(), pytest.raises(ValueError) as bare:
        model.predict(X[:5, :3])
    with pytest.raises(ValueError) as got:
        model.predict(X[:5, :3])
    assert str(got.value) == str(bare.value)
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    spans.clear()
    with pytest.raises(NotFittedError):
        LogisticRegression().predict_proba(X)
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert span.attributes["error.type"] == "NotFittedError"


def test_uninstrument_restores_the_classes(
    spans: SpanList, handle: otel_dl.Instrumentation
) -> None:
    model = LogisticRegression(max_iter=200).fit(X, Y)
    signature = inspect.signature(LogisticRegression.predict_proba)
    handle.shutdown()
    assert inspect.isfunction(LogisticRegression.__dict__["predict_proba"])
    assert inspect.signature(LogisticRegression.predict_proba) == signature
    model.predict_proba(X[:5])
    assert spans.get() == []
    again = otel_dl.instrument()
    model.predict_proba(X[:5])
    assert len(spans.get(semconv.SPAN_INFERENCE)) == 1
    again.shutdown()


# --- One failed extractor costs only its own attributes ------------------------------------


@pytest.mark.parametrize(
    ("extractor", "kept", "dropped"),
    [
        ("_model_attributes", semconv.DL_CONFIDENCE_MEAN, semconv.DL_MODEL_NAME),
        ("_signals", semconv.DL_MODEL_NAME, semconv.DL_CONFIDENCE_MEAN),
    ],
)
def test_failing_extractor_keeps_the_span(
    spans: SpanList, monkeypatch: pytest.MonkeyPatch, extractor: str, kept: str, dropped: str
) -> None:
    model = LogisticRegression(max_iter=200).fit(X, Y)
    with suppress_instrumentation():
        expected = model.predict_proba(X[:20])
    monkeypatch.setattr(SklearnInstrumentor, extractor, staticmethod(broken_extractor))
    errors = InternalErrors()
    np.testing.assert_array_equal(model.predict_proba(X[:20]), expected)
    attrs = _one(spans)
    assert attrs[semconv.DL_COMPONENT] == "sklearn"
    assert kept in attrs
    assert dropped not in attrs
    counted = errors.new()
    assert counted and all(site.startswith("sklearn.predict_proba") for site in counted)


def test_user_transformer_defined_after_instrumentation(
    spans: SpanList, handle: otel_dl.Instrumentation
) -> None:
    # scikit-learn's set_output wraps ``transform`` when the class is created, around the
    # otel-dl wrapper put there a moment before: uninstrument cannot take that one out, so
    # it must stand aside.
    class Doubler(TransformerMixin, BaseEstimator):
        def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> Doubler:
            return self

        def transform(self, X: np.ndarray) -> np.ndarray:
            return X * 2

    doubler = Doubler().fit(X)
    np.testing.assert_array_equal(doubler.transform(X[:5]), X[:5] * 2)
    attrs = _one(spans)
    assert attrs[semconv.DL_STAGE] == "preprocess"
    assert attrs[semconv.DL_MODEL_METHOD] == "transform"
    assert attrs[semconv.DL_BATCH_SIZE] == 5
    assert semconv.DL_PREDICTION_COUNT not in attrs
    spans.clear()
    doubler.fit_transform(X)  # training: no span
    assert spans.get() == []
    handle.shutdown()
    np.testing.assert_array_equal(doubler.transform(X[:5]), X[:5] * 2)
    assert spans.get() == []


def test_a_text_pipeline_fed_raw_texts_raises_no_schema_or_drift_alarm(spans: SpanList) -> None:
    """Raw texts into a TF-IDF pipeline: batches of texts of other lengths are one schema
    (numpy sizes its text dtype to the longest), and unique texts are no category drift."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]

    def texts(n: int) -> list[str]:
        return [" ".join(rng.choice(words, int(rng.integers(3, 12)))) for _ in range(n)]

    with suppress_instrumentation():
        pipeline = Pipeline([("tfidf", TfidfVectorizer()), ("clf", LogisticRegression())])
        pipeline.fit(texts(2000), rng.integers(0, 2, 2000))
    for _ in range(120):  # past the 1,000-row auto-baseline
        pipeline.predict_proba(texts(16))
    got = [s.attributes for s in spans.get(semconv.SPAN_INFERENCE)]
    assert len(got) == 120
    assert not any(a.get(semconv.DL_QUALITY_SCHEMA_MISMATCH) for a in got)
    assert not any(a.get(semconv.DL_DRIFT_STATUS) in ("warn", "alert") for a in got)
    assert all(semconv.DL_CONFIDENCE_MEAN in a for a in got)
