"""Signal-aware sampling: keep every abnormal otel-dl span, and 1 in N of the normal ones.

Head sampling drops anomalies as readily as normal spans, and tail sampling in a
collector pays for every span first. otel-dl knows a span's signals when it ends, so it
decides there:

- **abnormal** otel-dl spans are always kept: drift ``warn``/``alert``, any NaN/Inf
  value, more than 5% of values outside the reference range, a schema mismatch, stale
  features, mean confidence under ``confidence_threshold``, an error status, or a
  duration above ``sample_latency`` (when set);
- also kept: the first span of a model whose fingerprint changed, and a span far slower
  or with far staler features than its name usually has (judged across spans by the
  processor, against a baseline learned from normal spans);
- **normal** otel-dl spans are kept 1 in ``sample_every``, chosen by span id (by a
  random draw for a span judged before it is made, see below), so the choice is uniform
  and needs no shared state;
- every kept otel-dl span carries ``dl.sampling.rate``: 1 for an abnormal span, N for a
  normal one, so counts can be re-weighted (sum the rates);
- spans that are not otel-dl's (the application's own, HTTP and gRPC spans) are never
  dropped.

Parent/child integrity: a span whose child was kept is kept too (the child's end marks
its parent, and parents end after their children), and CLIENT/SERVER/PRODUCER/CONSUMER
spans, which another service continues or which continue another service, are never
dropped. So no kept span loses its parent, with one limit: a child that ends after its
parent cannot keep that parent alive.

The otel-dl collector's duration histogram counts a kept span ``dl.sampling.rate`` times,
so it still counts every call; with ``duration_metric`` on, the process also records
each span's duration before this decision.
``instrument(sample_every=10)`` installs it in the provider otel-dl creates; an
application with its own TracerProvider wraps its export processor::

    provider.add_span_processor(
        SignalAwareSpanProcessor(BatchSpanProcessor(exporter), 10, presample=True)
    )

Spans that are made only when they end (a parked DataLoader batch, a model call whose
span started lazily; see ``otel_dl._span``) are judged *before* they are made, when the
processor was created with ``presample=True`` (``instrument()`` does so): a normal one
that is not sampled is never made, which saves the SDK's cost of a span its processor
would drop. The judgement is the one the processor makes at the end (the same signals,
fingerprint and outlier rules, learned from the same normal spans); only the 1-in-N draw
is a random one instead of the span id, with the same rate. With ``duration_metric`` on,
its duration is still recorded. The processor must be on the provider otel-dl's spans go to.
"""

from __future__ import annotations

import logging
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

from otel_dl import semconv
from otel_dl._config import Config, get_config
from otel_dl.drift import DEFAULT_THRESHOLDS, drift_status
from otel_dl.quality import unexplained

# A few values past the reference's min/max are normal for any sample (about 2/n of
# them for a reference of n rows); the collector's catalog flags data quality at 5%.
OUT_OF_RANGE_ABNORMAL = 0.05
_REMOTE_KINDS = (SpanKind.CLIENT, SpanKind.SERVER, SpanKind.PRODUCER, SpanKind.CONSUMER)
_MAX_MARKED_PARENTS = 100_000
_MAX_BASELINES = 10_000
BASELINE_WARMUP = 30
OUTLIER_SIGMAS = 4.0
OUTLIER_RATIO = 1.5


def is_abnormal(
    attrs: Mapping[str, AttributeValue],
    error: bool,
    duration_s: float,
    config: Config | None = None,
) -> bool:
    """Whether a span with these signals must be kept whatever the sampling rate."""
    config = config or get_config()
    if error:
        return True
    status = attrs.get(semconv.DL_DRIFT_STATUS)
    score = attrs.get(semconv.DL_DRIFT_SCORE)
    if status is None and isinstance(score, float):
        # A span made by other code may carry a score alone: judge it by the defaults.
        method = attrs.get(semconv.DL_DRIFT_METHOD)
        if not isinstance(method, str) or method not in DEFAULT_THRESHOLDS:
            method = config.drift_method
        status = drift_status(score, method, config.drift_warn, config.drift_alert)
    if status in (semconv.DRIFT_STATUS_WARN, semconv.DRIFT_STATUS_ALERT):
        return True
    nan_share = unexplained(attrs, semconv.DL_QUALITY_NAN_EXCESS_FRACTION)
    if isinstance(nan_share, float) and nan_share > 0.0:
        return True
    outside = unexplained(attrs, semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION)
    if isinstance(outside, float) and outside > OUT_OF_RANGE_ABNORMAL:
        return True
    if attrs.get(semconv.DL_QUALITY_SCHEMA_MISMATCH) is True:
        return True
    if attrs.get(semconv.DL_FEATURE_STALE) is True:
        return True
    confidence = attrs.get(semconv.DL_CONFIDENCE_MEAN)
    if isinstance(confidence, float) and confidence < config.confidence_threshold:
        return True
    return config.sample_latency is not None and duration_s > config.sample_latency


