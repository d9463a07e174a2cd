"""Signal-aware sampling in a real process exporting over real OTLP to a loopback sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otel_dl import semconv
from otel_dl._config import resolve_config
from otel_dl.sampling import SignalAwareSpanProcessor, is_abnormal, presampler
from tests.otlp_sink import OtlpSink

JOB = """
    import torch
    from opentelemetry import trace
    from torch.utils.data import DataLoader, TensorDataset

    import otel_dl

    h = otel_dl.instrument("sampled-job", sample_every=10, metrics_exporter="none",
                           baseline_rows=500)
    x = torch.randn(200 * 50, 4, generator=torch.Generator().manual_seed(11))
    x[100 * 50 : 110 * 50, 1] = float("nan")   # batches 100..109 carry NaNs
    with trace.get_tracer("app").start_as_current_span("epoch"):
        for _ in DataLoader(TensorDataset(x), batch_size=50):
            pass
    h.shutdown()
"""


def _run_job(job: str, sink: OtlpSink | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``job`` (with ``args``) in a fresh process exporting to ``sink``, if any."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if sink is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(job), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    return result


def test_abnormal_spans_all_kept_normal_ones_one_in_n_and_parents_intact() -> None:
    with OtlpSink() as sink:
        _run_job(JOB, sink)
        spans = [s for rs in sink.resource_spans for ss in rs.scope_spans for s in ss.spans]
    attrs = {s.span_id: {kv.key: kv.value for kv in s.attributes} for s in spans}
    batches = [s for s in spans if s.name == semconv.SPAN_DATALOADER_BATCH]
    index = {s.span_id: attrs[s.span_id][semconv.DL_BATCH_INDEX].int_value for s in batches}
    nan_batches = {i for i in index.values() if 100 <= i < 110}
    assert nan_batches == set(range(100, 110)), "every abnormal batch is kept"
    for span in batches:
        rate = attrs[span.span_id][semconv.DL_SAMPLING_RATE].int_value
        assert rate == (1 if 100 <= index[span.span_id] < 110 else 10)
    normal_kept = len(batches) - len(nan_batches)
    assert 5 <= normal_kept <= 40, f"about 1 in 10 of 190 normal batches, got {normal_kept}"
    (epoch,) = [s for s in spans if s.name == "epoch"]
    kept_ids = {s.span_id for s in spans}
    assert all(s.parent_span_id in kept_ids for s in batches)
    assert not epoch.parent_span_id


PRESAMPLED_JOB = """
    import json

    import torch
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import SpanProcessor
    from torch.utils.data import DataLoader, TensorDataset

    import otel_dl

    class Made(SpanProcessor):
        def __init__(self):
            self.names = []

        def on_start(self, span, parent_context=None):
            self.names.append(span.name)

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    h = otel_dl.instrument(
        "presampled-job", sample_every=10, baseline_rows=500, duration_metric=True
    )
    made = Made()
    h.tracer_provider.add_span_processor(made)
    x = torch.randn(200 * 50, 4, generator=torch.Generator().manual_seed(3))
    x[100 * 50 : 110 * 50, 1] = float("nan")
    for _ in DataLoader(TensorDataset(x), batch_size=50):
        pass
    h.force_flush()
    durations = sum(
        point.count
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "dl.operation.duration"
        for point in metric.data.data_points
    )
    print(json.dumps({"made": made.names.count("dataloader.batch"), "durations": durations}))
    h.shutdown()
"""


def test_a_batch_that_sampling_drops_is_never_made_and_still_counted() -> None:
    """instrument(sample_every=N) judges a parked batch before its span is made: one the
    processor would drop costs no SDK span. Abnormal ones are all kept and, with
    ``duration_metric`` on, every batch's duration is still recorded."""
    with OtlpSink() as sink:
        out = json.loads(_run_job(PRESAMPLED_JOB, sink).stdout.strip().splitlines()[-1])
        spans = [s for rs in sink.resource_spans for ss in rs.scope_spans for s in ss.spans]
    batches = [s for s in spans if s.name == semconv.SPAN_DATALOADER_BATCH]
    index = {
        kv.value.int_value
        for s in batches
        for kv in s.attributes
        if kv.key == semconv.DL_BATCH_INDEX
    }
    assert set(range(100, 110)) <= index, "every abnormal batch is kept"
    assert out["durations"] == 200, "every batch's duration is recorded"
    # Before the reference exists (the first 10 batches of 50 rows), batches are profiled
    # at the call and their spans made then; from there on, only the kept ones are made.
    assert len(batches) <= out["made"] <= len(batches) + 10
    assert 15 <= len(batches) <= 60, f"10 abnormal and about 1 in 10 of 190, {len(batches)}"


OWN_PROVIDER_JOB = """
    import json, sys

    import torch
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from torch.utils.data import DataLoader, TensorDataset

    import otel_dl
    from otel_dl.sampling import SignalAwareSpanProcessor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    trace.set_tracer_provider(provider)
    mode = sys.argv[1]
    # "recipe": the processor alone, as README's recipe for an own provider shows.
    every = 1 if mode == "recipe" else 10
    h = otel_dl.instrument(sample_every=every, metrics_exporter="none", baseline_rows=500)
    wrapped = mode != "bare"
    inner = SimpleSpanProcessor(exporter)
    # Added after instrument(), as an application wiring its own provider may.
    provider.add_span_processor(
        SignalAwareSpanProcessor(inner, 10, presample=True) if wrapped else inner
    )
    x = torch.randn(200 * 50, 4, generator=torch.Generator().manual_seed(5))
    for _ in DataLoader(TensorDataset(x), batch_size=50):
        pass
    h.force_flush()
    rates = [
        s.attributes.get("dl.sampling.rate")
        for s in exporter.get_finished_spans()
        if s.name == "dataloader.batch"
    ]
    print(json.dumps(rates))
"""


