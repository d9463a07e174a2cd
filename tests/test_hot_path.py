"""The hot path's contract: each batch profiled once, one span lifecycle whose extractors
fail alone, the instrumentors' ``tracer_provider``, and GPU spans ended by the poller."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from torch.utils.data import DataLoader, TensorDataset

import otel_dl
from otel_dl import _gpu, semconv
from otel_dl._span import DlSpan
from otel_dl.confidence import summarize
from otel_dl.instrumentors import dataloader as dataloader_instrumentor
from otel_dl.instrumentors import torch_model
from tests.support import SpanList


@pytest.fixture
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_a_loader_batch_passed_to_a_model_is_profiled_once(
    handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    model = otel_dl.watch(_mlp().eval(), name="scorer")
    loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=16)
    with torch.no_grad():
        for (x,) in loader:
            model(x)
    batches = spans.get(semconv.SPAN_DATALOADER_BATCH)
    calls = spans.get(semconv.SPAN_INFERENCE)
    assert len(batches) == len(calls) == 4
    for batch, call in zip(batches, calls, strict=True):
        fingerprint = batch.attributes[semconv.DL_DATA_FINGERPRINT]
        assert call.attributes[semconv.DL_DATA_FINGERPRINT] == fingerprint
        assert call.attributes[semconv.DL_QUALITY_NAN_FRACTION] == 0.0
    # The model's own monitor never profiled a batch: the loader's profiles were reused.
    assert otel_dl._watch.ensure_state(model).monitor().feature_count is None


def test_the_same_tensor_changed_in_place_is_profiled_again(
    handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    model = otel_dl.watch(_mlp().eval(), name="scorer")
    (x,) = next(iter(DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=16)))
    x[3, 1] = float("nan")  # after the DataLoader span profiled it
    with torch.no_grad():
        model(x)
    (batch,) = spans.get(semconv.SPAN_DATALOADER_BATCH)
    (call,) = spans.get(semconv.SPAN_INFERENCE)
    assert batch.attributes[semconv.DL_QUALITY_NAN_FRACTION] == 0.0
    assert call.attributes[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(1 / 64)


@pytest.mark.parametrize(
    ("module", "name", "site"),
    [
        (torch_model, "_input_signals", "torch.forward.input_signals"),
        (torch_model, "_output_signals", "torch.forward.output_signals"),
    ],
)
def test_a_failing_model_extractor_costs_only_its_attributes(
    module: object,
    name: str,
    site: str,
    monkeypatch: pytest.MonkeyPatch,
    handle: otel_dl.Instrumentation,
    spans: SpanList,
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(module, name, broken)
    model = otel_dl.watch(_mlp().eval(), name="scorer")
    x = torch.randn(8, 4)
    with torch.no_grad():
        expected = _mlp()(x)
        got = model(x)
    assert torch.equal(got, expected)
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert span.attributes[semconv.DL_MODEL_NAME] == "scorer"
    inputs = semconv.DL_DATA_FINGERPRINT in span.attributes
    outputs = semconv.DL_CONFIDENCE_MEAN in span.attributes
    assert (inputs, outputs) == ((False, True) if "input" in name else (True, False))
    assert otel_dl.internal_error_counts().get(site, 0) >= 1


def test_a_failing_loader_extractor_costs_only_its_attributes(
    monkeypatch: pytest.MonkeyPatch, handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(dataloader_instrumentor, "_signals", broken)
    batches = list(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4))
    assert [b[0].tolist() for b in batches] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert [s.attributes[semconv.DL_BATCH_INDEX] for s in got] == [0, 1]
    assert all(semconv.DL_DATA_FINGERPRINT not in s.attributes for s in got)
    assert otel_dl.internal_error_counts().get("dataloader.next.signals", 0) >= 2


def test_instrument_honours_tracer_provider(spans: SpanList) -> None:
    instrumentor = dataloader_instrumentor.DataLoaderInstrumentor()
    assert not instrumentor.is_instrumented_by_opentelemetry
    own = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(own))
    instrumentor.instrument(tracer_provider=provider)
    try:
        list(DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    finally:
        instrumentor.uninstrument()
    assert [s.name for s in own.get_finished_spans()] == [semconv.SPAN_DATALOADER_BATCH] * 2
    assert spans.get() == []  # nothing reached the global provider


def test_a_processor_reading_the_current_span_as_a_lazy_span_is_made() -> None:
    """Making a lazily started span runs the provider's processors; one that reads the
    current span (the stand-in, still current) must neither deadlock nor fail the call.
    Run in a thread with this context, so that a regression fails instead of hanging."""
    import contextvars

    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor

    seen: list[object] = []

    class Reading(SpanProcessor):
        def on_start(self, span: object, parent_context: object = None) -> None:
            seen.append(trace.get_current_span().get_span_context())

    own = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(Reading())
    provider.add_span_processor(SimpleSpanProcessor(own))
    tracer = provider.get_tracer("test")

    def call() -> None:
        lifecycle = DlSpan("test", {semconv.DL_STAGE: semconv.STAGE_INFERENCE})
        lifecycle.start_lazily(tracer, semconv.SPAN_INFERENCE)
        with tracer.start_as_current_span("child"):  # makes the span now
            pass
        lifecycle.finish()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(call,), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    names = {s.name: s for s in own.get_finished_spans()}
    assert names["child"].parent.span_id == names[semconv.SPAN_INFERENCE].context.span_id
    assert len(seen) == 2


def test_gpu_spans_end_when_their_work_has_completed(spans: SpanList) -> None:
    """The poller that ends GPU spans, driven by a stand-in for ``torch.cuda.Event.query``:
    this machine has no GPU, so a threading.Event says when the "GPU" has finished."""
    finished = threading.Event()
    call = DlSpan("test.gpu", {semconv.DL_STAGE: "inference", semconv.DL_COMPONENT: "torch.nn"})
    call.start(None, semconv.SPAN_INFERENCE)
    call.detach()
    _gpu.finish_later(call, finished.is_set, lambda: {semconv.DL_PREDICTION_COUNT: 3})
    time.sleep(0.05)
    assert spans.get(semconv.SPAN_INFERENCE) == []  # still running: the caller never waited
    finished.set()
    deadline = time.monotonic() + 5
    while _gpu.pending_spans() and time.monotonic() < deadline:
        time.sleep(0.005)
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 3


@pytest.mark.parametrize("probabilities", [False, True])
def test_device_side_confidence_equals_the_host_summary(probabilities: bool) -> None:
    """The reductions the GPU path queues, run here on CPU tensors."""
    scores = torch.randn(50, 6, generator=torch.Generator().manual_seed(4)) * 2
    if probabilities:
        scores = torch.softmax(scores, dim=1)
    got = _gpu.confidence_stats(scores, 0.5).tolist()
    want = summarize(scores.numpy(), threshold=0.5)
    keys = ("mean", "min", "margin_mean", "entropy_mean", "low_fraction")
    np.testing.assert_allclose(got, [want[k] for k in keys], rtol=1e-4, atol=1e-6)


def test_instrument_imports_no_instrumented_library() -> None:
    """Patches are declared per module and applied when the application imports it: an
    application that never imports torch or onnxruntime does not pay for their import,
    and importing one later still instruments it."""
    import subprocess
    import sys

    code = (
        "import sys, otel_dl\n"
        "h = otel_dl.instrument(traces_exporter='none', metrics_exporter='none')\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'sklearn') if m in sys.modules))\n"
        "import onnxruntime.capi.onnxruntime_inference_collection as c\n"
        "print(hasattr(c.Session.run, '__wrapped__'))\n"
        "h.shutdown()\n"
        "print(hasattr(c.Session.run, '__wrapped__'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == ["[]", "True", "False"]


def test_an_inference_mode_batch_is_profiled_once_too(
    handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    model = otel_dl.watch(_mlp().eval(), name="scorer")
    loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=32)
    before = dict(otel_dl.internal_error_counts())
    with torch.inference_mode():  # its tensors keep no version counter
        for (x,) in loader:
            model(x)
    assert otel_dl.internal_error_counts() == before
    batches = spans.get(semconv.SPAN_DATALOADER_BATCH)
    calls = spans.get(semconv.SPAN_INFERENCE)
    for batch, call in zip(batches, calls, strict=True):
        fingerprint = batch.attributes[semconv.DL_DATA_FINGERPRINT]
        assert call.attributes[semconv.DL_DATA_FINGERPRINT] == fingerprint
