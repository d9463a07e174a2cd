"""scikit-learn instrumentation: one span per outermost ``predict`` or ``transform`` call.

``otel_dl.instrument()`` enables it when scikit-learn is installed; by hand::

    from otel_dl.instrumentors.sklearn import SklearnInstrumentor
    SklearnInstrumentor().instrument()

Every ``predict``, ``predict_proba``, ``predict_log_proba``, ``decision_function`` and
``score_samples`` call on an estimator becomes an ``inference`` span
(``dl.stage=inference``, ``dl.component=sklearn``), and every ``transform`` call one with
``dl.stage=preprocess``. Only the outermost call makes a span: a Pipeline calling its
steps, a forest calling its trees or ``predict`` calling ``predict_proba`` all make one
span, also when the inner calls run on joblib threads (``n_jobs``). Calls made inside
``fit``, ``fit_transform`` and ``fit_predict`` (training) and ``score`` (evaluation
against known labels) make none. A bound method (``model.predict``) pickles as it would
uninstrumented, for joblib's process backends and ``multiprocessing``.

Which estimators: every class derived from ``sklearn.base.BaseEstimator`` that has one
of those methods, whether defined before or after instrumentation (scikit-learn's own,
Pipeline, and third-party or user estimators that follow the scikit-learn API). Each
method is wrapped once, on the class that defines it (often a mixin such as
``LinearClassifierMixin``), so no list of classes is kept,
and ``otel_dl.watch(estimator, name=..., version=..., reference=...)`` works on any of
them. Nothing is imported up front: the wrapping happens when ``sklearn.base`` is first
imported, so an application that never uses scikit-learn pays nothing.

The span carries the model name (the ``watch`` name, else the class name), version,
``dl.model.framework`` (``sklearn``; ``xgboost``, ``lightgbm`` or ``catboost`` for
their estimators), the estimator's class (``dl.model.class``), the method
(``dl.model.method``), a Pipeline's step classes (``dl.model.steps``), the fingerprint
of the fitted estimator (of its content, without runtime settings such as ``n_jobs``,
and of an XGBoost or LightGBM estimator its booster's trees: computed once per
estimator object, and again after its own ``fit``, ``fit_transform``, ``fit_predict``,
``partial_fit`` or ``load_model``; a step refitted on its own, outside its Pipeline,
leaves the Pipeline's fingerprint as it was), ``dl.batch.size``, the drift, quality
and fingerprint of ``X`` (the columns given by ``watch(estimator, features=[...])``: a
DataFrame's column names, or positions; input without them, and sparse input, gives no
data signals), and ``dl.prediction.count`` (not for ``transform``: its output is features, not
predictions). ``predict_proba`` adds the confidence of the probabilities,
``predict_log_proba`` the same from the log-probabilities, and ``decision_function``
the confidence of its scores read as logits, only where they are log-odds: for an
estimator that also gives probabilities (logistic regression, gradient boosting), not
a margin (LinearSVC, RidgeClassifier, a perceptron) nor an outlier detector's anomaly
score (IsolationForest), which would read as low confidence on healthy calls. A
``predict_proba`` asked for no class scores (LightGBM's ``pred_contrib``, SHAP values,
or ``pred_leaf``, leaf indices) gets no confidence.

XGBoost's and LightGBM's native boosters, which serving code often calls without a
scikit-learn estimator (``xgboost.Booster.predict``/``inplace_predict``,
``lightgbm.Booster.predict``), make ``inference`` spans too (``dl.component`` and
``dl.model.framework`` ``xgboost`` or ``lightgbm``, model name ``Booster`` unless
watched), fingerprinted by their trees (a booster loaded from its file has the trained
one's), the batch size, the input's
signals (not of an XGBoost ``DMatrix``: its rows only), the prediction count, and the
confidence where the booster's objective makes its output class scores: probabilities
of ``binary:logistic``/``multi:softprob`` (``binary``/``multiclass``), margins read as
logits when asked for (``output_margin``, ``predict_type="margin"``, ``raw_score``)
and of ``binary:logitraw``; none for regression, ranking, one-vs-all or label
objectives, SHAP values or leaf indices. A booster called inside an estimator's traced
call, or while training (``training=True``), makes no span; ``load_model``, ``update``
(and LightGBM's ``model_from_string``) change a booster in place, so it is
fingerprinted anew.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar, Final

import numpy as np
import wrapt

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import report_internal_error
from otel_dl._span import Attributes, DlCall, traced_call
from otel_dl._watch import ensure_state
from otel_dl.monitor import Later, combine, confidence_attributes
from otel_dl.provenance import forget_model, model_fingerprint

from ._base import DlInstrumentor, Patches

_METHODS: Final = (
    "predict",
    "predict_proba",
    "predict_log_proba",
    "decision_function",
    "score_samples",
    "transform",
)
# Predictions made while fitting (a boosting model's initial estimator, say) or scoring
# (``score(X, y)``, which predicts to compare with y) are not inference: those methods run
# as calls that make no span and hide the calls inside.
_QUIET_METHODS: Final = ("fit", "fit_transform", "fit_predict", "partial_fit", "score")
# Methods that change a fitted estimator's content in place: its fingerprint is computed
# anew at its next call (XGBoost's ``load_model`` loads into the same object).
_REFIT_METHODS: Final = ("fit", "fit_transform", "fit_predict", "partial_fit", "load_model")
# Keyword arguments under which predict_proba returns no class scores: LightGBM's
# per-feature contributions (SHAP values) and leaf indices, XGBoost's (on predict).
_NOT_SCORES: Final = ("pred_contrib", "pred_leaf", "pred_contribs", "pred_interactions")
# Native boosters: the prediction methods traced, and the in-place changes that make a
# booster's fingerprint and objective be read anew.
_BOOSTERS: Final = {
    "xgboost.core": (
        ("Booster.predict", "Booster.inplace_predict"),
        ("Booster.load_model", "Booster.update"),
    ),
    "lightgbm.basic": (("Booster.predict",), ("Booster.model_from_string", "Booster.update")),
}
# Objectives whose predictions are class probabilities (margins when asked), or margins.
_PROBABILITY_OBJECTIVES: Final = frozenset(
    {"binary:logistic", "multi:softprob", "binary", "multiclass", "softmax"}
)
_MARGIN_OBJECTIVES: Final = frozenset({"binary:logitraw", "multi:softmax"})
# Per booster: its objective's name, read once (None when it cannot be read).
_OBJECTIVES: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
# Libraries whose estimators follow the scikit-learn API: their name is the framework.
_FRAMEWORKS: Final = frozenset({"xgboost", "lightgbm", "catboost"})
# Log-probabilities read as logits give back the probabilities.
_CONFIDENCE_METHODS: Final = ("predict_proba", "predict_log_proba", "decision_function")
# Per estimator (a Pipeline is one when its last step is): whether it is an outlier
# detector, whose decision_function is an anomaly score, not a class score. Remembered:
# scikit-learn builds its tags anew on every ask.
_OUTLIER_DETECTORS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
# Their output is features for a later step, not predictions.
_PREPROCESS_METHODS: Final = ("transform",)
_FRAMEWORK = "sklearn"
_BASE_MODULE = "sklearn.base"
_PARALLEL_MODULE = "sklearn.utils.parallel"
_NESTED_ATTR = "_otel_dl_nested"

# True while an instrumented call runs: calls made inside it make no span.
_in_call: ContextVar[bool] = ContextVar("otel_dl_sklearn_in_call", default=False)
_ABSENT: Final = object()


class _BoundMethod(wrapt.BoundFunctionWrapper):  # type: ignore[misc]
    """A wrapped method bound to an estimator. It pickles as the method it wraps would:
    ``getattr(estimator, name)`` (joblib's process backends and ``Pool.map`` pickle
    ``model.predict``; a wrapt proxy refuses to be pickled)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        instance = self._self_instance
        if instance is None:
            return super().__reduce_ex__(protocol)
        return getattr, (instance, self.__name__)