def sampling_rate(
    attrs: Mapping[str, AttributeValue],
    error: bool,
    duration_s: float,
    config: Config,
    every: int | None = None,
) -> int:
    """The ``dl.sampling.rate`` of an otel-dl span: 1 when abnormal, else ``every`` (the
    sampling processor's N, see :func:`sampling_every`; by default ``sample_every``)."""
    if is_abnormal(attrs, error, duration_s, config):
        return 1
    return config.sample_every if every is None else every


_presampler: SignalAwareSpanProcessor | None = None
# The processors created and not shut down, oldest first, and the one whose N applies to
# otel-dl's spans (None: none does). Without one nothing drops a span, so no span may
# carry a dl.sampling.rate above 1: downstream, each would count N times.
_live: list[weakref.ref[SignalAwareSpanProcessor]] = []
_chosen: weakref.ref[SignalAwareSpanProcessor] | None = None
_warned_unsampled = False
logger = logging.getLogger("otel_dl")


def _refresh_chosen() -> None:
    global _chosen
    _live[:] = [ref for ref in _live if ref() is not None]
    latest = _live[-1] if _live else None
    _chosen = weakref.ref(_presampler) if _presampler is not None else latest


def sampling_every(config: Config) -> int:
    """The N that sampling applies to otel-dl's spans: that of the
    :class:`SignalAwareSpanProcessor` created with ``presample=True`` (else of the latest
    one created), not shut down, whatever ``sample_every`` says; 1 when there is none.
    Then every span is kept and none carries ``dl.sampling.rate``; if ``sample_every``
    asks for sampling, a warning names the fix, once: with the application's own tracer
    provider (or under ``opentelemetry-instrument``), its export processor must be
    wrapped."""
    global _warned_unsampled
    chosen = _chosen() if _chosen is not None else None
    if chosen is None and _chosen is not None:  # collected without a shutdown
        _refresh_chosen()
        chosen = _chosen() if _chosen is not None else None
    every = chosen.sample_every if chosen is not None else 1
    if every == 1 and config.sample_every > 1 and not _warned_unsampled:
        _warned_unsampled = True
        logger.warning(
            "otel-dl: sample_every=%d is set, but no SignalAwareSpanProcessor is on the "
            "tracer provider, so every span is kept and none carries dl.sampling.rate. "
            "otel_dl.instrument() installs one only in the provider it creates; with your "
            "own provider, wrap its export processor: provider.add_span_processor("
            "SignalAwareSpanProcessor(BatchSpanProcessor(exporter), %d, presample=True)) "
            "(from otel_dl.sampling).",
            config.sample_every,
            config.sample_every,
        )
    return every


def presampler() -> SignalAwareSpanProcessor | None:
    """The processor created with ``presample=True`` that judges otel-dl's spans before
    they are made, if any."""
    return _presampler


