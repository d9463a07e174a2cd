"""Small calls' signals, computed a burst at a time: the same attributes a call alone
would get, spans that end with their call's own end time once the burst is profiled
(16 calls, ``signals_delay_ms``, or a flush), and nothing lost when the burst fails."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

import otel_dl
from otel_dl import _burst, semconv
from otel_dl._config import get_config
from otel_dl.monitor import BURST_COPY_MAX_BYTES, FeatureMonitor, Later, confidence_attributes
from otel_dl.reference import Reference
from otel_dl.table import to_table
from tests.support import EXPORTER, SpanList

_SIGNALS = (
    semconv.DL_BATCH_SIZE,
    semconv.DL_DATA_SCHEMA_FINGERPRINT,
    semconv.DL_DATA_FINGERPRINT,
    semconv.DL_QUALITY_NAN_FRACTION,
    semconv.DL_QUALITY_NAN_EXCESS_FRACTION,
    semconv.DL_QUALITY_SCHEMA_MISMATCH,
    semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION,
    semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION,
    semconv.DL_PREDICTION_COUNT,
    semconv.DL_CONFIDENCE_ROWS,
    semconv.DL_CONFIDENCE_MEAN,
    semconv.DL_CONFIDENCE_MIN,
    semconv.DL_CONFIDENCE_MARGIN_MEAN,
    semconv.DL_CONFIDENCE_ENTROPY_MEAN,
    semconv.DL_CONFIDENCE_LOW_FRACTION,
)


@pytest.fixture
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def _calls(seed: int, dtype: type) -> list[tuple[np.ndarray, np.ndarray]]:
    """Calls of iris-like inputs and 3-class outputs: clean ones, NaN and infinite inputs,
    values outside the reference's range, probabilities, logits, NaN and -inf scores, one
    row, several, or a batch."""
    rng = np.random.default_rng(seed)
    x, _ = load_iris(return_X_y=True)
    calls = []
    for i in range(40):
        # Requests of a few rows, and now and then a batch of 256.
        rows = 256 if i % 10 == 9 else int(rng.integers(1, 17))
        inputs = x[rng.integers(0, len(x), rows)].astype(dtype)
        logits = rng.normal(0, 3, (rows, 3)).astype(dtype)
        if i % 5 == 1:
            inputs[0, 1] = np.nan
        if i % 7 == 2:
            inputs[-1, 0] = np.inf if i % 2 else -np.inf
        if i % 4 == 3:
            inputs[:, 2] *= 3  # petal length far above anything seen
        if i % 3 == 0:
            scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        else:
            scores = logits
        if i % 11 == 4:
            scores[0, 0] = np.nan
        if i % 13 == 5:
            scores[-1, 2] = -np.inf  # a masked class
        if i == 6:
            scores[:] = np.nan  # no finite prediction at all
        calls.append((inputs, scores.astype(dtype)))
    return calls


@pytest.mark.parametrize("legal_nan", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_burst_gives_each_call_what_it_would_get_alone(dtype: type, legal_nan: bool) -> None:
    """With ``legal_nan`` the reference itself misses feature 1 in a tenth of its rows,
    so the calls' NaN there is partly explained (``dl.quality.nan_excess_fraction``)."""
    x, _ = load_iris(return_X_y=True)
    x = x.copy()
    if legal_nan:
        x[::10, 1] = np.nan
    reference = Reference.fit(to_table(x.astype(dtype)))
    alone, burst = FeatureMonitor(reference), FeatureMonitor(reference)
    calls = _calls(7, dtype)
    expected = [{**alone.observe(i), **alone.confidence(s)} for i, s in calls]
    inputs = [burst.burst_inputs(i) for i, _ in calls]
    laters = [burst.confidence_later(s) for _, s in calls]
    assert all(i is not None for i in inputs)
    assert all(isinstance(later, Later) for later in laters)
    found = burst.profile_burst(
        inputs, [later.scores for later in laters], [later.predictions for later in laters]
    )
    for want, got in zip(expected, found, strict=True):
        assert {k for k in want if k in _SIGNALS} == {k for k in got if k in _SIGNALS}
        for key in _SIGNALS:
            if isinstance(want.get(key), float):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
                assert type(got[key]) is type(want[key]), key  # a plain float, not numpy's
            elif key in want:
                assert got[key] == want[key], key
    nan = semconv.DL_QUALITY_NAN_FRACTION, semconv.DL_QUALITY_NAN_EXCESS_FRACTION
    pairs = {(got[nan[0]] > 0, got.get(nan[1], 0.0) > 0) for got in found}
    assert all((nan[1] in got) == (got[nan[0]] > 0) for got in found)
    # Explained NaN (feature 1) only with legal_nan; unexplained (Inf in feature 0) always.
    assert pairs == (
        {(False, False), (True, True), (True, False)}
        if legal_nan
        else {(False, False), (True, True)}
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dataframe_requests_in_a_burst_get_what_observe_gives_each(dtype: type) -> None:
    """A tabular service's requests, one DataFrame row to a few, with the reference's
    feature columns: parked for a burst and profiled together, each gets what observe()
    gives it alone, its schema fingerprint included. A frame of another schema for the
    same layout (a column of integers), or of other columns, is observed at once, and so
    are the plain arrays of that layout once frames hold it."""
    pd = pytest.importorskip("pandas")
    x, _ = load_iris(return_X_y=True, as_frame=True)
    x = x.astype(dtype)
    reference = Reference.fit(to_table(x))
    alone, burst = FeatureMonitor(reference), FeatureMonitor(reference)
    calls = [x.iloc[i : i + 1 + i % 3].copy() for i in range(0, 60, 2)]
    calls[3].iloc[0, 1] = np.nan
    calls[5].iloc[0, 2] += 100  # far above the reference's range
    expected = [alone.observe(c) for c in calls]
    inputs = [burst.burst_inputs(c) for c in calls]
    assert all(i is not None for i in inputs)
    calls[0].iloc[0, 0] = -1.0  # a copy was taken at the call
    found = burst.profile_burst(inputs, [None] * len(inputs))
    signals = {*_SIGNALS, semconv.DL_DRIFT_SCORE, semconv.DL_DRIFT_STATUS}
    for want, got in zip(expected, found, strict=True):
        assert {k for k in want if k in signals} == {k for k in got if k in signals}
        for key in signals & want.keys():
            if isinstance(want[key], float):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
            else:
                assert got[key] == want[key], key
    assert {f[semconv.DL_QUALITY_NAN_FRACTION] > 0 for f in found} == {False, True}
    assert found[5][semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] > 0
    # A column of integers: another schema, profiled apart from the others in one burst,
    # with its own schema fingerprint, as observe() gives it.
    other = x.iloc[:1].astype({x.columns[0]: "int64"})
    found_too = burst.profile_burst([inputs[0], burst.burst_inputs(other)], [None, None])
    got = found_too[1]
    fingerprint = semconv.DL_DATA_SCHEMA_FINGERPRINT
    assert found_too[0][fingerprint] == found[0][fingerprint]
    assert got[fingerprint] == alone.observe(other)[fingerprint] != found[0][fingerprint]
    assert burst.burst_inputs(x.iloc[:1, ::-1]) is None  # the columns in another order
    assert burst.burst_inputs(pd.DataFrame(x.iloc[:1].to_numpy())) is None  # other names
    # An array of the frames' shape (columns named by position) is profiled on its own,
    # not as the frames are.
    array = x.iloc[:1].to_numpy()
    kept = burst.burst_inputs(array)
    assert kept is not None
    got = burst.profile_burst([kept], [None])[0]
    assert got[fingerprint] == alone.observe(array)[fingerprint] != found[0][fingerprint]


def test_a_burst_feeds_drift_call_by_call() -> None:
    """Each call's drift attributes are those of the window its own rows completed, as
    observe() gives them one call at a time: with requests of one row, batches above
    ``drift_max_rows`` (fed as the same evenly spaced subsample), and a shift half-way
    through, so that the scores and status change inside a burst."""
    x, _ = load_iris(return_X_y=True)
    reference = Reference.fit(to_table(x))
    config = dataclasses.replace(get_config(), drift_max_rows=64, drift_min_rows=100, drift_every=3)
    alone, burst = (
        FeatureMonitor(reference, config=config),
        FeatureMonitor(reference, config=config),
    )
    rng = np.random.default_rng(3)
    calls = []
    for i in range(120):
        rows = 200 if i % 9 == 4 else 1 if i % 2 else int(rng.integers(2, 40))
        batch = x[rng.integers(0, len(x), rows)]
        calls.append(batch * (1.5 if i >= 60 else 1.0))
    drift = (
        semconv.DL_DRIFT_SCORE,
        semconv.DL_DRIFT_STATUS,
        semconv.DL_DRIFT_FEATURE,
        semconv.DL_DRIFT_WINDOW_ROWS,
    )
    expected = [{k: v for k, v in alone.observe(c).items() if k in drift} for c in calls]
    inputs = [burst.burst_inputs(c) for c in calls]
    assert all(i is not None for i in inputs)
    found = []
    for start in range(0, len(calls), 16):
        chunk = inputs[start : start + 16]
        found += burst.profile_burst(chunk, [None] * len(chunk))
    assert [{k: v for k, v in f.items() if k in drift} for f in found] == expected
    statuses = {e.get(semconv.DL_DRIFT_STATUS) for e in expected}
    assert None in statuses and semconv.DRIFT_STATUS_ALERT in statuses


def _confidence_in_a_burst(monitor: FeatureMonitor, laters: list[object]) -> list[dict]:
    """What a burst gives calls whose confidence was left for it."""
    assert all(isinstance(later, Later) for later in laters)
    return monitor.profile_burst(
        [None] * len(laters),
        [later.scores for later in laters],  # type: ignore[attr-defined]
        [later.predictions for later in laters],  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize("probabilities", [False, True])
def test_a_batch_output_left_for_a_burst_gets_what_confidence_gives(probabilities: bool) -> None:
    """A batch's confidence (a sample of confidence_rows rows, all of them every
    drift_every-th call) leaves the caller's path as a copy of the rows it covers."""
    rng = np.random.default_rng(3)
    alone, burst = FeatureMonitor(), FeatureMonitor()
    outputs = []
    for _ in range(20):
        logits = rng.normal(0, 2, (256, 10)).astype(np.float32)
        outputs.append(
            np.exp(logits) / np.exp(logits).sum(1, keepdims=True) if probabilities else logits
        )
    expected = [alone.confidence(y) for y in outputs]
    laters = [burst.confidence_later(y) for y in outputs]
    assert {len(later.scores) for later in laters} == {16, 256}  # sampled, and exact calls
    for want, got in zip(expected, _confidence_in_a_burst(burst, laters), strict=True):
        assert want.keys() == got.keys()
        assert got[semconv.DL_PREDICTION_COUNT] == 256
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_scores_of_a_known_kind_are_read_so_in_a_burst(kind: str) -> None:
    """A model's raw logits are logits whatever their values (a transformers pipeline, a
    booster's margin), and a booster's probabilities are probabilities: the burst reads
    each call's scores as its caller said, as ``confidence_attributes(kind=...)`` reads
    them at the call, also where the values alone would read the other way."""
    rng = np.random.default_rng(5)
    monitor = FeatureMonitor()
    outputs = [rng.dirichlet(np.ones(3), int(rng.integers(1, 5))) for _ in range(12)]
    if kind == "logits":
        outputs[3] = rng.normal(0, 2, (2, 3))  # and some that read as logits anyway
    expected = [confidence_attributes(y, 0.5, kind=kind) for y in outputs]
    auto = [confidence_attributes(y, 0.5) for y in outputs]
    laters = [monitor.confidence_later(y, sample=False, kind=kind) for y in outputs]
    assert all(isinstance(later, Later) for later in laters)
    found = monitor.profile_burst(
        [None] * len(laters),
        [later.scores for later in laters],
        [later.predictions for later in laters],
        [later.kind for later in laters],
    )
    for want, got in zip(expected, found, strict=True):
        assert want.keys() == got.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # The distributions read as logits give other figures than read as probabilities.
    mean = semconv.DL_CONFIDENCE_MEAN
    assert (found[0][mean] == pytest.approx(auto[0][mean])) is (kind == "probabilities")


def test_class_map_rows_left_for_a_burst_get_what_confidence_gives() -> None:
    """ONNX ZipMap outputs, one {class: score} dict per prediction: only the rows the
    figures cover are read, and the burst gives what confidence() gives."""
    rng = np.random.default_rng(4)
    alone, burst = FeatureMonitor(), FeatureMonitor()
    outputs = []
    for i in range(20):
        rows = 256 if i % 2 else 5
        probs = rng.dirichlet(np.ones(3), rows)
        if i == 3:
            probs[0] = np.nan
        outputs.append([{c: float(p[c]) for c in range(3)} for p in probs])
    expected = [alone.confidence(y) for y in outputs]
    laters = [burst.confidence_later(y) for y in outputs]
    assert {len(later.scores) for later in laters} == {5, 16, 256}
    for want, got in zip(expected, _confidence_in_a_burst(burst, laters), strict=True):
        assert want.keys() == got.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert burst.confidence_later([{"a": "not a score"}] * 20) == {}


def test_the_copies_are_taken_at_the_call() -> None:
    x, _ = load_iris(return_X_y=True)
    monitor = FeatureMonitor(Reference.fit(to_table(x)))
    batch = torch.tensor(x[:2])
    kept = monitor.burst_inputs(batch)
    batch[0, 0] = float("nan")  # the caller refills its buffer after the call
    assert kept is not None and np.isfinite(kept).all()


def test_what_a_burst_cannot_take_is_observed_now() -> None:
    x, _ = load_iris(return_X_y=True)
    fitted = FeatureMonitor(Reference.fit(to_table(x)))
    assert FeatureMonitor().burst_inputs(x[:1]) is None  # no reference yet: baseline first
    rows = BURST_COPY_MAX_BYTES // x[:1].nbytes
    assert fitted.burst_inputs(np.tile(x, (rows // len(x) + 1, 1))) is None  # too large
    assert fitted.burst_inputs(np.tile(x, (rows // len(x), 1))) is not None
    assert fitted.burst_inputs(x[:1].astype(str)) is None  # not numbers
    assert fitted.burst_inputs(x[:0]) is None  # no rows
    assert fitted.burst_inputs(x[0, 0]) is None  # no rows either: a scalar
    assert fitted.burst_inputs(x[:1].tolist()) is None  # not an array
    # One column (a sigmoid) is summarised at once.
    assert not isinstance(fitted.confidence_later(np.zeros((1, 1))), Later)
    assert fitted.burst_inputs(x[:1]) is not None


def test_a_burst_gives_image_and_wide_batches_what_observe_gives() -> None:
    """Batches the burst cannot profile in one vectorised pass (images, a table wider
    than the reference, another dtype) wait as copies and are observed there one by one,
    in call order within their shape: drift included, each call gets what it would alone."""
    rng = np.random.default_rng(5)
    images = rng.normal(0, 1, (512, 3, 16, 16)).astype(np.float32)  # 768 features: narrowed
    reference = Reference.fit(to_table(images))
    alone, burst = FeatureMonitor(reference), FeatureMonitor(reference)
    calls: list[torch.Tensor | np.ndarray] = []
    for i in range(40):
        batch = rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
        if i >= 20:
            batch[:, 0] *= 4  # one channel's scale changes: drift
        if i % 6 == 1:
            batch[0, 1, 2, 3] = np.nan
        calls.append(torch.from_numpy(batch) if i % 2 else batch)
    calls.append(images[:4, :, :, :8].astype(np.float64))  # another shape and dtype
    calls.append(images[:4].reshape(4, -1))  # 2-D: another schema, wider than drift reads
    expected = [alone.observe(batch) for batch in calls]
    inputs = [burst.burst_inputs(batch) for batch in calls]
    for kept, batch in zip(inputs, calls, strict=True):
        assert kept is not None and kept.shape == batch.shape
    calls[1][:] = float("nan")  # the caller reuses its buffer: the copy is the call's own
    found = burst.profile_burst(inputs, [None] * len(inputs))
    assert semconv.DL_DRIFT_STATUS in expected[-3]
    for want, got in zip(expected, found, strict=True):
        assert got == want


def _served_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, _ = load_iris(return_X_y=True)
    model = otel_dl.watch(model.eval(), name="served", reference=Reference.fit(to_table(x)))
    return model


def _inference_spans() -> list[object]:
    return [s for s in EXPORTER.get_finished_spans() if s.name == semconv.SPAN_INFERENCE]


def test_small_calls_end_with_their_own_times_once_flushed(
    handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    model = _served_model()
    x, _ = load_iris(return_X_y=True)
    ends = []
    with torch.no_grad():
        for row in x[:3]:
            model(torch.tensor(row[None], dtype=torch.float32))
            ends.append(time.time_ns())
    assert _inference_spans() == []  # parked: nothing profiled on the callers' path
    assert _burst.pending_spans() == 3
    assert handle.force_flush()
    found = _inference_spans()
    assert len(found) == 3
    for span, returned in zip(found, ends, strict=True):
        assert span.start_time < span.end_time <= returned
        assert span.attributes[semconv.DL_BATCH_SIZE] == 1
        assert span.attributes[semconv.DL_QUALITY_NAN_FRACTION] == 0.0
        assert 0 < span.attributes[semconv.DL_CONFIDENCE_MEAN] <= 1


def test_a_full_burst_is_profiled_at_once_and_a_lone_call_within_the_delay(
    handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    model = _served_model()
    row = torch.zeros(1, 4)
    with torch.no_grad():
        # One-row calls: 16 hold too few values to fill a burst; 64 fill it.
        for _ in range(_burst.BURST_MAX_CALLS - 1):
            model(row)
        assert _inference_spans() == []
        model(row)
        assert len(_inference_spans()) == _burst.BURST_MAX_CALLS
        model(row)
    deadline = time.monotonic() + 5
    while len(_inference_spans()) < _burst.BURST_MAX_CALLS + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_inference_spans()) == _burst.BURST_MAX_CALLS + 1  # the background thread


def test_a_flush_waits_for_the_burst_the_background_thread_is_profiling(
    handle: otel_dl.Instrumentation, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst the background thread has taken is no longer parked: the flush must still
    wait for it, or its spans end after the flush (and after ``shutdown``, are lost)."""
    model = _served_model()
    taken, release = threading.Event(), threading.Event()
    profile_burst = FeatureMonitor.profile_burst

    def held(self: FeatureMonitor, *args: object, **kwargs: object) -> object:
        taken.set()
        release.wait(10)
        return profile_burst(self, *args, **kwargs)

    monkeypatch.setattr(FeatureMonitor, "profile_burst", held)
    with torch.no_grad():
        for _ in range(5):
            model(torch.zeros(1, 4))
    assert taken.wait(5)  # the background thread, after signals_delay_ms
    assert _burst.pending_spans() == 0 and _inference_spans() == []
    threading.Timer(0.3, release.set).start()
    assert handle.force_flush()
    assert len(_inference_spans()) == 5


def test_batches_fill_a_burst_in_fewer_calls_than_requests(spans: SpanList) -> None:
    """16 calls that hold BURST_VALUES values between them are a full burst."""
    h = otel_dl.instrument(signals_delay_ms=60_000)  # no burst from the background thread
    try:
        model = _served_model()
        rows = -(-_burst.BURST_VALUES // (_burst.BURST_CALLS * 4))  # 4 features a row
        batch = torch.zeros(rows, 4)
        with torch.no_grad():
            for _ in range(_burst.BURST_CALLS - 1):
                model(batch)
            assert _burst.pending_spans() == _burst.BURST_CALLS - 1
            model(batch)
        assert _burst.pending_spans() == 0
        assert len(_inference_spans()) == _burst.BURST_CALLS
    finally:
        h.shutdown()


def test_a_shorter_delay_set_later_holds_at_once(spans: SpanList) -> None:
    """The background thread reads the delay in force at least every 50 ms: after a long
    delay, a new ``instrument()`` with a short one ends parked spans within it, not after
    half of the long one."""
    h = otel_dl.instrument(signals_delay_ms=60_000)
    try:
        with torch.no_grad():
            _served_model()(torch.zeros(1, 4))
        time.sleep(0.2)  # the background thread now runs under the long delay
        assert _inference_spans() == []
    finally:
        h.shutdown()  # ends that call's span
    EXPORTER.clear()
    h = otel_dl.instrument(signals_delay_ms=100)
    try:
        with torch.no_grad():
            _served_model()(torch.zeros(1, 4))
        deadline = time.monotonic() + 5
        while not _inference_spans() and time.monotonic() < deadline:
            time.sleep(0.01)
        waited = 5 - (deadline - time.monotonic())
        assert len(_inference_spans()) == 1
        assert waited < 2.0
    finally:
        h.shutdown()


@pytest.mark.parametrize("delay_ms", [100, 0])
def test_a_duration_exemplar_points_at_the_span_it_measured(spans: SpanList, delay_ms: int) -> None:
    """With ``duration_metric`` on, each ``dl.operation.duration`` record is made in its
    own span's context: an
    exemplar leads from the histogram to the call it measured, never to the request
    around the call, nor to another request whose call filled the burst."""
    from opentelemetry import trace

    from tests.support import metric_points

    h = otel_dl.instrument(signals_delay_ms=delay_ms, duration_metric=True)
    name = f"exemplar-{delay_ms}"
    try:
        model = _served_model()
        otel_dl.watch(model, name=name)
        tracer = trace.get_tracer("test")
        with torch.no_grad():
            for i in range(_burst.BURST_CALLS):
                with tracer.start_as_current_span(f"request {i}"):
                    model(torch.full((1, 4), float(i % 5)))
        measured = {
            s.context.span_id: s.context.trace_id for s in spans.get(semconv.SPAN_INFERENCE)
        }
        exemplars = [
            exemplar
            for point in metric_points(semconv.METRIC_OPERATION_DURATION)
            if point.attributes.get(semconv.DL_MODEL_NAME) == name
            for exemplar in point.exemplars
        ]
    finally:
        h.shutdown()
    assert exemplars
    for exemplar in exemplars:
        assert measured.get(exemplar.span_id) == exemplar.trace_id


def test_with_no_delay_every_span_ends_at_its_call(spans: SpanList) -> None:
    h = otel_dl.instrument(signals_delay_ms=0)
    try:
        model = _served_model()
        with torch.no_grad():
            model(torch.zeros(1, 4))
        (span,) = _inference_spans()
        assert semconv.DL_CONFIDENCE_MEAN in span.attributes
    finally:
        h.shutdown()


def test_a_failing_burst_costs_its_signals_never_its_spans(
    handle: otel_dl.Instrumentation, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("injected")

    x, y = load_iris(return_X_y=True)
    estimator = LogisticRegression(max_iter=500).fit(x, y)
    before = otel_dl.internal_error_counts().get("signals.burst", 0)
    monkeypatch.setattr(FeatureMonitor, "profile_burst", broken)
    probabilities = estimator.predict_proba(x[:1])
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert probabilities.shape == (1, 3)
    assert otel_dl.internal_error_counts()["signals.burst"] == before + 1
    assert semconv.DL_MODEL_FINGERPRINT in span.attributes
    assert semconv.DL_CONFIDENCE_MEAN not in span.attributes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quality_of_a_burst_is_each_batch_quality(dtype: type) -> None:
    """quality_each over stacked batches equals batch_quality (and range_excess) batch by
    batch: clean batches, NaN and infinite values, values outside the range, and a
    feature the reference has no range for."""
    from otel_dl.quality import batch_quality, quality_each, range_excess

    rng = np.random.default_rng(5)
    fit = rng.normal(size=(500, 5)).astype(dtype)
    fit[:, 4] = np.nan  # no finite reference value: no range for feature 4
    reference = Reference.fit(to_table(fit))
    batches = []
    for i in range(12):
        batch = rng.normal(size=(int(rng.integers(1, 300)), 5)).astype(dtype)
        if i % 3 == 1:
            batch[0, 1] = np.nan
        if i % 4 == 2:
            batch[-1, 0] = np.inf if i % 2 else -np.inf
        if i % 5 == 3:
            batch[:, 2] *= 10
        batches.append(batch)
    seen: list[float | None] = []
    for group in (batches, [b for b in batches if np.isfinite(b).all()], batches[:1]):
        starts = np.cumsum([0] + [len(b) for b in group[:-1]]).tolist()
        nan, outside, excess = quality_each(reference, np.concatenate(group), starts)
        want = [batch_quality(reference, reference.read(b)) for b in group]
        assert nan == [w[0] for w in want]
        assert outside == [w[1] for w in want]
        tables = [reference.read(b) for b in group]
        alone = [range_excess(reference, t, w[1]) for t, w in zip(tables, want, strict=True)]
        assert excess == alone
        seen.extend(excess)
    assert any(seen) and not all(seen)
