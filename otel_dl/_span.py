"""The one span lifecycle every instrumentor and ``otel_dl.stage`` goes through.

:class:`DlSpan` is a span from start to end, used at each caller's own moments::

    call = DlSpan("torch.forward", static)        # static: attributes built once per model
    call.extract("input_signals", profile, x)      # guarded: a failure drops only these
    call.start(tracer, "inference")                # one attribute set, attached as current
    ...                                            # the user's call
    call.extract("output_signals", confidence, out)
    call.finish()                                  # detach, end

Every step runs under the guard: an extractor that raises drops only the attributes it
would have produced and is counted under ``<site>.<part>`` in
``otel_dl.internal_error_counts()``; the span still goes out with everything else.

:func:`traced_call` is the whole lifecycle around one wrapped call, for wrapt wrappers::

    def _wrap_predict(wrapped, instance, args, kwargs):
        return traced_call(
            wrapped, instance, args, kwargs,
            site="sklearn.predict", name="inference", stage=semconv.STAGE_INFERENCE,
            component=semconv.COMPONENT_SKLEARN, after=extract_signals, hooks=hooks,
        )

It checks suppression first, records the user's exception on the span (status ERROR,
``error.type``) and re-raises it unchanged.

A call whose span would start only to wait for a burst can start it lazily
(:meth:`DlSpan.start_lazily`): during the call the current span is a stand-in, and the
SDK span is made when the span ends (in its burst, with every attribute at once), or as
soon as something needs it during the call: a child span starting, or the user's code
adding an event or reading the span's context. Attributes the user sets on the stand-in
go onto the span. A served model that runs cold between requests so pays for the SDK
span off its call path.

Cost. The span itself is the SDK's; around it the lifecycle adds one dict merge and the
context attach/detach. No metric is recorded per call by default: the otel-dl collector
derives the duration and signal metrics from the spans. With ``duration_metric`` on, each
span also records one point of ``dl.operation.duration`` (labelled with at most the
stage, component and model name, in the span's own context), which the SDK's metrics
pipeline makes cost 14 to 20 % of a one-row model call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from otel_dl import _burst, semconv
from otel_dl._config import get_config
from otel_dl._context import current_attributes
from otel_dl._guard import instrumentation_enabled, report_internal_error
from otel_dl._version import __version__
from otel_dl.monitor import Later
from otel_dl.sampling import presampler, sampling_every, sampling_rate

Attributes = dict[str, AttributeValue]

_tracer = trace.get_tracer("otel_dl", __version__)


def get_tracer(tracer_provider: Any = None) -> Tracer:
    """otel-dl's tracer from ``tracer_provider``, else from the global provider."""
    if tracer_provider is None:
        return _tracer
    return trace.get_tracer("otel_dl", __version__, tracer_provider=tracer_provider)


@dataclass
class DlCall:
    """What a hook sees of an instrumented call."""

    component: str
    instance: Any
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


RequestHook = Callable[[Span, DlCall], None]
ResponseHook = Callable[[Span, DlCall, Any], None]


@dataclass(frozen=True)
class Hooks:
    """The ``request_hook``/``response_hook`` pair an instrumentor was given."""

    request: RequestHook | None = None
    response: ResponseHook | None = None


NO_HOOKS = Hooks()

# --- The duration record, with duration_metric on -------------------------------------------

_duration: tuple[object, metrics.Histogram] | None = None
_LABEL_KEYS = (semconv.DL_STAGE, semconv.DL_COMPONENT, semconv.DL_MODEL_NAME)


def _duration_histogram() -> metrics.Histogram:
    global _duration
    provider = metrics.get_meter_provider()
    if _duration is None or _duration[0] is not provider:
        spec = semconv.METRICS[semconv.METRIC_OPERATION_DURATION]
        meter = metrics.get_meter("otel_dl", __version__)
        histogram = meter.create_histogram(spec.name, unit=spec.unit, description=spec.brief)
        _duration = (provider, histogram)
    return _duration[1]


def metric_labels(attrs: Mapping[str, AttributeValue]) -> Attributes:
    """The low-cardinality labels of ``dl.operation.duration`` among ``attrs``."""
    return {key: attrs[key] for key in _LABEL_KEYS if key in attrs}


def base_attributes(
    stage: str, component: str, extra: Mapping[str, AttributeValue] | None = None
) -> Attributes:
    """``dl.stage``, ``dl.component`` and ``extra``: the static part of a span's attributes."""
    attrs: Attributes = {semconv.DL_STAGE: stage, semconv.DL_COMPONENT: component}
    if extra:
        attrs.update(extra)
    return attrs