class _Baseline:
    """Running mean and variance of one span name's value (Welford), from normal spans only."""

    __slots__ = ("m2", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def is_outlier(self, value: float) -> bool:
        if self.n < BASELINE_WARMUP:
            return False
        std = (self.m2 / (self.n - 1)) ** 0.5
        return value > self.mean + OUTLIER_SIGMAS * std and value > OUTLIER_RATIO * self.mean

    def learn(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)


class SignalAwareSpanProcessor(SpanProcessor):
    """Forwards every span to ``inner`` except the normal otel-dl spans not sampled.

    Besides the span's own signals (``dl.sampling.rate``, set when the span ended), it
    keeps anomalies only visible across spans: a model whose fingerprint differs from the
    previous span of the same ``dl.model.name``, and a duration or a
    ``dl.feature.freshness`` far above what that span name usually has (more than 4
    standard deviations and 1.5 times the mean of its normal spans, after 30 of them).
    See the module docstring.
    """

    def __init__(self, inner: SpanProcessor, sample_every: int, *, presample: bool = False) -> None:
        """``presample``: judge otel-dl's spans that are made only when they end before
        they are made, so a dropped one costs no span (see the module docstring); the
        latest processor created so is the one they ask, until its shutdown."""
        global _presampler
        if sample_every < 1:
            raise ValueError(f"sample_every must be at least 1, got {sample_every}")
        self.inner = inner
        self.sample_every = sample_every
        self._lock = threading.Lock()
        self._kept_children: OrderedDict[int, None] = OrderedDict()
        # Span ids admitted by admit(): kept at the end without being judged again.
        self._admitted: OrderedDict[int, None] = OrderedDict()
        self._fingerprints: dict[AttributeValue, AttributeValue] = {}
        self._baselines: dict[tuple[str, str], _Baseline] = {}
        self.kept = 0
        self.dropped = 0
        if presample and sample_every > 1:
            _presampler = self
        _live.append(weakref.ref(self))
        _refresh_chosen()

    def admit(self, name: str, attrs: Mapping[str, AttributeValue], duration_s: float) -> bool:
        """Whether a normal otel-dl span (``dl.sampling.rate`` above 1, INTERNAL, no
        error, no child), not made yet, is to be kept: what :meth:`on_end` would decide,
        with a random 1-in-N draw. Call :meth:`admitted` with the span once it is made."""
        with self._lock:
            if self._unusual(name, attrs, duration_s, normal=True):
                return True
            if random.random() * self.sample_every < 1:
                return True
            self.dropped += 1
            return False

    def admitted(self, span: trace_api.Span) -> None:
        """Keep ``span``, which :meth:`admit` admitted, when it ends."""
        with self._lock:
            self._admitted[span.get_span_context().span_id] = None
            if len(self._admitted) > _MAX_MARKED_PARENTS:
                self._admitted.popitem(last=False)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self._keep(span):
            parent = span.parent
            if parent is not None and not parent.is_remote:
                with self._lock:
                    self._kept_children[parent.span_id] = None
                    if len(self._kept_children) > _MAX_MARKED_PARENTS:
                        self._kept_children.popitem(last=False)
            self.inner.on_end(span)

    def _keep(self, span: ReadableSpan) -> bool:
        attrs = span.attributes or {}
        context = span.get_span_context()
        if semconv.DL_STAGE not in attrs or context is None:
            return True
        if self._admitted and context.span_id in self._admitted:
            with self._lock:
                self._admitted.pop(context.span_id, None)
                self.kept += 1
            return True
        error = span.status.status_code is StatusCode.ERROR
        duration_s = ((span.end_time or 0) - (span.start_time or 0)) / 1e9
        rate = attrs.get(semconv.DL_SAMPLING_RATE)
        if rate is None:  # a dl.* span made by other code: judge its signals here
            rate = 1 if is_abnormal(attrs, error, duration_s) else self.sample_every
        with self._lock:
            has_kept_child = context.span_id in self._kept_children
            if has_kept_child:
                del self._kept_children[context.span_id]
            unusual = self._unusual(span.name, attrs, duration_s, normal=rate != 1)
        if (
            rate == 1
            or unusual
            or has_kept_child
            or span.kind in _REMOTE_KINDS
            or error
            or context.span_id % self.sample_every == 0
        ):
            self.kept += 1
            return True
        self.dropped += 1
        return False

    def _unusual(
        self, name: str, attrs: Mapping[str, AttributeValue], duration_s: float, normal: bool
    ) -> bool:
        """The anomalies only visible across spans: a changed model fingerprint, a duration
        or freshness far above the span name's usual. A ``normal`` span (by its own
        signals) teaches the usual unless its model changed. The caller holds the lock."""
        changed = self._model_changed(attrs)
        learn = normal and not changed
        slow = self._outlier((name, "duration"), duration_s, learn)
        freshness = attrs.get(semconv.DL_FEATURE_FRESHNESS)
        stale = isinstance(freshness, float) and self._outlier(
            (name, "freshness"), freshness, learn
        )
        return changed or slow or stale

    def _model_changed(self, attrs: Mapping[str, AttributeValue]) -> bool:
        name = attrs.get(semconv.DL_MODEL_NAME)
        fingerprint = attrs.get(semconv.DL_MODEL_FINGERPRINT)
        if name is None or fingerprint is None:
            return False
        previous = self._fingerprints.get(name)
        self._fingerprints[name] = fingerprint
        return previous is not None and previous != fingerprint

    def _outlier(self, key: tuple[str, str], value: float, learn: bool) -> bool:
        stats = self._baselines.get(key)
        if stats is None:
            if len(self._baselines) >= _MAX_BASELINES:
                return False
            stats = self._baselines[key] = _Baseline()
        outlier = stats.is_outlier(value)
        if learn and not outlier:
            stats.learn(value)
        return outlier

    def shutdown(self) -> None:
        global _presampler
        if _presampler is self:
            _presampler = None
        _live[:] = [ref for ref in _live if ref() is not self]
        _refresh_chosen()
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)