class _MethodWrapper(wrapt.FunctionWrapper):  # type: ignore[misc]
    """Marks a method this instrumentor wrapped, so a class is never wrapped twice."""

    __bound_function_wrapper__ = _BoundMethod


def _wrappable(attr: Any) -> bool:
    # Plain functions and scikit-learn's ``available_if`` descriptors; not properties.
    if isinstance(attr, _MethodWrapper | property | classmethod | staticmethod):
        return False
    return isinstance(attr, types.FunctionType) or hasattr(attr, "__get__")


def _subclasses(root: type) -> list[type]:
    found: dict[type, None] = {}
    pending = [root]
    while pending:
        sub: type
        for sub in pending.pop().__subclasses__():
            if sub not in found:
                found[sub] = None
                pending.append(sub)
    return list(found)


def _input(call: DlCall) -> Any:
    return call.args[0] if call.args else call.kwargs.get("X")


def _positions(features: Sequence[Any], width: int) -> list[int] | None:
    """``features`` as column positions, or None when they are not all positions in range."""
    if all(
        isinstance(f, int) and not isinstance(f, bool) and -width <= f < width for f in features
    ):
        return list(features)
    return None


def _select(X: Any, features: Sequence[Any] | None) -> Any:
    """The watched feature columns of ``X``: names of a DataFrame's columns, or positions;
    None when ``X`` has no such columns (the span then has no input signals)."""
    if features is None:
        return X
    if hasattr(X, "columns"):
        if all(f in X.columns for f in features):
            return X[list(features)]
        positions = _positions(features, len(X.columns))
        return None if positions is None else X.iloc[:, positions]
    if getattr(X, "ndim", 0) == 2:
        positions = _positions(features, X.shape[1])
        return None if positions is None else X[:, positions]
    return X


