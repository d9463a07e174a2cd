"""What the standard transport instrumentations miss in the way applications start.

``instrument()`` enables OpenTelemetry's FastAPI instrumentation, which replaces the
``fastapi.FastAPI`` class with an instrumented subclass. A module that ran
``from fastapi import FastAPI`` before ``otel_dl.instrument()`` (imports at the top of
the file, ``instrument()`` in ``main()``) keeps the original class, and the apps it
makes get no server span: the caller's client span then has no callee in the trace, and
the collector cannot follow a fault into that service. Unless FastAPI traces itself
(its own telemetry, from 0.142), nothing told the user.

:class:`ImportedFastAPI` covers that case: an app made from the original class, after
``instrument()``, is instrumented as it is made, as one made from ``fastapi.FastAPI``
is. An app made before ``instrument()`` is not: call
``FastAPIInstrumentor.instrument_app(app)`` for it.
"""

from __future__ import annotations

import sys
from typing import Any

from otel_dl._guard import report_internal_error


class ImportedFastAPI:
    """Instruments the apps made from the ``FastAPI`` class that the FastAPI
    instrumentation replaced; ``uninstrument()`` takes that back (``handle.shutdown()``
    calls it before the FastAPI instrumentation's own)."""

    def __init__(self) -> None:
        self._original: Any = None
        self._init: Any = None

    def instrument(self) -> bool:
        """Wrap the original class's ``__init__``; False when there is nothing to cover
        (FastAPI not imported, or its class not replaced)."""
        fastapi = sys.modules.get("fastapi")
        if fastapi is None:
            return False
        replaced = fastapi.FastAPI
        original = replaced.__mro__[1] if len(replaced.__mro__) > 1 else None
        init = original.__dict__.get("__init__") if original is not None else None
        if init is None or original.__module__ != "fastapi.applications":
            return False

        def __init__(app: Any, *args: Any, **kwargs: Any) -> None:
            init(app, *args, **kwargs)
            try:
                # fastapi.FastAPI is the instrumented subclass while instrumented: its
                # apps instrument themselves once this returns.
                if not isinstance(app, fastapi.FastAPI) and not getattr(
                    app, "_is_instrumented_by_opentelemetry", False
                ):
                    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

                    FastAPIInstrumentor.instrument_app(app)
            except Exception:
                report_internal_error("propagation.fastapi")

        __init__.__wrapped__ = init  # type: ignore[attr-defined]
        setattr(original, "__init__", __init__)  # noqa: B010 (a class's __init__)
        self._original, self._init = original, init
        return True

    def uninstrument(self) -> None:
        if self._original is not None:
            setattr(self._original, "__init__", self._init)  # noqa: B010
            self._original = self._init = None
