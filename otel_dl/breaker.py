"""A circuit breaker that contains a degraded model: calls go to a fallback while the
model's inputs or outputs trip a policy.

Opt-in and never on by default: nothing is guarded unless wrapped here::

    import otel_dl

    reference = otel_dl.Reference.fit(X_train)
    clf = otel_dl.guard(
        model,                                   # a torch module, any callable, or an estimator
        fallback=simple_model,                   # a simpler model; a function; None abstains
        when=otel_dl.GuardPolicy(max_nan_fraction=0.01, drift="alert", min_confidence=0.6),
        reference=reference,                     # schema, range and drift are measured against it
    )
    clf.predict_proba(X)                         # or clf(x) for a torch module

The wrapper forwards every other attribute to the model (``clf.classes_``, ``clf.eval()``)
and guards ``__call__``, ``predict``, ``predict_proba`` and ``decision_function``. The
signals are otel-dl's own: :class:`otel_dl.FeatureMonitor` reads the inputs
(``dl.quality.*``, ``dl.drift.*``) before each call, and reads the confidence of the outputs
after it when the policy needs them.

The breaker:

- ``closed``: calls go to the model. A call whose signals trip the policy (or, with
  ``errors=True``, whose model call raises) counts one trip; ``trips`` consecutive trips
  open the breaker. Input trips are known before the call, so the call that opens the
  breaker already goes to the fallback; output trips count for the calls after it.
- ``open``: calls go to the fallback. The inputs are still read, so drift scores keep
  following the live data.
- ``half_open``: after ``cooldown_s``, one call at a time is a probe: it goes to the
  model when its inputs pass. ``recover`` passing probes in a row close the breaker; a
  probe that trips reopens it for another ``cooldown_s``.

Every decision is written on the span: the model's ``inference`` span when the model is
instrumented (the attributes ride on ``otel_dl.attributes``, so the fallback's span gets
them too), and the span current at the call (a request's span, say):
``dl.guard.state``, ``dl.guard.action`` (``model``, ``fallback`` or ``probe``) and, on a
call that tripped the policy, ``dl.guard.reason``.

Cost: each guarded call reads its inputs with the guard's own monitor (bounded work:
one quality pass and a row sample into the drift window, as an instrumented span does),
and the outputs' confidence when the policy has a confidence rule. On a GPU that reading
waits for the input tensors; the guard needs the signals before it can decide.

The guard never raises anything but the user's own exceptions: those of the model and
the fallback come through unchanged. A failing signal or policy function is an internal
error (counted in ``otel_dl.internal_error_counts()``), and the call goes to the model.
With ``enabled=False`` (or ``guarded.enabled = False``) every call goes straight to the
model, with no signals read and nothing written.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry import trace

from otel_dl import semconv
from otel_dl._config import Config
from otel_dl._context import attributes
from otel_dl._guard import report_internal_error
from otel_dl.monitor import FeatureMonitor
from otel_dl.quality import unexplained
from otel_dl.reference import Reference

Signals = Mapping[str, Any]
PolicyFunction = Callable[[Signals], "str | bool | None"]

STATE_CLOSED: Final = semconv.GUARD_STATE_CLOSED
STATE_OPEN: Final = semconv.GUARD_STATE_OPEN
STATE_HALF_OPEN: Final = semconv.GUARD_STATE_HALF_OPEN
ACTION_MODEL: Final = semconv.GUARD_ACTION_MODEL
ACTION_FALLBACK: Final = semconv.GUARD_ACTION_FALLBACK
ACTION_PROBE: Final = semconv.GUARD_ACTION_PROBE

#: The model methods the guard wraps; every other attribute is forwarded unchanged.
GUARDED_METHODS: Final = ("predict", "predict_proba", "decision_function")
_DRIFT_LEVELS: Final = {semconv.DRIFT_STATUS_WARN: 1, semconv.DRIFT_STATUS_ALERT: 2}


@dataclass(frozen=True)
class GuardPolicy:
    """When the guarded model's signals trip the breaker; ``None`` turns a rule off.

    Each rule reads one otel-dl span signal of the call:

    - ``max_nan_fraction``: the NaN/Inf share above it, beyond what the reference
      explains (``dl.quality.nan_excess_fraction``; ``dl.quality.nan_fraction`` while
      there is no reference);
    - ``max_out_of_range_fraction``: the share of values outside the reference range
      above it, beyond what chance explains (``dl.quality.out_of_range_excess_fraction``);
    - ``schema_mismatch``: ``dl.quality.schema_mismatch`` is true;
    - ``drift``: ``dl.drift.status`` at ``"warn"`` or ``"alert"`` (or worse);
    - ``min_confidence``: ``dl.confidence.mean`` of the outputs below it;
    - ``max_low_confidence_fraction``: ``dl.confidence.low_fraction`` above it;
    - ``errors``: the model call raised.

    Range, schema and drift need a reference (given, or learned from the first calls).
    """

    max_nan_fraction: float | None = 0.01
    max_out_of_range_fraction: float | None = None
    schema_mismatch: bool = True
    drift: str | None = semconv.DRIFT_STATUS_ALERT
    min_confidence: float | None = None
    max_low_confidence_fraction: float | None = None
    errors: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_nan_fraction",
            "max_out_of_range_fraction",
            "min_confidence",
            "max_low_confidence_fraction",
        ):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
            ):
                raise ValueError(
                    f"GuardPolicy({name}={value!r}): a fraction between 0 and 1 is needed, "
                    "or None to turn the rule off"
                )
        if self.drift is not None and self.drift not in _DRIFT_LEVELS:
            raise ValueError(
                f"GuardPolicy(drift={self.drift!r}): use 'warn' or 'alert' (the dl.drift.status "
                "at which to trip), or None to ignore drift"
            )

    @property
    def reads_outputs(self) -> bool:
        """Whether a rule needs the outputs' confidence."""
        return self.min_confidence is not None or self.max_low_confidence_fraction is not None

    def __call__(self, signals: Signals) -> str | None:
        """The first rule ``signals`` break (its name, the ``dl.guard.reason``), else None."""
        nan = unexplained(signals, semconv.DL_QUALITY_NAN_EXCESS_FRACTION)
        if self.max_nan_fraction is not None and _above(nan, self.max_nan_fraction):
            return "nan_fraction"
        if self.schema_mismatch and signals.get(semconv.DL_QUALITY_SCHEMA_MISMATCH) is True:
            return "schema_mismatch"
        outside = unexplained(signals, semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION)
        if self.max_out_of_range_fraction is not None and _above(
            outside, self.max_out_of_range_fraction
        ):
            return "out_of_range"
        if self.drift is not None:
            level = _DRIFT_LEVELS.get(str(signals.get(semconv.DL_DRIFT_STATUS)), 0)
            if level >= _DRIFT_LEVELS[self.drift]:
                return "drift"
        mean = signals.get(semconv.DL_CONFIDENCE_MEAN)
        if self.min_confidence is not None and _below(mean, self.min_confidence):
            return "low_confidence"
        low = signals.get(semconv.DL_CONFIDENCE_LOW_FRACTION)
        if self.max_low_confidence_fraction is not None and _above(
            low, self.max_low_confidence_fraction
        ):
            return "low_confidence"
        return None