def record_error(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by the user's exception ``exc`` (which the caller re-raises)."""
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute("error.type", type(exc).__qualname__)
    span.record_exception(exc, escaped=True)


class DlSpan:
    """One otel-dl span's life; see the module docstring. Never raises."""

    __slots__ = (
        "_end_ns",
        "_ended",
        "_error",
        "_holds",
        "_token",
        "_unborn",
        "attributes",
        "labels",
        "later",
        "site",
        "span",
        "start_ns",
    )

    def __init__(
        self,
        site: str,
        static: Mapping[str, AttributeValue],
        start_ns: int | None = None,
    ) -> None:
        self.site = site
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        # Before start(): the start attributes; after: those set when the span ends.
        custom = current_attributes()
        self.attributes: Attributes = {**static, **custom} if custom else dict(static)
        # The labels of the duration record, when one is made (``duration_metric``).
        self.labels = metric_labels(static) if get_config().duration_metric else None
        self.span: Span | None = None
        self.later: Later | None = None  # signals left for a burst (see otel_dl._burst)
        self._token: object | None = None
        self._error = False
        # (tracer, name, kind, parent context) of a span made only when it ends (defer_start)
        self._unborn: tuple[Tracer, str, SpanKind, context.Context] | None = None
        self._ended: Span | None = None  # the span, once it has ended
        self._holds = 0  # what the span still waits for once ended: its burst, a shared profile
        self._end_ns: int | None = None

    def extract(self, part: str, fn: Callable[..., Mapping[str, Any] | None], *args: Any) -> None:
        """Add ``fn(*args)``'s attributes; a failure drops only them, counted at ``part``."""
        try:
            found = fn(*args)
        except Exception:
            report_internal_error(f"{self.site}.{part}")
            return
        if found:
            self.attributes.update(found)
        if isinstance(found, Later):
            if self.later is None:
                self.later = found
            else:
                self.later.merge(found)

    def start(
        self,
        tracer: Tracer | None,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attach: bool = True,
    ) -> None:
        """Start the span with the attributes gathered so far (and make it current)."""
        try:
            self.span = (tracer or _tracer).start_span(
                name, kind=kind, attributes=self.attributes, start_time=self.start_ns
            )
            self.attributes = {}
            if attach:
                self._token = context.attach(trace.set_span_in_context(self.span))
        except Exception:
            report_internal_error(self.site)

    def start_lazily(
        self, tracer: Tracer | None, name: str, *, kind: SpanKind = SpanKind.INTERNAL
    ) -> None:
        """:meth:`start`, but the SDK span is made only when the span ends, as
        :meth:`defer_start` makes it, unless something needs it during the call: until
        then a stand-in is current, which makes the span, at ``start_ns``, when a child
        starts under it or the user's code reads its context or adds an event."""
        try:
            self._unborn = (tracer or _tracer, name, kind, context.get_current())
            self._token = context.attach(trace.set_span_in_context(_StandIn(self)))
        except Exception:
            report_internal_error(self.site)

    def materialize(self) -> Span:
        """The SDK span, made now (at ``start_ns``, with the attributes gathered so far)
        if its start was deferred; once it has ended, a non-recording span with its
        context."""
        with _settling:
            unborn = self._unborn
            if self.span is None and unborn is not None:
                self._unborn = None
                tracer, name, kind, parent = unborn
                try:
                    self.span = tracer.start_span(
                        name,
                        parent,
                        kind=kind,
                        attributes=self.attributes,
                        start_time=self.start_ns,
                    )
                    self.attributes = {}
                except Exception:
                    report_internal_error(self.site)
            if self.span is not None:
                return self.span
            # Ended already (a stand-in kept past its call): its children still join it.
            ended = self._ended
            if ended is None:
                return trace.INVALID_SPAN
            return trace.NonRecordingSpan(ended.get_span_context())

    def defer_start(
        self, tracer: Tracer | None, name: str, *, kind: SpanKind = SpanKind.INTERNAL
    ) -> None:
        """Start the span only when it ends (:meth:`finish`, after its burst), as a child
        of the context current now, at ``start_ns``, with every attribute at once. Until
        then it costs its caller a reference to that context; it is never current."""
        try:
            self._unborn = (tracer or _tracer, name, kind, context.get_current())
        except Exception:
            report_internal_error(self.site)

    def attach(self) -> None:
        """Make the span current again (a lazy job's work resuming under it)."""
        if self.span is not None and self._token is None:
            self._token = context.attach(trace.set_span_in_context(self.span))

    def detach(self) -> None:
        """Stop being the current span (idempotent); the span stays open."""
        if self._token is not None:
            try:
                context.detach(self._token)  # type: ignore[arg-type]
            except Exception:
                report_internal_error(self.site)
            self._token = None

    def hook(self, hook: Callable[..., None] | None, call: DlCall, *result: Any) -> None:
        """Run a user's request/response hook on the span, under the guard."""
        if hook is None:
            return
        if self._unborn is not None:
            self.materialize()
        if self.span is None:
            return
        try:
            hook(self.span, call, *result)
        except Exception:
            report_internal_error(f"{self.site}.{'response' if result else 'request'}_hook")

    def error(self, exc: BaseException) -> None:
        """Record the user's exception (which the caller re-raises unchanged)."""
        self._error = True
        if self._unborn is not None:
            self.materialize()
        if self.span is None:
            return
        try:
            record_error(self.span, exc)
        except Exception:
            report_internal_error(self.site)

    def end(self, end_ns: int) -> None:
        """:meth:`finish` now, or, when an extractor left signals for later, once a burst
        has computed them (:mod:`otel_dl._burst`) and the profile this call shares with an
        earlier one (``later.source``) is in; the span's end time is ``end_ns``."""
        later = self.later
        if later is None or (self.span is None and self._unborn is None):
            self.finish(end_ns)
            return
        self.detach()
        self._end_ns = end_ns
        work = later.inputs is not None or later.scores is not None
        source = later.source
        if source is not None:
            self._holds = 2 if work else 1  # before either can settle
            source.when_profiled(self.settle)
        if work:
            _burst.submit(self, later, end_ns)
        elif source is None:
            self.finish(end_ns)

    def settle(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Add signals a burst (or a shared profile) brought; end the span when nothing
        else is awaited. Any thread may call it."""
        if not self._holds:  # its burst alone: no other thread settles it
            if attributes:
                self.attributes.update(attributes)
            self.finish(self._end_ns)
            return
        with _settling:
            if attributes:
                self.attributes.update(attributes)
            if self._holds > 1:
                self._holds -= 1
                return
            self._holds = 0
        self.finish(self._end_ns)

    def finish(self, end_ns: int | None = None) -> None:
        """Detach if still current, set the late attributes, record the duration, end.
        A span whose start was deferred is made here, with all its attributes."""
        end_ns = time.time_ns() if end_ns is None else end_ns
        self.detach()
        with _settling:  # ends once, whoever calls first (materialize() included)
            span, self.span = self.span, None
            unborn, self._unborn = self._unborn, None
        if span is None and unborn is None:
            return
        try:
            attrs = self.attributes
            config = get_config()
            every = sampling_every(config)
            if span is None and unborn is not None:
                tracer, name, kind, parent = unborn
                judge = None
                if every > 1:
                    duration_s = (end_ns - self.start_ns) / 1e9
                    rate = sampling_rate(attrs, self._error, duration_s, config, every)
                    attrs[semconv.DL_SAMPLING_RATE] = rate
                    judge = presampler() if rate > 1 and kind is SpanKind.INTERNAL else None
                    if judge is not None and not judge.admit(name, attrs, duration_s):
                        # Not sampled: the span its processor would drop is never made.
                        if self.labels is not None:
                            _duration_histogram().record(duration_s, self.labels)
                        return
                span = tracer.start_span(
                    name, parent, kind=kind, attributes=attrs, start_time=self.start_ns
                )
                if judge is not None:
                    judge.admitted(span)
                self.attributes = {}
            elif span is not None:
                if every > 1 and span.is_recording():
                    whole = {**(getattr(span, "attributes", None) or {}), **attrs}
                    duration_s = (end_ns - self.start_ns) / 1e9
                    attrs[semconv.DL_SAMPLING_RATE] = sampling_rate(
                        whole, self._error, duration_s, config, every
                    )
                if attrs:
                    span.set_attributes(attrs)
            if self.labels is not None and span is not None and span.is_recording():
                # In the span's own context: an exemplar then leads to this span, not to
                # whatever is current where the span ends (a burst runs for many calls).
                _duration_histogram().record(
                    (end_ns - self.start_ns) / 1e9,
                    self.labels,
                    context=trace.set_span_in_context(span),
                )
        except Exception:
            report_internal_error(self.site)
        finally:
            if span is not None:
                span.end(end_time=end_ns)
                self._ended = span


# Re-entrant: making a lazily started span runs the application's sampler and span
# processors, which may read the current span (the stand-in) again on this thread.
_settling = threading.RLock()


class _StandIn(Span):
    """The current span during a call whose span starts lazily (:meth:`DlSpan.start_lazily`).
    Attributes set on it join the call's; whatever needs the span itself (its context for
    a child or a propagator, an event, a status, a new name) makes it first."""

    __slots__ = ("_call",)

    def __init__(self, call: DlSpan) -> None:
        self._call = call

    def _span(self) -> Span:
        return self._call.materialize()

    def get_span_context(self) -> trace.SpanContext:
        return self._span().get_span_context()

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        call = self._call
        with _settling:
            if call.span is None and call._unborn is not None:
                call.attributes.update(attributes)
                return
        self._span().set_attributes(attributes)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.set_attributes({key: value})

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        self._span().add_event(name, attributes, timestamp)

    def add_link(self, context: trace.SpanContext, attributes: Any = None) -> None:
        self._span().add_link(context, attributes)

    def update_name(self, name: str) -> None:
        self._span().update_name(name)

    def is_recording(self) -> bool:
        call = self._call
        if call.span is None and call._unborn is not None:
            return True  # its attributes are kept for the span
        return self._span().is_recording()

    def set_status(self, status: Any, description: str | None = None) -> None:
        self._span().set_status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Any = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self._span().record_exception(exception, attributes, timestamp, escaped)

    def end(self, end_time: int | None = None) -> None:
        """Not the user's to end: the call ends its span."""


Extractor = Callable[[DlCall], Attributes | None]
ResultExtractor = Callable[[DlCall, Any], Attributes | None]
KeepOpen = Callable[["DlSpan", DlCall, Any, int], bool]


def traced_call(
    wrapped: Callable[..., Any],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    site: str,
    name: str,
    stage: str,
    component: str,
    before: Extractor | None = None,
    after: ResultExtractor | None = None,
    hooks: Hooks = NO_HOOKS,
    attributes: Mapping[str, AttributeValue] | None = None,
    keep_open: KeepOpen | None = None,
    tracer: Tracer | None = None,
) -> Any:
    """Call ``wrapped(*args, **kwargs)`` inside an otel-dl span; see the module docstring.

    ``before`` runs before the call and may return attributes; ``after`` runs on the
    result and may return attributes (the signals). Each runs under its own guard: a
    failure drops only its attributes, never the span or the call.
    ``keep_open(lifecycle, call, result, end_ns)`` returning True leaves the span open
    after a successful call, for work the result does later (a lazy job), which then
    ends it with the same :class:`DlSpan`.
    """
    if not instrumentation_enabled():
        return wrapped(*args, **kwargs)
    call = DlCall(component, instance, args, kwargs)
    lifecycle: DlSpan | None = None
    try:
        lifecycle = DlSpan(site, base_attributes(stage, component, attributes))
        if before is not None:
            lifecycle.extract("before", before, call)
            if lifecycle.labels is not None:
                lifecycle.labels = metric_labels(lifecycle.attributes)
        if hooks.request is None and hooks.response is None and keep_open is None:
            lifecycle.start_lazily(tracer, name)  # made when it ends, or when needed
        else:
            lifecycle.start(tracer, name)
        lifecycle.hook(hooks.request, call)
    except Exception:
        report_internal_error(site)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        if lifecycle is not None:
            try:
                end_ns = time.time_ns()
                lifecycle.detach()
                lifecycle.error(exc)
                lifecycle.finish(end_ns)
            except Exception:
                report_internal_error(site)
        raise
    if lifecycle is not None:
        try:
            _after_call(lifecycle, call, result, after, hooks, keep_open)
        except Exception:
            report_internal_error(site)
    return result


def _after_call(
    lifecycle: DlSpan,
    call: DlCall,
    result: Any,
    after: ResultExtractor | None,
    hooks: Hooks,
    keep_open: KeepOpen | None,
) -> None:
    end_ns = time.time_ns()
    lifecycle.detach()
    if after is not None:
        lifecycle.extract("after", after, call, result)
    lifecycle.hook(hooks.response, call, result)
    parked = (
        lifecycle.span is not None
        and keep_open is not None
        and keep_open(lifecycle, call, result, end_ns)
    )
    if not parked:
        lifecycle.end(end_ns)
