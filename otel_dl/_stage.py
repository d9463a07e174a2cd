"""``otel_dl.stage``: turn a user function or block into a DL span.

As a decorator::

    @otel_dl.stage("tokenize", stage="preprocess")
    def tokenize(texts): ...

As a context manager, with the result observed explicitly::

    with otel_dl.stage("normalise") as s:
        out = normalise(batch)
        s.observe(out)

When the function returns (or ``observe`` is given) a numpy array, a torch tensor or a
pandas DataFrame, the span carries the same drift, quality and fingerprint signals as
the built-in instrumentors, against a baseline learned per stage name (or the
``reference`` given). Async functions are traced around their ``await``.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._context import _check
from otel_dl._guard import instrumentation_enabled, report_internal_error
from otel_dl._span import Attributes, DlCall, DlSpan, base_attributes, traced_call
from otel_dl._watch import WatchState
from otel_dl.monitor import observe_once

F = TypeVar("F", bound=Callable[..., Any])

_SIGNAL_TYPES = ("numpy.ndarray", "torch.Tensor", "pandas.core.frame.DataFrame")

_states_lock = threading.Lock()
_states: dict[tuple[str, str], WatchState] = {}


def _state_for(name: str, stage: str, reference: Any) -> WatchState:
    key = (stage, name)
    with _states_lock:
        state = _states.get(key)
        if state is None or (reference is not None and state.reference is not reference):
            state = WatchState(name=name, reference=reference)
            _states[key] = state
        return state


def _is_signal_value(value: Any) -> bool:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}" in _SIGNAL_TYPES


class stage:
    """A user-defined DL span; a decorator and a context manager. See the module docstring."""

    def __init__(
        self,
        name: str,
        stage: str = semconv.STAGE_PREPROCESS,
        *,
        component: str = semconv.COMPONENT_USER,
        reference: Any = None,
        signals: bool | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("otel_dl.stage(name, ...) needs a non-empty span name")
        if not isinstance(stage, str) or not stage:
            raise ValueError(
                f"otel_dl.stage({name!r}, stage=...) needs a stage such as "
                f"{', '.join(semconv.STAGES)}"
            )
        self.name = name
        self.stage = stage
        self.component = component
        self.reference = reference
        self.signals = signals
        self.attributes = {k: _check(k, v) for k, v in (attributes or {}).items()}
        # A ContextVar, not a thread-local: one stage object may be entered by several
        # asyncio tasks at once, and each must exit its own span.
        self._open: ContextVar[tuple[StageSpan, ...]] = ContextVar(
            f"otel_dl_stage_{name}", default=()
        )

    # -- signals ------------------------------------------------------------------------
    def _signals_on(self) -> bool:
        return get_config().signals if self.signals is None else self.signals

    def _extract(self, value: Any) -> Attributes | None:
        if not self._signals_on() or not _is_signal_value(value):
            return None
        if self.stage == semconv.STAGE_INFERENCE:
            # A model's output: its confidence, as the model instrumentors record it.
            attrs: Attributes = {}
            monitor = _state_for(self.name, self.stage, self.reference).monitor()
            attrs.update(monitor.confidence(value))
            return attrs
        monitor = _state_for(self.name, self.stage, self.reference).monitor()
        return dict(observe_once(monitor, value))

    # -- decorator ----------------------------------------------------------------------
    def __call__(self, func: F) -> F:
        site = f"stage.{self.name}"
        after = lambda _call, result: self._extract(result)  # noqa: E731

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                if not instrumentation_enabled():
                    return await func(*args, **kwargs)
                with self as handle:
                    result = await func(*args, **kwargs)
                    handle.observe(result)
                    return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return traced_call(
                func,
                None,
                args,
                kwargs,
                site=site,
                name=self.name,
                stage=self.stage,
                component=self.component,
                after=after,
                attributes=self.attributes,
            )

        return wrapper  # type: ignore[return-value]

    # -- context manager ----------------------------------------------------------------
    def __enter__(self) -> StageSpan:
        handle = StageSpan(self)
        self._open.set((*self._open.get(), handle))
        handle._start()
        return handle

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        *rest, handle = self._open.get()
        self._open.set(tuple(rest))
        handle._end(exc)


class StageSpan:
    """The handle ``with otel_dl.stage(...) as s`` gives: ``s.observe(value)``, ``s.span``."""

    def __init__(self, owner: stage) -> None:
        self._owner = owner
        self._call: DlSpan | None = None

    @property
    def span(self) -> Span:
        call = self._call
        return call.span if call is not None and call.span is not None else trace.INVALID_SPAN

    def _start(self) -> None:
        if not instrumentation_enabled():
            return
        owner = self._owner
        try:
            self._call = DlSpan(
                f"stage.{owner.name}",
                base_attributes(owner.stage, owner.component, owner.attributes),
            )
            self._call.start(None, owner.name)
        except Exception:
            report_internal_error(f"stage.{owner.name}")

    def observe(self, value: Any) -> None:
        """Record the signals of ``value`` (array, tensor or DataFrame) on this span."""
        try:
            if self._call is not None:
                self._call.extract("observe", self._owner._extract, value)
        except Exception:
            report_internal_error(f"stage.{self._owner.name}")

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.span.set_attribute(key, _check(key, value))

    def _end(self, exc: BaseException | None) -> None:
        call = self._call
        if call is None:
            return
        try:
            end_ns = time.time_ns()
            call.detach()
            if exc is not None:
                call.error(exc)
            call.finish(end_ns)
        except Exception:
            report_internal_error(f"stage.{self._owner.name}")


__all__ = ["DlCall", "StageSpan", "stage"]
