"""otel-dl quickstart: a real DataLoader and model loop, traced, with drift injected.

Run it with ``make demo``. It needs no server: spans print to the terminal, one line
each. What it does:

1. ``otel_dl.instrument()`` finds this script's TracerProvider (a console exporter with
   a one-line format) and enables the DataLoader instrumentor.
2. A scoring job reads 40 batches of 256 rows through a real ``torch.utils.data``
   DataLoader and scores each with a small MLP inside ``otel_dl.stage`` spans.
3. From batch 20 on, the upstream data drifts (feature ``3`` shifts by two standard
   deviations). The first 2,048 rows are the learned baseline, so the ``dataloader.batch``
   spans show ``dl.drift.status`` go from ``ok`` to ``alert`` and name the feature.
"""

from __future__ import annotations

import torch
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from torch.utils.data import DataLoader, TensorDataset

import otel_dl
from otel_dl import semconv

SHOWN = (
    semconv.DL_BATCH_INDEX,
    semconv.DL_BATCH_SIZE,
    semconv.DL_DRIFT_STATUS,
    semconv.DL_DRIFT_SCORE,
    semconv.DL_DRIFT_FEATURE,
    semconv.DL_QUALITY_NAN_FRACTION,
    semconv.DL_CONFIDENCE_MEAN,
    "job",
)


def one_line(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    shown = " ".join(
        f"{key.removeprefix('dl.')}={_fmt(attrs[key])}" for key in SHOWN if key in attrs
    )
    duration_ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    parent = "  " if span.parent is not None else ""
    return f"{parent}{span.name:<17} {duration_ms:7.2f} ms  {shown}\n"


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def make_data(rows: int = 40 * 256, features: int = 8, drift_from: int = 20 * 256) -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(rows, features, generator=generator)
    x[drift_from:, 3] += 2.0  # the upstream source drifts half way through
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def main() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "quickstart"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line)))
    trace.set_tracer_provider(provider)

    handle = otel_dl.instrument(metrics_exporter="none", baseline_rows=2048)
    print(f"otel-dl instrumented: {', '.join(handle.instrumented) or 'nothing'}")
    print("Scoring 40 batches; the data drifts from batch 20 on.\n")

    loader = otel_dl.watch(DataLoader(make_data(), batch_size=256), source="demo://scores")
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
    ).eval()

    @otel_dl.stage("score", stage=semconv.STAGE_INFERENCE)
    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(x), dim=1)

    tracer = trace.get_tracer("quickstart")
    with otel_dl.attributes(job="nightly-scoring"), tracer.start_as_current_span("epoch"):
        for x, _y in loader:
            score(x)
    handle.shutdown()
    print("\nEach dataloader.batch span above carries dl.drift.* and dl.quality.*; in a real")
    print("deployment they go to Jaeger or Tempo over OTLP (see README.md).")


if __name__ == "__main__":
    main()
