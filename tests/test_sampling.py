"""Signal-aware sampling in a real process exporting over real OTLP to a loopback sink."""

from __future__ import annotations

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
from otel_dl.sampling import SignalAwareSpanProcessor, is_abnormal
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


def test_abnormal_spans_all_kept_normal_ones_one_in_n_and_parents_intact() -> None:
    with OtlpSink() as sink:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(JOB)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parents[1],
        )
        assert result.returncode == 0, result.stderr
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