def _is_sparse(X: Any) -> bool:
    return hasattr(X, "nnz") and hasattr(X, "toarray")


class SklearnInstrumentor(DlInstrumentor):
    """Traces scikit-learn estimators' predictions; see the module docstring."""

    # Class-level: BaseInstrumentor is a singleton whose __init__ runs on every call.
    _enabled = False
    _import_hooks_registered = False
    _lock = threading.RLock()
    _wrapped: ClassVar[list[tuple[type, str, Any]]] = []
    _original_init_subclass: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("scikit-learn >= 1.3",)

    # -- patching -----------------------------------------------------------------------
    def patches(self) -> Patches:
        # A forest's trees predict on joblib threads, where the caller's context is not
        # set: mark the tasks that scikit-learn's Parallel dispatches from inside a traced
        # call, so they run as nested calls and make no spans of their own.
        patches: dict[str, dict[str, Callable[..., Any]]] = {
            _PARALLEL_MODULE: {"Parallel.__call__": _mark_tasks, "_FuncWrapper.__call__": _run_task}
        }
        for module, (methods, changes) in _BOOSTERS.items():
            library = module.partition(".")[0]
            patches[module] = {path: self._booster_wrapper(library, path) for path in methods}
            patches[module].update({path: _booster_changed for path in changes})
        return patches

    def on_instrument(self, **kwargs: Any) -> None:
        # Estimator classes are wrapped where their methods are defined, as they are
        # created: not a patch of one module's attributes.
        cls = type(self)
        cls._enabled = True
        if not cls._import_hooks_registered:
            cls._import_hooks_registered = True
            # Called at once for a module already imported, else when it is imported.
            wrapt.register_post_import_hook(self._on_base_import, _BASE_MODULE)
        elif _BASE_MODULE in sys.modules:
            self._on_base_import(sys.modules[_BASE_MODULE])

    def on_uninstrument(self) -> None:
        cls = type(self)
        with cls._lock:
            cls._enabled = False
            for owner, name, original in cls._wrapped:
                if isinstance(owner.__dict__.get(name), _MethodWrapper):
                    setattr(owner, name, original)
            cls._wrapped.clear()
            base = sys.modules.get(_BASE_MODULE)
            if base is not None and cls._original_init_subclass is not None:
                estimator = base.BaseEstimator
                if cls._original_init_subclass is _ABSENT:
                    del estimator.__init_subclass__
                else:
                    estimator.__init_subclass__ = cls._original_init_subclass
                cls._original_init_subclass = None

    def _on_base_import(self, module: Any) -> None:
        cls = type(self)
        with cls._lock:
            if not cls._enabled or cls._original_init_subclass is not None:
                return
            estimator = module.BaseEstimator
            original = estimator.__dict__.get("__init_subclass__", _ABSENT)
            cls._original_init_subclass = original
            wrap_class = self.wrap_class

            # Estimator classes defined from now on (by modules imported later) are
            # wrapped as they are created; the ones that exist already, right below.
            def __init_subclass__(klass: Any, **kwargs: Any) -> None:
                if original is _ABSENT:
                    super(estimator, klass).__init_subclass__(**kwargs)
                else:
                    original.__get__(None, klass)(**kwargs)
                try:
                    wrap_class(klass)
                except Exception:
                    report_internal_error("sklearn.wrap_class")

            estimator.__init_subclass__ = classmethod(__init_subclass__)
        for klass in (estimator, *_subclasses(estimator)):
            self.wrap_class(klass)

    def wrap_class(self, klass: type) -> None:
        """Wrap the prediction methods of ``klass`` where they are defined (idempotent).

        That is often a mixin (``LinearClassifierMixin.predict``), shared by many
        estimators, so each method is wrapped once, on its defining class.
        """
        cls = type(self)
        with cls._lock:
            if not cls._enabled:
                return
            for name in dict.fromkeys((*_METHODS, *_QUIET_METHODS, *_REFIT_METHODS)):
                owner = next((c for c in klass.__mro__ if name in c.__dict__), None)
                if owner is None or not _wrappable(owner.__dict__[name]):
                    continue
                attr = owner.__dict__[name]
                if name in _REFIT_METHODS:
                    wrapper = _refit
                elif name in _QUIET_METHODS:
                    wrapper = _quiet
                else:
                    wrapper = self._wrapper(name)
                setattr(owner, name, _MethodWrapper(attr, wrapper))
                cls._wrapped.append((owner, name, attr))

    # -- calls --------------------------------------------------------------------------
    def _wrapper(self, method: str) -> Callable[..., Any]:
        cls = type(self)
        site = f"sklearn.{method}"
        stage = (
            semconv.STAGE_PREPROCESS if method in _PREPROCESS_METHODS else semconv.STAGE_INFERENCE
        )

        def before(call: DlCall) -> Attributes:
            return self._model_attributes(call.instance, method)

        def after(call: DlCall, result: Any) -> Attributes:
            return self._signals(call, method, result)

        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            # Disabled: a class made after instrumentation may keep this wrapper inside
            # another one (scikit-learn's set_output wraps ``transform`` when a class is
            # created), out of reach of uninstrument.
            if _in_call.get() or not cls._enabled:
                return wrapped(*args, **kwargs)
            return self._outermost(
                wrapped,
                instance,
                args,
                kwargs,
                site,
                stage,
                semconv.COMPONENT_SKLEARN,
                before,
                after,
            )

        return wrapper

    def _outermost(
        self,
        wrapped: Any,
        instance: Any,
        args: Any,
        kwargs: Any,
        site: str,
        stage: str,
        component: str,
        before: Callable[[DlCall], Attributes],
        after: Callable[[DlCall, Any], Attributes],
    ) -> Any:
        """The outermost call's span: the calls made inside it make none (``_in_call``)."""
        token = _in_call.set(True)
        try:
            return traced_call(
                wrapped,
                instance,
                args,
                kwargs,
                site=site,
                name=semconv.SPAN_INFERENCE,
                stage=stage,
                component=component,
                before=before,
                after=after,
                hooks=self._hooks,
                tracer=self._tracer,
            )
        finally:
            _in_call.reset(token)

    @staticmethod
    def _model_attributes(estimator: Any, method: str) -> Attributes:
        state = ensure_state(estimator)
        klass = type(estimator)
        attrs: Attributes = state.provenance()
        attrs[semconv.DL_MODEL_NAME] = state.name or klass.__name__
        if state.version is not None:
            attrs[semconv.DL_MODEL_VERSION] = state.version
        library = klass.__module__.partition(".")[0]
        attrs[semconv.DL_MODEL_FRAMEWORK] = library if library in _FRAMEWORKS else _FRAMEWORK
        attrs[semconv.DL_MODEL_CLASS] = f"{klass.__module__}.{klass.__qualname__}"
        attrs[semconv.DL_MODEL_METHOD] = method
        steps = getattr(estimator, "steps", None)
        if isinstance(steps, list):
            attrs[semconv.DL_MODEL_STEPS] = [type(step).__name__ for _, step in steps]
        fingerprint = model_fingerprint(estimator)
        if fingerprint is not None:
            attrs[semconv.DL_MODEL_FINGERPRINT] = fingerprint
        return attrs

    @staticmethod
    def _signals(call: DlCall, method: str, result: Any) -> Attributes:
        attrs: Attributes = {}
        config = get_config()
        shape = getattr(result, "shape", None)
        if shape and method not in _PREPROCESS_METHODS:
            attrs[semconv.DL_PREDICTION_COUNT] = int(shape[0])
        elif isinstance(result, list) and result and method not in _PREPROCESS_METHODS:
            # A multi-output model's predict_proba: one (rows, classes) array per output.
            rows = getattr(result[0], "shape", None)
            if rows:
                attrs[semconv.DL_PREDICTION_COUNT] = int(rows[0])
        later = config.signals_delay_ms > 0
        if (
            config.signals
            and method in _CONFIDENCE_METHODS
            and shape
            and len(shape) <= 2
            and (method != "decision_function" or _log_odds(call.instance))
            and not any(call.kwargs.get(name) for name in _NOT_SCORES)
            and ensure_state(call.instance).confidence
        ):
            if later:  # every prediction, as below, but in a burst
                monitor = ensure_state(call.instance).monitor()
                attrs = combine(attrs, monitor.confidence_later(result, sample=False))
            else:
                attrs.update(confidence_attributes(result, config.confidence_threshold))
        X = _input(call)
        return attrs if X is None else _input_signals(call.instance, X, attrs)

    # -- native boosters ------------------------------------------------------------------
    def _booster_wrapper(self, library: str, path: str) -> Callable[..., Any]:
        cls = type(self)
        method = path.rpartition(".")[2]
        site = f"{library}.{method}"
        component = (
            semconv.COMPONENT_XGBOOST if library == "xgboost" else semconv.COMPONENT_LIGHTGBM
        )

        def before(call: DlCall) -> Attributes:
            return self._model_attributes(call.instance, method)

        def after(call: DlCall, result: Any) -> Attributes:
            attrs: Attributes = {}
            shape = getattr(result, "shape", None)
            if shape:
                attrs[semconv.DL_PREDICTION_COUNT] = int(shape[0])
            config = get_config()
            if config.signals and shape and len(shape) <= 2:
                kind = _booster_kind(call.instance, library, method, call.kwargs)
                state = ensure_state(call.instance)
                if kind is not None and state.confidence:
                    scores, kind = _class_scores(result, kind)
                    if config.signals_delay_ms > 0:  # every prediction, in a burst
                        monitor = state.monitor()
                        later = monitor.confidence_later(scores, sample=False, kind=kind)
                        attrs = combine(attrs, later)
                    else:
                        threshold = config.confidence_threshold
                        attrs.update(confidence_attributes(scores, threshold, kind=kind))
            data = call.args[0] if call.args else call.kwargs.get("data")
            if data is None or isinstance(data, str | bytes) or hasattr(data, "num_row"):
                # A file, or a DMatrix: its rows only (its values are not read back).
                rows = getattr(data, "num_row", None)
                if callable(rows):
                    attrs[semconv.DL_BATCH_SIZE] = int(rows())
                return attrs
            return _input_signals(call.instance, data, attrs)

        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            # Inside an estimator's call (it made the span) or a training step: no span.
            if _in_call.get() or not cls._enabled or kwargs.get("training"):
                return wrapped(*args, **kwargs)
            stage = semconv.STAGE_INFERENCE
            return self._outermost(
                wrapped, instance, args, kwargs, site, stage, component, before, after
            )

        return wrapper


