"""Custom attributes that every otel-dl span created inside a block carries.

``otel_dl.attributes(request_id="r-17", tenant="acme")`` is a context manager backed by
``contextvars``, so it is safe across threads and asyncio tasks: each task sees the
attributes of the blocks it runs in, and nested blocks add to (and may override) the
outer ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

from opentelemetry.util.types import AttributeValue

_EMPTY: Mapping[str, AttributeValue] = MappingProxyType({})
_current: ContextVar[Mapping[str, AttributeValue]] = ContextVar(
    "otel_dl_attributes", default=_EMPTY
)


def _check(key: str, value: object) -> AttributeValue:
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(
        isinstance(item, str | bool | int | float) for item in value
    ):
        return tuple(value)  # type: ignore[return-value]
    raise TypeError(
        f"otel_dl.attributes({key}=...) got a {type(value).__name__}; span attribute values "
        "must be str, bool, int, float or a sequence of one of those"
    )


@contextmanager
def attributes(**kv: AttributeValue) -> Iterator[None]:
    """Add ``kv`` to every otel-dl span created inside the block.

    A value of the wrong type raises ``TypeError`` here, at the call site, rather than
    being dropped later.
    """
    merged = dict(_current.get())
    merged.update({key: _check(key, value) for key, value in kv.items()})
    token = _current.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _current.reset(token)


def current_attributes() -> Mapping[str, AttributeValue]:
    """The attributes of the enclosing ``attributes()`` blocks (empty outside any)."""
    return _current.get()
