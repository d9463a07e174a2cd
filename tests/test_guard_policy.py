"""otel_dl.guard: a circuit breaker on real torch and scikit-learn models under real shifts
(NaN inputs, rescaled units, faded images), with every decision read off the spans."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from opentelemetry import trace
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import otel_dl
from otel_dl import semconv
from tests.support import InternalErrors, SpanList

STATE, ACTION, REASON = semconv.DL_GUARD_STATE, semconv.DL_GUARD_ACTION, semconv.DL_GUARD_REASON
# Drift scored on every call once 100 rows are in, so a test needs a few calls, not dozens.
FAST_DRIFT = otel_dl.Config(drift_min_rows=100, drift_every=1)
COOLDOWN_S = 0.2


@pytest.fixture
def instrumented() -> Iterator[otel_dl.Instrumentation]:
    handle = otel_dl.instrument()
    yield handle
    handle.shutdown()


# --- real models on scikit-learn's bundled data -----------------------------------------------


@pytest.fixture(scope="module")
def cancer() -> dict[str, Any]:
    """Breast-cancer data split in two, a scaled logistic regression, and the prior as a
    fallback (DummyClassifier answers any input, NaN included)."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:400], order[400:]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        x[train], y[train]
    )
    prior = DummyClassifier().fit(x[train], y[train])
    return {
        "model": model,
        "prior": prior,
        "reference": otel_dl.Reference.fit(x[train]),
        "test": x[test],
    }


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    """An MLP trained on the 8x8 digits; faded scans (a fifth of the ink) are a real shift
    it answers with low confidence."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, labels = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), labels).backward()
        optimizer.step()
    net.eval()
    prior = torch.log(torch.bincount(labels, minlength=10).float() / len(labels))
    test = torch.from_numpy(x[1200:1400])
    return {
        "net": net,
        "reference": otel_dl.Reference.fit(x[:1200]),
        "test": test,
        "faded": test * 0.2,
        # A cached answer: the training prior, one row per input.
        "cached": lambda batch: prior.expand(len(batch), 10),
    }


def _call(tracer: trace.Tracer, fn: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
    """``fn(*args)`` inside a request span; the result and that span's attributes."""
    with tracer.start_as_current_span("request") as span:
        result = fn(*args)
    return result, dict(span.attributes or {})  # type: ignore[attr-defined]


def _decision(attrs: dict[str, Any]) -> tuple[Any, Any]:
    return attrs.get(STATE), attrs.get(ACTION)


# --- scikit-learn -----------------------------------------------------------------------------


def test_sklearn_rescaled_inputs_go_to_the_fallback(
    cancer: dict[str, Any], tracer: trace.Tracer, spans: SpanList
) -> None:
    model, prior, healthy = cancer["model"], cancer["prior"], cancer["test"]
    guarded = otel_dl.guard(
        model, fallback=prior, reference=cancer["reference"], trips=1, config=FAST_DRIFT
    )
    result, attrs = _call(tracer, guarded.predict_proba, healthy)
    np.testing.assert_array_equal(result, model.predict_proba(healthy))
    assert _decision(attrs) == ("closed", "model") and REASON not in attrs

    # The same patients measured in other units: every feature three times larger.
    rescaled = healthy * 3.0
    result, attrs = _call(tracer, guarded.predict_proba, rescaled)
    np.testing.assert_array_equal(result, prior.predict_proba(rescaled))
    assert _decision(attrs) == ("open", "fallback")
    assert attrs[REASON] == "drift"
    assert guarded.state == "open"
    # predict shares the breaker, and answers with the fallback's predict.
    np.testing.assert_array_equal(guarded.predict(healthy), prior.predict(healthy))


