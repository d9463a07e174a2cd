"""The base every otel-dl instrumentor shares.

An otel-dl instrumentor is an OpenTelemetry ``BaseInstrumentor`` (so the standard
``opentelemetry-instrument`` runner finds it through its ``otel_dl_*`` entry point) with
two additions:

- it always checks that its target library is installed, and quietly does nothing when
  it is not, even when the runner asks it to skip that check;
- it accepts ``hooks=`` (an ``otel_dl._span.Hooks``), or ``request_hook=`` and
  ``response_hook=``, and hands them to the core's ``traced_call``;
- it honours ``tracer_provider=``, as the contrib instrumentations do: its spans come
  from ``self._tracer``, a tracer of that provider (else of the global one).
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.trace import Tracer

from otel_dl._span import Hooks, get_tracer

logger = logging.getLogger("otel_dl")


class DlInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Base class of the otel-dl instrumentors; see the module docstring."""

    _tracer: Tracer = get_tracer()

    def missing_dependency(self) -> str | None:
        """Why the target library cannot be instrumented, or None when it can."""
        conflict = self._check_dependency_conflicts()
        return None if conflict is None else str(conflict)

    def instrument(self, **kwargs: Any) -> Any:
        kwargs.pop("skip_dep_check", None)
        if self.is_instrumented_by_opentelemetry:
            return None
        missing = self.missing_dependency()
        if missing:
            logger.debug("otel-dl: %s not enabled: %s", type(self).__name__, missing)
            return None
        self._tracer = get_tracer(kwargs.get("tracer_provider"))
        return super().instrument(skip_dep_check=True, **kwargs)

    @staticmethod
    def hooks_from(kwargs: dict[str, Any]) -> Hooks:
        hooks = kwargs.get("hooks")
        if isinstance(hooks, Hooks):
            return hooks
        return Hooks(kwargs.get("request_hook"), kwargs.get("response_hook"))
