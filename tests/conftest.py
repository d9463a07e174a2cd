"""Fixtures shared by every test; the SDK pipeline they read is set up in support.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace

from tests.support import SpanList


@pytest.fixture
def spans() -> Iterator[SpanList]:
    found = SpanList()
    found.clear()
    yield found
    found.clear()


@pytest.fixture
def tracer() -> trace.Tracer:
    return trace.get_tracer("otel-dl-tests")
