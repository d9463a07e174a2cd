"""The scikit-learn instrumentor on every estimator scikit-learn ships.

Each estimator from ``sklearn.utils.all_estimators()`` is fitted on a small subset of a
bundled dataset (diabetes for regressors, breast cancer where a binary target is needed,
iris for the rest), then every one of ``predict``, ``predict_proba``,
``decision_function`` and ``transform`` it offers is called twice on the same fitted
object: under OpenTelemetry's
``suppress_instrumentation()`` (the uninstrumented result) and traced. The traced call
must make exactly one span, return an identical result and count no internal error.

Estimators that need other inputs get them from the tables below (a required
constructor argument, two-column targets, text, a kernel matrix), so almost every one
runs; the few that cannot are skipped with the reason in ``SKIPPED``. An estimator with
none of the four methods (a clusterer without ``predict``, an embedding) is still fitted,
and fitting must make no span.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode
from sklearn.base import BaseEstimator, is_classifier, is_regressor
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from sklearn.utils import all_estimators

import otel_dl
from otel_dl import semconv
from tests.support import InternalErrors, SpanList

METHODS = ("predict", "predict_proba", "decision_function", "transform")


def _stratified(X: np.ndarray, y: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    return X[rows].astype(np.float64), y[rows]


_iris = load_iris()
X_CLS, Y_CLS = _stratified(_iris.data, _iris.target, 20)  # 60 rows, 3 classes
_diabetes = load_diabetes()
X_REG, Y_REG = _diabetes.data[:80].astype(np.float64), _diabetes.target[:80]
_cancer = load_breast_cancer()
X_BIN, Y_BIN = _stratified(_cancer.data[:, :5], _cancer.target, 30)  # 60 rows, 2 classes
TEXTS = [
    "the movie is good",
    "a very bad movie",
    "good good film",
    "the film is bad",
    "a good story",
    "very good acting",
]


def _lr() -> LogisticRegression:
    return LogisticRegression(max_iter=1000)


@dataclass
class Case:
    """How to fit one estimator and what to call it on."""

    X: Any
    y: Any = None
    fit_with_y: bool = True
    params: dict[str, Any] = field(default_factory=dict)


def _two_targets(y: np.ndarray) -> np.ndarray:
    return np.column_stack([y, y[::-1]])


def _sk(module: str, name: str) -> Any:
    """``sklearn.<module>.<name>``, looked up when used: some of these classes are newer
    than the oldest scikit-learn otel-dl supports, and all_estimators() lists only the
    installed ones."""
    return getattr(importlib.import_module(f"sklearn.{module}"), name)


def _frozen() -> BaseEstimator:
    return _sk("frozen", "FrozenEstimator")(_lr().fit(X_CLS, Y_CLS))


# Estimators whose constructor needs an argument: small, fast choices.
FACTORIES: dict[str, Callable[[], BaseEstimator]] = {
    "ClassifierChain": lambda: _sk("multioutput", "ClassifierChain")(_lr(), random_state=0),
    "ColumnTransformer": lambda: ColumnTransformer(
        [("scale", StandardScaler(), [0, 1]), ("keep", "passthrough", [2, 3])]
    ),
    "FeatureUnion": lambda: _sk("pipeline", "FeatureUnion")(
        [("pca", _sk("decomposition", "PCA")(n_components=2)), ("scale", StandardScaler())]
    ),
    "FixedThresholdClassifier": lambda: _sk("model_selection", "FixedThresholdClassifier")(_lr()),
    "FrozenEstimator": _frozen,
    "GridSearchCV": lambda: GridSearchCV(_lr(), {"C": [0.1, 1.0]}, cv=3),
    "MultiOutputClassifier": lambda: _sk("multioutput", "MultiOutputClassifier")(_lr()),
    "MultiOutputRegressor": lambda: _sk("multioutput", "MultiOutputRegressor")(Ridge()),
    "OneVsOneClassifier": lambda: _sk("multiclass", "OneVsOneClassifier")(_lr()),
    "OneVsRestClassifier": lambda: _sk("multiclass", "OneVsRestClassifier")(_lr()),
    "OutputCodeClassifier": lambda: _sk("multiclass", "OutputCodeClassifier")(
        _lr(), random_state=0
    ),
    "Pipeline": lambda: Pipeline([("scale", StandardScaler()), ("clf", _lr())]),
    "RFE": lambda: _sk("feature_selection", "RFE")(_lr(), n_features_to_select=2),
    "RFECV": lambda: _sk("feature_selection", "RFECV")(_lr(), cv=3),
    "RandomizedSearchCV": lambda: _sk("model_selection", "RandomizedSearchCV")(
        _lr(), {"C": [0.1, 1.0]}, n_iter=2, cv=3, random_state=0
    ),
    "RegressorChain": lambda: _sk("multioutput", "RegressorChain")(Ridge(), random_state=0),
    "SelfTrainingClassifier": lambda: _sk("semi_supervised", "SelfTrainingClassifier")(_lr()),
    "SelectFromModel": lambda: _sk("feature_selection", "SelectFromModel")(_lr()),
    "SequentialFeatureSelector": lambda: _sk("feature_selection", "SequentialFeatureSelector")(
        _lr(), n_features_to_select=2, cv=3
    ),
    "SparseCoder": lambda: _sk("decomposition", "SparseCoder")(
        dictionary=np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0][:3]
    ),
    "StackingClassifier": lambda: _sk("ensemble", "StackingClassifier")(
        [("lr", _lr()), ("tree", DecisionTreeClassifier(random_state=0))], cv=3
    ),
    "StackingRegressor": lambda: _sk("ensemble", "StackingRegressor")(
        [("ridge", Ridge()), ("tree", DecisionTreeRegressor(random_state=0))], cv=3
    ),
    "TunedThresholdClassifierCV": lambda: _sk("model_selection", "TunedThresholdClassifierCV")(
        _lr(), cv=3
    ),
    "VotingClassifier": lambda: _sk("ensemble", "VotingClassifier")(
        [("lr", _lr()), ("nb", GaussianNB())], voting="soft"
    ),
    "VotingRegressor": lambda: _sk("ensemble", "VotingRegressor")(
        [("ridge", Ridge()), ("tree", DecisionTreeRegressor(random_state=0))]
    ),
}


# Estimators that need inputs other than the default for their kind.
_MULTI_TARGET = Case(X_REG, _two_targets(Y_REG))
CASES: dict[str, Case] = {
    # Two targets (multi-output only, or as many components as targets by default).
    "ClassifierChain": Case(X_CLS, np.column_stack([Y_CLS == 0, Y_CLS == 1]).astype(int)),
    "MultiOutputClassifier": Case(X_CLS, np.column_stack([Y_CLS, Y_CLS == 0]).astype(int)),
    "MultiOutputRegressor": _MULTI_TARGET,
    "RegressorChain": _MULTI_TARGET,
    "MultiTaskElasticNet": _MULTI_TARGET,
    "MultiTaskElasticNetCV": _MULTI_TARGET,
    "MultiTaskLasso": _MULTI_TARGET,
    "MultiTaskLassoCV": _MULTI_TARGET,
    "CCA": _MULTI_TARGET,
    "PLSCanonical": _MULTI_TARGET,
    "PLSSVD": _MULTI_TARGET,
    # Binary classification only.
    "FixedThresholdClassifier": Case(X_BIN, Y_BIN),
    "TargetEncoder": Case(X_BIN, Y_BIN),
    "TunedThresholdClassifierCV": Case(X_BIN, Y_BIN),
    # One feature.
    "IsotonicRegression": Case(X_REG[:, 2], Y_REG),
    # Text, and dicts of features.
    "CountVectorizer": Case(TEXTS, fit_with_y=False),
    "TfidfVectorizer": Case(TEXTS, fit_with_y=False),
    "HashingVectorizer": Case(TEXTS, fit_with_y=False, params={"n_features": 32}),
    "DictVectorizer": Case([{"city": "paris", "n": 1.0}, {"city": "lyon", "n": 2.0}] * 3),
    "FeatureHasher": Case(
        [{"city": "paris", "n": 1.0}, {"city": "lyon", "n": 2.0}] * 3, params={"n_features": 16}
    ),
    # A square kernel matrix.
    "KernelCenterer": Case(X_CLS @ X_CLS.T),
    # Targets, fitted and transformed on their own.
    "LabelBinarizer": Case(Y_CLS, fit_with_y=False),
    "LabelEncoder": Case(Y_CLS, fit_with_y=False),
    "MultiLabelBinarizer": Case([{"a", "b"}, {"b"}, {"c"}, {"a", "c"}], fit_with_y=False),
    # Without novelty it only has fit_predict (training).
    "LocalOutlierFactor": Case(X_CLS, params={"novelty": True}),
    # The default dimension (Johnson-Lindenstrauss for 60 rows) exceeds iris's 4 features.
    "GaussianRandomProjection": Case(X_CLS, Y_CLS, params={"n_components": 2}),
    "SparseRandomProjection": Case(X_CLS, Y_CLS, params={"n_components": 2}),
}
# Estimators that cannot run on small in-memory tables, and why.
SKIPPED: dict[str, str] = {
    "PatchExtractor": "extracts patches from a batch of 2-D images, not a feature table",
}
# Estimators whose default settings take seconds on this data: lighter, same code paths.
FAST_PARAMS: dict[str, dict[str, Any]] = {
    "LogisticRegressionCV": {"Cs": 3, "cv": 3},
    "GraphicalLassoCV": {"cv": 3},
    "TSNE": {"perplexity": 10.0, "max_iter": 250},
    "MDS": {"n_init": 1, "max_iter": 50},
}
# Settings that every scikit-learn release pyproject accepts (1.3 on) fits with: 1.3's
# QuantileRegressor defaults to a solver SciPy 1.11 removed, its SelectKBest refuses more
# features (10) than iris has, and its TargetEncoder takes no multiclass target.
PORTABLE_PARAMS: dict[str, dict[str, Any]] = {
    "QuantileRegressor": {"solver": "highs"},
    "SelectKBest": {"k": 2},
}
# TSNE's iteration count was called n_iter before scikit-learn 1.5.
_RENAMED = {"max_iter": "n_iter"}

ESTIMATORS = all_estimators()


def _case(name: str, estimator: BaseEstimator) -> Case:
    if name in CASES:
        return CASES[name]
    if is_regressor(estimator):
        return Case(X_REG, Y_REG)
    return Case(X_CLS, Y_CLS)


def _make(name: str, klass: type[BaseEstimator]) -> BaseEstimator:
    estimator = FACTORIES[name]() if name in FACTORIES else klass()
    params = {
        **FAST_PARAMS.get(name, {}),
        **PORTABLE_PARAMS.get(name, {}),
        **CASES.get(name, Case(None)).params,
    }
    accepted = estimator.get_params()
    params = {
        (_RENAMED[key] if key not in accepted and _RENAMED.get(key) in accepted else key): value
        for key, value in params.items()
    }
    if "random_state" in accepted:
        params["random_state"] = 0
    if params:
        estimator.set_params(**params)
    return estimator


def _assert_same(got: Any, expected: Any) -> None:
    assert type(got) is type(expected)
    if scipy.sparse.issparse(expected):
        assert got.format == expected.format and got.dtype == expected.dtype
        np.testing.assert_array_equal(got.toarray(), expected.toarray())
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected)
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            _assert_same(g, e)
    else:
        assert np.asarray(got).dtype == np.asarray(expected).dtype
        np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module", autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument(include=["sklearn"])
    assert "otel_dl_sklearn" in h.instrumented
    yield h
    h.shutdown()


@pytest.fixture(autouse=True)
def quiet_warnings() -> Iterator[None]:
    # Convergence and deprecation warnings on tiny data are the estimators' own business.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize(("name", "klass"), ESTIMATORS, ids=[n for n, _ in ESTIMATORS])
def test_estimator(name: str, klass: type[BaseEstimator], spans: SpanList) -> None:
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    estimator = _make(name, klass)
    case = _case(name, estimator)
    errors = InternalErrors()
    if case.fit_with_y and case.y is not None:
        estimator.fit(case.X, case.y)
    else:
        estimator.fit(case.X)
    assert spans.get() == [], "fitting made spans"
    called = []
    for method in METHODS:
        if not hasattr(estimator, method):
            continue
        call = getattr(estimator, method)
        with suppress_instrumentation():
            expected = call(case.X)
        assert spans.get() == []
        got = call(case.X)
        _assert_same(got, expected)
        (span,) = spans.get()
        spans.clear()
        called.append(method)
        attrs = span.attributes
        assert span.name == semconv.SPAN_INFERENCE
        assert span.status.status_code is StatusCode.UNSET
        assert attrs[semconv.DL_COMPONENT] == "sklearn"
        assert attrs[semconv.DL_STAGE] == ("preprocess" if method == "transform" else "inference")
        assert attrs[semconv.DL_MODEL_METHOD] == method
        # The estimator whose method ran: FrozenEstimator hands its methods over to the
        # estimator it holds (``__getattr__``), so the span names that one.
        assert attrs[semconv.DL_MODEL_NAME] == type(call.__self__).__name__
        rows = getattr(expected, "shape", (None,))[0]
        if method != "transform" and rows is not None:
            assert attrs[semconv.DL_PREDICTION_COUNT] == rows
    assert errors.new() == {}
    if is_classifier(estimator) or is_regressor(estimator):
        assert "predict" in called


# --- Composites on their typical inputs -----------------------------------------------


def _frame(rows: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "amount": rng.gamma(2.0, 10.0, rows),
            "age": rng.integers(18, 80, rows).astype(np.float64),
            "city": rng.choice(["paris", "lyon", "nice"], rows),
        }
    )
    target = ((frame["amount"] > 20) ^ (frame["city"] == "nice")).to_numpy().astype(int)
    return frame, target


def _column_pipeline() -> Pipeline:
    columns = ColumnTransformer(
        [
            ("num", StandardScaler(), ["amount", "age"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    return Pipeline([("columns", columns), ("forest", RandomForestClassifier(random_state=0))])


@pytest.mark.parametrize("method", ["predict", "predict_proba"])
def test_pipeline_with_a_categorical_column(method: str, spans: SpanList) -> None:
    frame, target = _frame(120)
    pipe = _column_pipeline().fit(frame, target)
    errors = InternalErrors()
    with suppress_instrumentation():
        expected = getattr(pipe, method)(frame)
    got = getattr(pipe, method)(frame)
    np.testing.assert_array_equal(got, expected)
    (span,) = spans.get()
    attrs = span.attributes
    assert errors.new() == {}
    assert list(attrs[semconv.DL_MODEL_STEPS]) == ["ColumnTransformer", "RandomForestClassifier"]
    assert attrs[semconv.DL_BATCH_SIZE] == 120
    # The DataFrame input, string column included, is profiled.
    assert semconv.DL_DATA_SCHEMA_FINGERPRINT in attrs
    if method == "predict_proba":
        assert 0.0 < attrs[semconv.DL_CONFIDENCE_MIN] <= attrs[semconv.DL_CONFIDENCE_MEAN] <= 1.0


def test_column_transformer_transform_on_a_frame(spans: SpanList) -> None:
    frame, target = _frame(60)
    columns = _column_pipeline().fit(frame, target).named_steps["columns"]
    spans.clear()
    errors = InternalErrors()
    with suppress_instrumentation():
        expected = columns.transform(frame)
    got = columns.transform(frame)
    np.testing.assert_array_equal(got, expected)
    (span,) = spans.get()
    assert errors.new() == {}
    assert span.attributes[semconv.DL_STAGE] == "preprocess"
    assert span.attributes[semconv.DL_MODEL_NAME] == "ColumnTransformer"
    assert span.attributes[semconv.DL_BATCH_SIZE] == 60
    assert semconv.DL_PREDICTION_COUNT not in span.attributes


def test_grid_search_over_a_pipeline(spans: SpanList) -> None:
    frame, target = _frame(120)
    search = GridSearchCV(_column_pipeline(), {"forest__n_estimators": [5, 10]}, cv=3)
    search.fit(frame, target)  # scores every candidate with predict: no span
    assert spans.get() == []
    errors = InternalErrors()
    with suppress_instrumentation():
        expected = search.predict_proba(frame)
    got = search.predict_proba(frame)
    np.testing.assert_array_equal(got, expected)
    (span,) = spans.get()
    assert errors.new() == {}
    assert span.attributes[semconv.DL_MODEL_NAME] == "GridSearchCV"
    assert span.attributes[semconv.DL_MODEL_METHOD] == "predict_proba"
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 120


def test_fit_transform_and_fit_predict_are_training(spans: SpanList) -> None:
    from sklearn.ensemble import IsolationForest

    errors = InternalErrors()
    StandardScaler().fit_transform(X_CLS)
    _column_pipeline().named_steps["columns"].fit_transform(_frame(30)[0])
    IsolationForest(n_estimators=5, random_state=0).fit_predict(X_CLS)
    assert spans.get() == []
    assert errors.new() == {}