def test_sample_every_without_the_processor_keeps_every_span_unweighted_and_warns() -> None:
    """With the application's own provider, ``sample_every`` needs its export processor
    wrapped. Unwrapped, nothing drops a span, so no span may claim to stand for N (the
    collector would count each N times): every batch is exported without
    ``dl.sampling.rate``, and a warning names the fix. Wrapped, sampling works, also
    with the processor added after ``instrument()``, and with the processor alone
    (``instrument()`` given no ``sample_every``): the rate is the processor's N."""
    runs = {}
    for mode in ("bare", "wrapped", "recipe"):
        result = _run_job(OWN_PROVIDER_JOB, None, mode)
        runs[mode] = (json.loads(result.stdout.strip().splitlines()[-1]), result.stderr)
    rates, stderr = runs["bare"]
    assert len(rates) == 200 and set(rates) == {None}
    assert stderr.count("no SignalAwareSpanProcessor is on the tracer provider") == 1
    assert "SignalAwareSpanProcessor(BatchSpanProcessor(exporter), 10" in stderr
    for mode in ("wrapped", "recipe"):
        rates, stderr = runs[mode]
        assert 5 <= len(rates) <= 60 and set(rates) <= {1, 10} and 10 in rates, mode
        assert "no SignalAwareSpanProcessor" not in stderr


def _span(tracer, name: str, attrs: dict, kind: SpanKind = SpanKind.INTERNAL):
    return tracer.start_span(name, kind=kind, attributes=attrs)


def test_processor_rules_for_foreign_remote_and_parent_spans() -> None:
    exporter = InMemorySpanExporter()
    processor = SignalAwareSpanProcessor(SimpleSpanProcessor(exporter), 1_000_000)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    normal = {semconv.DL_STAGE: "inference", semconv.DL_SAMPLING_RATE: 1_000_000}
    _span(tracer, "app-span", {}).end()  # not otel-dl's: kept
    _span(tracer, "client", dict(normal), SpanKind.CLIENT).end()  # continued elsewhere: kept
    parent = _span(tracer, "stage", dict(normal))
    from opentelemetry import trace

    with trace.use_span(parent, end_on_exit=False):
        _span(tracer, "child", {**normal, semconv.DL_SAMPLING_RATE: 1}).end()
        dropped = _span(tracer, "normal", dict(normal))
        dropped.end()
    parent.end()
    names = [s.name for s in exporter.get_finished_spans()]
    expected = ["app-span", "client", "child", "stage"]
    if dropped.get_span_context().span_id % 1_000_000 == 0:  # the 1-in-N pick, rarely
        expected.insert(3, "normal")
    assert names == expected
    assert processor.dropped == 5 - len(expected)


def test_admit_judges_a_span_not_made_as_its_end_would() -> None:
    """admit() keeps what on_end keeps of a normal span (a changed model fingerprint, an
    outlier duration) plus a random 1 in N, learns from the rest, and an admitted span is
    kept at its end without being judged again."""
    exporter = InMemorySpanExporter()
    processor = SignalAwareSpanProcessor(SimpleSpanProcessor(exporter), 1_000_000, presample=True)
    try:
        normal = {
            semconv.DL_STAGE: "inference",
            semconv.DL_SAMPLING_RATE: 1_000_000,
            semconv.DL_MODEL_NAME: "m",
            semconv.DL_MODEL_FINGERPRINT: "a",
        }
        # 40 ordinary calls: the duration baseline is learned, nothing is kept.
        kept = [processor.admit("inference", normal, 0.010 + i * 1e-5) for i in range(40)]
        assert not any(kept) and processor.dropped == 40
        assert processor.admit("inference", normal, 0.5), "far slower than usual"
        assert processor.admit("inference", {**normal, semconv.DL_MODEL_FINGERPRINT: "b"}, 0.01)
        provider = TracerProvider()
        provider.add_span_processor(processor)
        span = _span(provider.get_tracer("t"), "inference", dict(normal))
        processor.admitted(span)
        span.end()  # by span id it would be dropped (1 in a million), but it was admitted
        assert [s.name for s in exporter.get_finished_spans()] == ["inference"]
        assert processor.dropped == 40
    finally:
        processor.shutdown()
    assert presampler() is None, "a shut-down processor judges nothing more"


@pytest.mark.parametrize(
    ("attrs", "error", "duration", "abnormal"),
    [
        ({}, False, 0.01, False),
        ({}, True, 0.01, True),
        ({semconv.DL_DRIFT_STATUS: "warn"}, False, 0.01, True),
        ({semconv.DL_DRIFT_STATUS: "ok"}, False, 0.01, False),
        ({semconv.DL_QUALITY_NAN_FRACTION: 0.0}, False, 0.01, False),
        ({semconv.DL_QUALITY_NAN_FRACTION: 0.01}, False, 0.01, True),
        ({semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION: 0.2}, False, 0.01, True),
        ({semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION: 0.01}, False, 0.01, False),
        ({semconv.DL_QUALITY_SCHEMA_MISMATCH: True}, False, 0.01, True),
        ({semconv.DL_FEATURE_STALE: True}, False, 0.01, True),
        ({semconv.DL_CONFIDENCE_MEAN: 0.3}, False, 0.01, True),
        ({semconv.DL_CONFIDENCE_MEAN: 0.9}, False, 0.01, False),
        ({}, False, 3.0, True),
    ],
)
def test_abnormal_rules(attrs: dict, error: bool, duration: float, abnormal: bool) -> None:
    config = resolve_config({"sample_every": 10, "sample_latency": 2.0}, environ={})
    assert is_abnormal(attrs, error, duration, config) is abnormal
