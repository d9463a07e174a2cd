"""Fixtures shared by every test; the SDK pipeline they read is set up in support.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace

from tests.support import EXPORTER, SpanList


@pytest.fixture
def spans() -> Iterator[SpanList]:
    EXPORTER.clear()
    yield SpanList()
    EXPORTER.clear()


@pytest.fixture
def tracer() -> trace.Tracer:
    return trace.get_tracer("otel-dl-tests")
