"""Helpers shared by the overhead benchmarks: a span exporter that discards, and a timer."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class Discard(SpanExporter):
    """Accepts every batch and keeps only its last span (``last``): export cost stays out
    of the measurement."""

    last: Any = None

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        if spans:
            self.last = spans[-1]
        return SpanExportResult.SUCCESS


def per_call(fn: Callable[[], Any], calls: int, then: Callable[[], Any] | None = None) -> float:
    """Mean seconds per call of ``fn`` over ``calls`` calls, ``then()`` included once at
    the end (the work the calls left for later: a block does not hand it to the next).

    The heap is collected first, so a block does not pay for the garbage the block before
    it left (a bare block would otherwise pay for a traced block's spans and arrays).
    """
    gc.collect()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if then is not None:
        then()
    return (time.perf_counter() - start) / calls