def test_sklearn_nan_inputs_are_contained_instead_of_failing(
    cancer: dict[str, Any], tracer: trace.Tracer, spans: SpanList
) -> None:
    model, prior = cancer["model"], cancer["prior"]
    broken = cancer["test"].copy()
    broken[::2, :3] = np.nan  # an upstream join started leaving three columns empty
    with pytest.raises(ValueError, match="NaN"):
        model.predict_proba(broken)
    guarded = otel_dl.guard(model, fallback=prior, reference=cancer["reference"], trips=1)
    result, attrs = _call(tracer, guarded.predict_proba, broken)
    np.testing.assert_array_equal(result, prior.predict_proba(broken))
    assert _decision(attrs) == ("open", "fallback") and attrs[REASON] == "nan_fraction"


def test_sklearn_nan_the_model_takes_natively_passes_a_new_nan_trips(
    tracer: trace.Tracer, spans: SpanList
) -> None:
    """HistGradientBoosting takes NaN: missing values as often as in its training data
    are no reason to trip max_nan_fraction (0.01), only NaN beyond what the reference
    holds is. A quarter of the features missing in a tenth of the rows is a NaN share of
    2.5 % on every call."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, y = load_breast_cancer(return_X_y=True)
    x = x.copy()
    rng = np.random.default_rng(1)
    for j in range(0, x.shape[1], 4):
        x[rng.random(len(x)) < 0.1, j] = np.nan
    model = HistGradientBoostingClassifier(max_iter=20).fit(x[:400], y[:400])
    prior = DummyClassifier().fit(x[:400], y[:400])
    guarded = otel_dl.guard(
        model, fallback=prior, reference=otel_dl.Reference.fit(x[:400]), trips=1
    )
    for start in range(400, 560, 32):
        result, attrs = _call(tracer, guarded.predict_proba, x[start : start + 32])
        np.testing.assert_array_equal(result, model.predict_proba(x[start : start + 32]))
        assert _decision(attrs) == ("closed", "model"), attrs.get(REASON)
    broken = x[400:432].copy()
    broken[:, 1] = np.nan  # never missing in training
    result, attrs = _call(tracer, guarded.predict_proba, broken)
    np.testing.assert_array_equal(result, prior.predict_proba(broken))
    assert _decision(attrs) == ("open", "fallback") and attrs[REASON] == "nan_fraction"


def test_sklearn_instrumented_inference_span_carries_the_decision(
    cancer: dict[str, Any], instrumented: otel_dl.Instrumentation, spans: SpanList
) -> None:
    model, prior = cancer["model"], cancer["prior"]
    guarded = otel_dl.guard(
        model, fallback=prior, reference=cancer["reference"], trips=1, config=FAST_DRIFT
    )
    guarded.predict_proba(cancer["test"])
    guarded.predict_proba(cancer["test"] * 3.0)
    first, second = spans.get(semconv.SPAN_INFERENCE)
    assert first.attributes[semconv.DL_MODEL_CLASS].endswith("Pipeline")
    assert _decision(dict(first.attributes)) == ("closed", "model")
    # The fallback is an instrumented model too: its span says why it answered.
    assert second.attributes[semconv.DL_MODEL_CLASS].endswith("DummyClassifier")
    assert _decision(dict(second.attributes)) == ("open", "fallback")
    assert second.attributes[REASON] == "drift"


def test_wrapper_forwards_the_model_and_keeps_results_when_healthy(
    cancer: dict[str, Any],
) -> None:
    model = cancer["model"]
    guarded = otel_dl.guard(model, fallback=cancer["prior"], reference=cancer["reference"])
    assert guarded.model is model
    assert isinstance(guarded.steps, list) and guarded.classes_.tolist() == [0, 1]
    assert not hasattr(guarded, "transform_me")
    for _ in range(3):
        np.testing.assert_array_equal(
            guarded.decision_function(cancer["test"]), model.decision_function(cancer["test"])
        )
    assert guarded.state == "closed"


# --- torch ------------------------------------------------------------------------------------


def test_torch_breaker_opens_probes_and_recovers(
    digits: dict[str, Any], tracer: trace.Tracer, spans: SpanList
) -> None:
    net, test, faded, cached = digits["net"], digits["test"], digits["faded"], digits["cached"]
    guarded = otel_dl.guard(
        net,
        fallback=cached,
        when=otel_dl.GuardPolicy(min_confidence=0.7, drift=None),
        reference=digits["reference"],
        trips=2,
        cooldown_s=COOLDOWN_S,
    )
    seen: list[tuple[Any, Any, Any]] = []

    def call(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out, attrs = _call(tracer, guarded, batch)
        seen.append((*_decision(attrs), attrs.get(REASON)))
        return out

    with torch.no_grad():
        assert torch.equal(call(test), net(test))
        call(faded)  # low confidence read from the outputs: one trip
        call(faded)  # the second in a row opens the breaker
        assert torch.equal(call(test), cached(test))  # open: even healthy input is contained
        time.sleep(COOLDOWN_S * 1.5)
        call(faded)  # a probe that still answers with low confidence reopens it
        assert guarded.state == "open"
        time.sleep(COOLDOWN_S * 1.5)
        assert torch.equal(call(test), net(test))  # a passing probe closes it
        assert torch.equal(call(test), net(test))
    assert seen == [
        ("closed", "model", None),
        ("closed", "model", "low_confidence"),
        ("closed", "model", "low_confidence"),
        ("open", "fallback", None),
        ("half_open", "probe", "low_confidence"),
        ("half_open", "probe", None),
        ("closed", "model", None),
    ]


def test_torch_nan_inputs_that_the_model_would_answer_silently(
    digits: dict[str, Any], instrumented: otel_dl.Instrumentation, spans: SpanList
) -> None:
    net, cached = otel_dl.watch(digits["net"], name="digits-mlp"), digits["cached"]
    broken = digits["test"].clone()
    broken[:, 10:20] = float("nan")  # a sensor block reads nothing
    with torch.no_grad():
        assert torch.isnan(net(broken)).all()  # no error: the model answers NaN
        (span,) = spans.get(semconv.SPAN_INFERENCE)
        assert span.attributes[semconv.DL_MODEL_NAME] == "digits-mlp"
        spans.clear()
        guarded = otel_dl.guard(
            net,
            fallback=cached,
            # Drift off: the drift window would still hold the NaN rows after reset().
            when=otel_dl.GuardPolicy(drift=None),
            reference=digits["reference"],
            trips=1,
        )
        out = guarded(broken)
        assert torch.equal(out, cached(broken))
        assert guarded(digits["test"]) is not None  # still open: the fallback answers
    assert spans.get(semconv.SPAN_INFERENCE) == []  # the model was not called while open
    guarded.reset()
    with torch.no_grad():
        guarded(digits["test"])
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert span.attributes[semconv.DL_MODEL_NAME] == "digits-mlp"
    assert _decision(dict(span.attributes)) == ("closed", "model")


def test_consecutive_input_trips_open_the_breaker(
    digits: dict[str, Any], tracer: trace.Tracer, spans: SpanList
) -> None:
    broken = digits["test"].clone()
    broken[:, 10:20] = float("nan")
    guarded = otel_dl.guard(
        digits["net"], fallback=digits["cached"], when=otel_dl.GuardPolicy(drift=None), trips=3
    )
    decisions = []
    with torch.no_grad():
        for batch in (broken, broken, digits["test"], broken, broken, broken, broken):
            decisions.append(_decision(_call(tracer, guarded, batch)[1]))
    # A healthy call in between resets the count: only three trips in a row open it.
    assert decisions == [("closed", "model")] * 5 + [("open", "fallback")] * 2


def test_abstain_returns_none(digits: dict[str, Any]) -> None:
    broken = digits["test"].clone()
    broken[:, :32] = float("nan")
    guarded = otel_dl.guard(digits["net"], fallback=None, trips=1)
    with torch.no_grad():
        assert guarded(broken) is None


# --- off, and never raising --------------------------------------------------------------------


def test_off_changes_nothing(digits: dict[str, Any], tracer: trace.Tracer, spans: SpanList) -> None:
    net, faded = digits["net"], digits["faded"]
    broken = digits["test"].clone()
    broken[:, 10:20] = float("nan")
    guarded = otel_dl.guard(
        net,
        fallback=digits["cached"],
        when=otel_dl.GuardPolicy(min_confidence=0.99),
        reference=digits["reference"],
        trips=1,
        enabled=False,
    )
    with torch.no_grad():
        for batch in (faded, broken, faded):
            out, attrs = _call(tracer, guarded, batch)
            np.testing.assert_array_equal(out.numpy(), net(batch).numpy())
            assert not any(key.startswith("dl.guard.") for key in attrs)
    assert guarded.state == "closed"


def test_a_failing_policy_is_counted_and_the_model_answers(
    cancer: dict[str, Any], tracer: trace.Tracer, spans: SpanList
) -> None:
    def policy(signals: Any) -> str:
        raise KeyError("bug in the policy")

    errors = InternalErrors()
    model = cancer["model"]
    guarded = otel_dl.guard(model, fallback=cancer["prior"], when=policy, trips=1)
    result, attrs = _call(tracer, guarded.predict_proba, cancer["test"] * 3.0)
    np.testing.assert_array_equal(result, model.predict_proba(cancer["test"] * 3.0))
    assert attrs[ACTION] == "model"
    assert errors.new() == {"guard.policy": 1}


def test_user_exceptions_come_through_unchanged_and_count_as_trips(
    cancer: dict[str, Any], tracer: trace.Tracer, spans: SpanList
) -> None:
    model, prior = cancer["model"], cancer["prior"]
    broken = cancer["test"].copy()
    broken[0, 0] = np.nan  # too few NaNs for the policy, enough for scikit-learn to refuse
    errors = InternalErrors()
    guarded = otel_dl.guard(model, fallback=prior, trips=2)
    for _ in range(2):
        with pytest.raises(ValueError, match="NaN"):
            guarded.predict(broken)
    np.testing.assert_array_equal(guarded.predict(broken), prior.predict(broken))

    class Failing(DummyClassifier):
        def predict(self, x: Any) -> Any:
            raise LookupError("fallback store down")

    contained = otel_dl.guard(model, fallback=Failing().fit(broken[1:], np.zeros(168)), trips=1)
    with pytest.raises(ValueError, match="NaN"):
        contained.predict(broken)
    with pytest.raises(LookupError, match="fallback store down"):
        contained.predict(broken)
    assert errors.new() == {}


def test_custom_policy_function_reads_the_signals(
    cancer: dict[str, Any], tracer: trace.Tracer, spans: SpanList
) -> None:
    def policy(signals: Any) -> str | None:
        outside = signals.get(semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION, 0.0)
        return "units" if outside > 0.2 else None

    guarded = otel_dl.guard(
        cancer["model"],
        fallback=cancer["prior"],
        when=policy,
        reference=cancer["reference"],
        trips=1,
    )
    _, attrs = _call(tracer, guarded.predict, cancer["test"])
    assert _decision(attrs) == ("closed", "model")
    _, attrs = _call(tracer, guarded.predict, cancer["test"] * 3.0)
    assert _decision(attrs) == ("open", "fallback") and attrs[REASON] == "units"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fallback": 42}, TypeError, "fallback must be a model"),
        ({"fallback": None, "when": "drift"}, TypeError, "pass a GuardPolicy"),
        ({"fallback": None, "trips": 0}, ValueError, "trips=0"),
        ({"fallback": None, "cooldown_s": -1}, ValueError, "cooldown_s=-1"),
        ({"fallback": None, "reference": np.zeros((3, 3))}, TypeError, "Reference.fit"),
    ],
)
def test_bad_arguments_name_the_cause_and_the_fix(
    cancer: dict[str, Any], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        otel_dl.guard(cancer["model"], **kwargs)


def test_bad_policy_values_name_the_fix() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        otel_dl.GuardPolicy(max_nan_fraction=2.0)
    with pytest.raises(ValueError, match="'warn' or 'alert'"):
        otel_dl.GuardPolicy(drift="high")