def _input_signals(model: Any, X: Any, attrs: Attributes) -> Attributes:
    """``attrs`` with the batch size of ``X`` and the drift, quality and fingerprint of
    its watched features (left for a burst where the model's source parks them); sparse
    ``X`` gives its batch size only."""
    rows = getattr(X, "shape", None)
    if rows:
        attrs[semconv.DL_BATCH_SIZE] = int(rows[0])
    config = get_config()
    if _is_sparse(X) or not config.signals:
        return attrs
    try:
        state = ensure_state(model)
        selected = _select(X, state.features)
        if selected is not None:
            source = state.monitor()
            inputs = source.burst_inputs(selected) if config.signals_delay_ms > 0 else None
            if inputs is None:
                attrs.update(source.observe(selected))
            else:
                attrs = combine(attrs, Later(source, inputs=inputs))
    except Exception:
        # The span still goes out, with the output's signals.
        report_internal_error("sklearn.input_signals")
    return attrs


def _booster_kind(booster: Any, library: str, method: str, kwargs: Any) -> str | None:
    """How a native booster's predictions read as class scores (``probabilities`` or
    ``logits``), or None when they are none: by its objective and what the call asks."""
    if any(kwargs.get(name) for name in _NOT_SCORES):
        return None
    if library == "lightgbm":
        margin = bool(kwargs.get("raw_score"))
    elif method == "inplace_predict":
        margin = kwargs.get("predict_type", "value") == "margin"
    else:
        margin = bool(kwargs.get("output_margin"))
    objective = _objective(booster, library)
    if objective in _PROBABILITY_OBJECTIVES:
        return "logits" if margin else "probabilities"
    if objective in _MARGIN_OBJECTIVES and (margin or objective == "binary:logitraw"):
        return "logits"
    return None


