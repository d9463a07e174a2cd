"""CUDA: a model call on the GPU is never synchronised by otel-dl, and its span ends, with
the device-side signals, once the GPU has finished.

These tests need a CUDA device and are skipped without one (the CPU parts of the same
path, the poller and the device-side reductions, are tested in test_hot_path.py). On a
machine with a GPU::

    .venv/bin/python -m pytest tests/test_gpu.py -q
    .venv/bin/python benchmarks/instrumentation.py --device cuda
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

import otel_dl
from otel_dl import _gpu, semconv
from otel_dl.confidence import summarize
from tests.support import SpanList

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def _wait_for_spans() -> None:
    deadline = time.monotonic() + 10
    while _gpu.pending_spans() and time.monotonic() < deadline:
        time.sleep(0.001)


def _refuse(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("otel-dl synchronised the GPU")


def test_a_gpu_call_is_not_synchronised_and_its_span_carries_device_signals(
    handle: otel_dl.Instrumentation, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model = otel_dl.watch(model.cuda().eval(), name="gpu-scorer")
    x = torch.randn(8, 8, device="cuda")  # a request-sized call: confidence on every call
    x[0, 0] = float("nan")
    monkeypatch.setattr(torch.cuda, "synchronize", _refuse)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", _refuse)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", _refuse)
    with torch.no_grad():
        out = model(x)
    monkeypatch.undo()
    expected = summarize(out.cpu().numpy(), threshold=handle.config.confidence_threshold)
    _wait_for_spans()
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    attrs = span.attributes
    assert attrs[semconv.DL_PREDICTION_COUNT] == 8
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(expected["mean"], rel=1e-4)
    assert attrs[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(1 / 64)
    assert attrs[semconv.DL_BATCH_SIZE] == 8
    assert not otel_dl.internal_error_counts().get("torch.forward.gpu")


def test_shutdown_exports_spans_still_waiting_for_the_gpu(spans: SpanList) -> None:
    h = otel_dl.instrument()
    model = otel_dl.watch(torch.nn.Linear(64, 10).cuda().eval(), name="gpu-slow")
    x = torch.randn(4096, 64, device="cuda")
    with torch.no_grad():
        for _ in range(20):
            model(x)
    h.shutdown()
    assert len(spans.get(semconv.SPAN_INFERENCE)) == 20
