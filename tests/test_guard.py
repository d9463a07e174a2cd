"""Never break the host: failures injected into otel-dl's own code change nothing the
user sees, and the user's own exceptions come through unchanged and are recorded."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from opentelemetry.trace import StatusCode
from torch.utils.data import DataLoader, Dataset, TensorDataset

import otel_dl
from otel_dl import _span, _watch, semconv
from otel_dl._config import get_config, set_config
from tests.support import SpanList


class Boom(RuntimeError):
    """Raised by the injected failures inside otel-dl."""


def _raise(*_args: Any, **_kwargs: Any) -> Any:
    raise Boom("injected inside otel-dl")


INJECTIONS: dict[str, tuple[Any, str]] = {
    "start": (_span.DlSpan, "start"),
    "extract": (_span.DlSpan, "extract"),
    "finish": (_span.DlSpan, "finish"),
    "duration_metric": (_span, "_duration_histogram"),
    "base_attributes": (_span, "base_attributes"),
    "monitor": (_watch.WatchState, "monitor"),
}


@pytest.fixture(autouse=True)
def duration_metric_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The duration record, one of the injection sites, is made only with
    ``duration_metric`` on: on for every test here (the variable, for instrument())."""
    monkeypatch.setenv("OTEL_DL_DURATION_METRIC", "true")
    config = get_config()
    set_config(dataclasses.replace(config, duration_metric=True))
    yield
    set_config(config)


@pytest.fixture
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def _user_function(x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 0:
        raise ValueError("empty input")
    return x * 2


@pytest.mark.parametrize("site", sorted(INJECTIONS))
def test_stage_results_and_exceptions_are_unchanged(
    site: str, monkeypatch: pytest.MonkeyPatch, spans: SpanList
) -> None:
    owner, attr = INJECTIONS[site]
    monkeypatch.setattr(owner, attr, _raise)
    traced = otel_dl.stage("double")(_user_function)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(traced(x), _user_function(x))
    with pytest.raises(ValueError, match="empty input") as caught:
        traced(np.zeros((0, 2)))
    assert type(caught.value) is ValueError
    assert otel_dl.internal_error_counts(), "the injected failure was not counted"


@pytest.mark.parametrize("site", sorted(INJECTIONS))
def test_dataloader_batches_are_unchanged(
    site: str, monkeypatch: pytest.MonkeyPatch, handle: otel_dl.Instrumentation
) -> None:
    dataset = TensorDataset(torch.arange(40.0).reshape(20, 2), torch.arange(20))
    bare = [tuple(t.clone() for t in b) for b in DataLoader(dataset, batch_size=6)]
    owner, attr = INJECTIONS[site]
    monkeypatch.setattr(owner, attr, _raise)
    traced = list(DataLoader(dataset, batch_size=6))
    assert len(traced) == len(bare)
    for got, want in zip(traced, bare, strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


class _FailingDataset(Dataset[torch.Tensor]):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        if index >= 4:
            raise self.exc
        return torch.ones(2)


def test_user_exception_from_loader_is_the_same_object_and_recorded(
    handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    exc = KeyError("row 4 is missing")
    loader = iter(DataLoader(_FailingDataset(exc), batch_size=4))
    next(loader)
    with pytest.raises(KeyError) as caught:
        next(loader)
    assert caught.value is exc
    failed = spans.get(semconv.SPAN_DATALOADER_BATCH)[-1]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "KeyError"
    assert [e.name for e in failed.events] == ["exception"]


def test_user_exception_from_stage_is_recorded(spans: SpanList) -> None:
    @otel_dl.stage("validate")
    def validate(x: int) -> int:
        raise OverflowError(f"{x} too big")

    with pytest.raises(OverflowError, match="7 too big"):
        validate(7)
    (span,) = spans.get("validate")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "OverflowError"


@pytest.mark.parametrize("which", ["request", "response"])
def test_failing_user_hooks_do_not_break_the_call(
    which: str, loader_factory: Callable[[], DataLoader], spans: SpanList
) -> None:
    hooks = {f"{which}_hook": _raise}
    h = otel_dl.instrument(**hooks)
    try:
        batches = list(loader_factory())
    finally:
        h.shutdown()
    assert len(batches) == 2
    assert len(spans.get(semconv.SPAN_DATALOADER_BATCH)) == 2


def test_hooks_add_attributes(loader_factory: Callable[[], DataLoader], spans: SpanList) -> None:
    def request_hook(span: Any, call: otel_dl.DlCall) -> None:
        span.set_attribute("app.component", call.component)

    def response_hook(span: Any, call: otel_dl.DlCall, result: Any) -> None:
        span.set_attribute("app.rows", int(result[0].shape[0]))

    h = otel_dl.instrument(request_hook=request_hook, response_hook=response_hook)
    try:
        list(loader_factory())
    finally:
        h.shutdown()
    first = spans.get(semconv.SPAN_DATALOADER_BATCH)[0]
    assert first.attributes["app.component"] == "torch.dataloader"
    assert first.attributes["app.rows"] == 5


@pytest.fixture
def loader_factory() -> Callable[[], DataLoader]:
    return lambda: DataLoader(TensorDataset(torch.randn(10, 3)), batch_size=5)


def test_suppressed_instrumentation_makes_no_span(spans: SpanList) -> None:
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    traced = otel_dl.stage("quiet")(_user_function)
    with suppress_instrumentation():
        traced(np.ones((2, 2)))
    assert spans.get() == []