def _class_scores(result: Any, kind: str) -> tuple[Any, str]:
    """A booster's predictions as rows of class scores, and how they read: a binary
    objective's one column (the positive class's probability, or its margin) as the
    distribution ``[1 - p, p]``, which every confidence path reads as probabilities."""
    if getattr(result, "ndim", 2) != 1:
        return result, kind
    positive = np.asarray(result, dtype=np.float64)
    if kind == "logits":
        with np.errstate(over="ignore"):  # a margin under -709: exp is inf, p is 0
            positive = 1.0 / (1.0 + np.exp(-positive))
    return np.column_stack((1.0 - positive, positive)), "probabilities"


def _objective(booster: Any, library: str) -> str | None:
    """The name of a booster's objective (``binary:logistic``, ``multiclass``), read
    once per booster: XGBoost's from its configuration, LightGBM's from its parameters
    or, for a model loaded from a file, its model text's header."""
    try:
        return _OBJECTIVES[booster]
    except (KeyError, TypeError):
        pass
    name: Any = None
    try:
        if library == "xgboost":
            import json

            name = json.loads(booster.save_config())["learner"]["objective"]["name"]
        else:
            name = (getattr(booster, "params", None) or {}).get("objective")
            if name is None:
                for line in str(booster.model_to_string(num_iteration=0)).splitlines()[:40]:
                    if line.startswith("objective="):
                        name = line.partition("=")[2].split()[0]
                        break
    except Exception:
        report_internal_error("sklearn.booster_objective")
    objective = name if isinstance(name, str) else None  # a callable: a custom objective
    with contextlib.suppress(TypeError):
        _OBJECTIVES[booster] = objective
    return objective


