"""otel_dl.attributes (contextvars) and otel_dl.stage (decorator and context manager)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import otel_dl
from otel_dl import semconv
from tests.support import SpanList


def test_attributes_reach_stage_spans_and_nest(spans: SpanList) -> None:
    @otel_dl.stage("work")
    def work() -> None:
        return None

    with otel_dl.attributes(request_id="r-1", tenant="acme"):
        with otel_dl.attributes(tenant="beta", attempt=2):
            work()
        work()
    work()
    inner, outer, bare = spans.get("work")
    assert (inner.attributes["tenant"], inner.attributes["attempt"]) == ("beta", 2)
    assert outer.attributes["tenant"] == "acme" and "attempt" not in outer.attributes
    assert outer.attributes["request_id"] == "r-1"
    assert "request_id" not in bare.attributes


def test_attributes_are_isolated_between_threads(spans: SpanList) -> None:
    barrier = threading.Barrier(2)

    @otel_dl.stage("threaded")
    def work(name: str) -> None:
        barrier.wait(timeout=5)

    def run(name: str) -> None:
        with otel_dl.attributes(worker=name):
            work(name)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s.attributes["worker"] for s in spans.get("threaded")) == ["a", "b"]


def test_attributes_are_isolated_between_asyncio_tasks(spans: SpanList) -> None:
    @otel_dl.stage("async-step")
    async def step(delay: float) -> float:
        await asyncio.sleep(delay)
        return delay

    async def request(name: str, delay: float) -> float:
        with otel_dl.attributes(request_id=name):
            return await step(delay)

    async def main() -> list[float]:
        return await asyncio.gather(request("slow", 0.05), request("fast", 0.0))

    assert asyncio.run(main()) == [0.05, 0.0]
    by_id = {s.attributes["request_id"]: s for s in spans.get("async-step")}
    assert set(by_id) == {"slow", "fast"}
    assert by_id["slow"].end_time - by_id["slow"].start_time >= 40_000_000


def test_bad_attribute_value_is_refused_at_the_call() -> None:
    with (
        pytest.raises(TypeError, match=r"attributes\(bad=...\) got a dict"),
        otel_dl.attributes(bad={"a": 1}),
    ):
        pass


def test_a_reference_that_is_not_one_is_refused_at_watch() -> None:
    """Raw training data given as ``reference`` would cost every call its signals later;
    ``watch`` refuses it at once, naming the fix."""
    import numpy as np

    model = object()
    with pytest.raises(TypeError, match=r"not a numpy.ndarray: fit one .*Reference.fit\(data\)"):
        otel_dl.watch(model, name="m", reference=np.zeros((4, 2)))
    with pytest.raises(TypeError, match=r"Reference.load\(path\)"):
        otel_dl.watch(model, name="m", reference="reference.json")
    reference = otel_dl.Reference.fit(np.arange(8.0).reshape(4, 2))
    assert otel_dl.watch(model, name="m", reference=reference) is model


def test_stage_context_manager_parents_children(spans: SpanList, tracer) -> None:
    with otel_dl.stage("outer", stage=semconv.STAGE_POSTPROCESS) as s:
        s.set_attribute("app.note", "x")
        with tracer.start_as_current_span("child"):
            pass
    child, outer = spans.get()
    assert child.parent.span_id == outer.context.span_id
    assert outer.attributes[semconv.DL_STAGE] == "postprocess"
    assert outer.attributes[semconv.DL_COMPONENT] == "user"
    assert outer.attributes["app.note"] == "x"


def test_stage_records_exception_in_context_manager(spans: SpanList) -> None:
    with pytest.raises(ZeroDivisionError), otel_dl.stage("divide"):
        _ = 1 / 0
    (span,) = spans.get("divide")
    assert span.attributes["error.type"] == "ZeroDivisionError"


def test_stage_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="non-empty span name"):
        otel_dl.stage("")
    with pytest.raises(ValueError, match="needs a stage such as"):
        otel_dl.stage("x", stage="")


def test_stage_keeps_function_metadata() -> None:
    @otel_dl.stage("documented")
    def documented(x: int) -> int:
        """Doc."""
        return x

    assert documented.__name__ == "documented" and documented.__doc__ == "Doc."
    assert documented(3) == 3


def test_stage_without_signals_on_plain_values(spans: SpanList) -> None:
    otel_dl.stage("plain")(lambda: {"a": 1})()
    (span,) = spans.get("plain")
    assert not any(k.startswith("dl.drift") for k in span.attributes)


def test_stage_signals_on_arrays(spans: SpanList) -> None:
    rng = np.random.default_rng(0)

    @otel_dl.stage("featurise", reference=None)
    def featurise(shift: float) -> np.ndarray:
        x = rng.normal(size=(500, 4)).astype(np.float32)
        x[:, 2] += shift
        x[0, 0] = np.nan
        return x

    # 2 batches fit the baseline; a batch of 500 rows (drift_min_rows) is then scored at
    # once.
    for _ in range(3):
        featurise(0.0)
    featurise(3.0)
    assert spans.get("featurise")[2].attributes[semconv.DL_DRIFT_STATUS] == "ok"
    last = spans.get("featurise")[-1]
    assert last.attributes[semconv.DL_BATCH_SIZE] == 500
    assert last.attributes[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(1 / 2000)
    assert last.attributes[semconv.DL_DRIFT_STATUS] == "alert"
    assert last.attributes[semconv.DL_DRIFT_FEATURE] == "2"