def _above(value: Any, limit: float) -> bool:
    return isinstance(value, int | float) and not math.isnan(value) and value > limit


def _below(value: Any, limit: float) -> bool:
    return isinstance(value, int | float) and not math.isnan(value) and value < limit


class _Failed:
    """The policy raised: the call cannot be judged."""


_FAILED: Final = _Failed()


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


class Guarded:
    """A model behind a circuit breaker; made by :func:`guard`.

    Call it like the model (``guarded(x)``, ``guarded.predict(X)``); every other attribute
    is the model's. ``state`` is the breaker's state, ``reset()`` closes it,
    ``enabled = False`` sends every call straight to the model, and ``monitor`` is the
    :class:`otel_dl.FeatureMonitor` that reads the inputs.
    """

    def __init__(
        self,
        model: Any,
        fallback: Any,
        policy: GuardPolicy | PolicyFunction,
        monitor: FeatureMonitor,
        trips: int,
        cooldown_s: float,
        recover: int,
        enabled: bool,
    ) -> None:
        self._model = model
        self._fallback = fallback
        self._policy = policy
        self._reads_outputs = not isinstance(policy, GuardPolicy) or policy.reads_outputs
        self._errors = policy.errors if isinstance(policy, GuardPolicy) else True
        self.monitor = monitor
        self._trips = trips
        self._cooldown_s = cooldown_s
        self._recover = recover
        self.enabled = enabled
        self._lock = threading.Lock()
        self._state = STATE_CLOSED
        self._consecutive = 0
        self._passed_probes = 0
        self._opened_at = 0.0
        self._probing = False

    # --- what the user sees -------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The guarded model."""
        return self._model

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (open turns half-open once cooled down)."""
        with self._lock:
            self._cool_down(time.monotonic())
            return self._state

    def reset(self) -> None:
        """Close the breaker and forget the trips counted so far."""
        with self._lock:
            self._state, self._consecutive, self._passed_probes = STATE_CLOSED, 0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded_call("__call__", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks: everything but the guarded calls is
        # the model's own attribute.
        if name.startswith("__") or name in ("_model", "_fallback"):
            raise AttributeError(name)
        value = getattr(self._model, name)
        if name in GUARDED_METHODS and callable(value):

            def method(*args: Any, **kwargs: Any) -> Any:
                return self._guarded_call(name, args, kwargs)

            method.__name__ = name
            method.__doc__ = getattr(value, "__doc__", None)
            return method
        return value

    def __repr__(self) -> str:
        return f"Guarded({self._model!r}, state={self._state!r})"

    # --- the breaker --------------------------------------------------------------------

    def _cool_down(self, now: float) -> None:
        if self._state == STATE_OPEN and now - self._opened_at >= self._cooldown_s:
            self._state, self._passed_probes = STATE_HALF_OPEN, 0

    def _open(self, now: float) -> None:
        self._state, self._opened_at, self._consecutive = STATE_OPEN, now, 0

    def _decide(self, reason: str | None) -> tuple[str, str]:
        """The state and action for a call whose inputs gave ``reason`` (None: passed)."""
        with self._lock:
            now = time.monotonic()
            self._cool_down(now)
            if self._state == STATE_CLOSED:
                if reason is None:
                    return STATE_CLOSED, ACTION_MODEL
                self._consecutive += 1
                if self._consecutive < self._trips:
                    return STATE_CLOSED, ACTION_MODEL
                self._open(now)
                return STATE_OPEN, ACTION_FALLBACK
            if self._state == STATE_HALF_OPEN and not self._probing:
                if reason is not None:
                    self._open(now)
                    return STATE_OPEN, ACTION_FALLBACK
                self._probing = True
                return STATE_HALF_OPEN, ACTION_PROBE
            return self._state, ACTION_FALLBACK

    def _settle(self, action: str, tripped: bool | None) -> None:
        """Count a finished model call (``tripped``: its outputs or error broke the policy;
        None: nothing to count, the call was interrupted or its inputs' trip is counted)."""
        with self._lock:
            if action == ACTION_PROBE:
                self._probing = False
                if tripped is None:
                    return
                if tripped:
                    self._open(time.monotonic())
                    return
                self._passed_probes += 1
                if self._passed_probes >= self._recover and self._state == STATE_HALF_OPEN:
                    self._state, self._consecutive = STATE_CLOSED, 0
            elif self._state == STATE_CLOSED and tripped is not None:
                if not tripped:
                    self._consecutive = 0
                    return
                self._consecutive += 1
                if self._consecutive >= self._trips:
                    self._open(time.monotonic())

    # --- one call -----------------------------------------------------------------------

    def _signals(
        self, part: str, read: Callable[[Any], Signals], value: Any
    ) -> dict[str, Any] | None:
        """``read(value)`` as a dict; None when it failed (an internal error, counted)."""
        try:
            return dict(read(value))
        except Exception:
            report_internal_error(f"guard.{part}")
            return None

    def _check(self, signals: Signals) -> str | _Failed | None:
        """The policy's reason to trip, None, or _FAILED when the policy itself raised."""
        try:
            verdict = self._policy(signals)
        except Exception:
            report_internal_error("guard.policy")
            return _FAILED
        if verdict is None or verdict is False:
            return None
        return verdict if isinstance(verdict, str) and verdict else "policy"

    def _guarded_call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        model_call = self._model if method == "__call__" else getattr(self._model, method)
        if not self.enabled:
            return model_call(*args, **kwargs)
        x = _first_input(args, kwargs)
        # Its own observation, never another monitor's cached profile of the same array:
        # the decision must rest on this monitor's reference and window.
        signals = self._signals("inputs", self.monitor.observe, x) if x is not None else {}
        checked = self._check(signals) if signals else None
        if signals is None or isinstance(checked, _Failed):
            # The guard cannot judge this call: the model answers, and nothing is counted.
            _record({semconv.DL_GUARD_STATE: self.state, semconv.DL_GUARD_ACTION: ACTION_MODEL})
            return model_call(*args, **kwargs)
        reason = checked
        state, action = self._decide(reason)
        decision: dict[str, Any] = {
            semconv.DL_GUARD_STATE: state,
            semconv.DL_GUARD_ACTION: action,
        }
        if reason is not None:
            decision[semconv.DL_GUARD_REASON] = reason
        _record(decision)
        if action == ACTION_FALLBACK:
            with attributes(**decision):
                return self._fallback_call(method, args, kwargs)
        if reason is not None:
            # The inputs' trip is counted already (by _decide): the call only runs.
            try:
                with attributes(**decision):
                    return model_call(*args, **kwargs)
            finally:
                self._settle(action, None)
        try:
            with attributes(**decision):
                result = model_call(*args, **kwargs)
        except Exception:
            if self._errors:
                _record({semconv.DL_GUARD_REASON: "error"})
            self._settle(action, self._errors)
            raise
        except BaseException:  # an interrupt says nothing about the model
            self._settle(action, None)
            raise
        tripped = False
        if self._reads_outputs:
            out = self._signals("outputs", self.monitor.confidence, result)
            late = self._check({**signals, **out}) if out else None
            if isinstance(late, str):
                tripped = True
                _record({semconv.DL_GUARD_REASON: late})
        self._settle(action, tripped)
        return result

    def _fallback_call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fallback = self._fallback
        if fallback is None:
            return None
        if method != "__call__" and hasattr(fallback, method):
            return getattr(fallback, method)(*args, **kwargs)
        return fallback(*args, **kwargs)


def _record(decision: Mapping[str, Any]) -> None:
    """Write the decision on the span current at the call; never raises."""
    try:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(decision)
    except Exception:
        report_internal_error("guard.span")


def guard(
    model: Any,
    *,
    fallback: Any,
    when: GuardPolicy | PolicyFunction | None = None,
    reference: Reference | None = None,
    trips: int = 3,
    cooldown_s: float = 30.0,
    recover: int = 1,
    enabled: bool = True,
    config: Config | None = None,
    name: str | None = None,
) -> Guarded:
    """Put ``model`` behind a circuit breaker that sends calls to ``fallback`` while its
    signals trip ``when``; see the module docstring.

    ``fallback`` answers instead of the model: a simpler model (an estimator with the same
    methods, or any callable taking the model's arguments), a function returning a cached
    answer, or ``None`` to abstain (the call returns None). ``when`` is a
    :class:`GuardPolicy` (the default one when None) or a function of the call's signals
    (the ``dl.*`` attributes of the inputs, and after the call of the outputs) returning
    the reason to trip (a string or True) or None. ``reference`` is the profile that
    schema, range and drift are measured against (learned from the first calls when
    None). ``trips`` consecutive trips open the breaker, ``cooldown_s`` later a probe goes
    to the model, and ``recover`` passing probes close it. ``config`` and ``name`` are
    those of the :class:`otel_dl.FeatureMonitor` that reads the inputs.
    """
    if when is None:
        when = GuardPolicy()
    elif not callable(when):
        raise TypeError(
            f"otel_dl.guard(when={when!r}): pass a GuardPolicy or a function of the signals "
            "returning the reason to trip (or None)"
        )
    if (
        fallback is not None
        and not callable(fallback)
        and not any(hasattr(fallback, m) for m in GUARDED_METHODS)
    ):
        raise TypeError(
            f"otel_dl.guard(fallback={fallback!r}): the fallback must be a model, a callable "
            "taking the model's arguments, or None to abstain; for a fixed answer pass "
            "`lambda *args, **kwargs: answer`"
        )
    for label, count in (("trips", trips), ("recover", recover)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"otel_dl.guard({label}={count!r}): a whole number >= 1 is needed")
    if not isinstance(cooldown_s, int | float) or isinstance(cooldown_s, bool) or cooldown_s < 0:
        raise ValueError(f"otel_dl.guard(cooldown_s={cooldown_s!r}): seconds >= 0 are needed")
    if reference is not None and not isinstance(reference, Reference):
        raise TypeError(
            f"otel_dl.guard(reference=...) got a {type(reference).__name__}; pass an "
            "otel_dl.Reference, e.g. otel_dl.Reference.fit(X_train)"
        )
    monitor = FeatureMonitor(reference, config=config, name=name)
    return Guarded(model, fallback, when, monitor, trips, float(cooldown_s), recover, enabled)