def _booster_changed(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """A booster changed in place (loaded into, trained further): its fingerprint and
    objective are read anew at its next traced call."""
    try:
        return wrapped(*args, **kwargs)
    finally:
        if instance is not None:
            try:
                forget_model(instance)
                _OBJECTIVES.pop(instance, None)
            except Exception:
                report_internal_error("sklearn.booster_changed")


def _log_odds(estimator: Any) -> bool:
    """Whether ``estimator``'s decision_function is a log-odds, whose softmax is its
    probabilities: an estimator that also gives probabilities (logistic regression,
    gradient boosting), and is no outlier detector. A margin (an SVM, ridge, a perceptron)
    or an anomaly score is no probability: read as logits it would report low
    confidence on healthy calls."""
    return hasattr(estimator, "predict_proba") and not _outlier_detector(estimator)


def _outlier_detector(estimator: Any) -> bool:
    try:
        known = _OUTLIER_DETECTORS.get(estimator)
    except TypeError:  # not weakly referable or hashable: asked each time
        known = None
    if known is None:
        from sklearn.base import is_outlier_detector

        known = bool(is_outlier_detector(estimator))
        with contextlib.suppress(TypeError):
            _OUTLIER_DETECTORS[estimator] = known
    return known


def _quiet(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    token = _in_call.set(True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _in_call.reset(token)


def _refit(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """A quiet call that changes the estimator's content: its fingerprint is computed
    anew at its next traced call."""
    try:
        return _quiet(wrapped, instance, args, kwargs)
    finally:
        if instance is not None:
            try:
                forget_model(instance)
            except Exception:
                report_internal_error("sklearn.refit")


def _marked(tasks: Iterable[Any]) -> Iterator[Any]:
    for task in tasks:
        try:
            setattr(task[0], _NESTED_ATTR, True)
        except Exception:
            report_internal_error("sklearn.parallel")
        yield task


def _mark_tasks(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if not _in_call.get() or len(args) != 1 or kwargs:
        return wrapped(*args, **kwargs)
    return wrapped(_marked(args[0]))


def _run_task(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if not getattr(instance, _NESTED_ATTR, False):
        return wrapped(*args, **kwargs)
    token = _in_call.set(True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _in_call.reset(token)
