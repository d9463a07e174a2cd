"""ONNX Runtime instrumentation: one span per ``InferenceSession.run``.

``otel_dl.instrument()`` enables it when onnxruntime is installed; by hand::

    from otel_dl.instrumentors.onnxruntime import OnnxRuntimeInstrumentor
    OnnxRuntimeInstrumentor().instrument()

Every ``InferenceSession.run`` (and ``run_with_ort_values``, ``run_with_iobinding``) call
becomes an ``inference`` span (``dl.stage=inference``, ``dl.component=onnxruntime``)
nested under the current span. It carries:

- ``dl.model.framework=onnxruntime``, the model file (``dl.model.path``) and its
  fingerprint (``dl.model.fingerprint``, of the file, or of the bytes for a session made
  from bytes; computed once per session), the model name (the ``watch`` name, else the
  file's stem, else the graph name) and version (the ``watch`` version, else the model's
  metadata version), and the session's execution providers
  (``dl.model.execution_providers``);
- the drift, quality and data fingerprint of the input: the model's first declared
  input, or the inputs named by ``otel_dl.watch(session, features=["pixels", ...])``;
- the confidence of the output when one output looks like class scores (a ZipMap list of
  ``{class: probability}`` dicts, else the last 2-D floating-point output whose rows are
  probabilities, else the last 2-D floating-point output read as logits, unless its name
  says it is an embedding, a hidden state or a regression: ``embed``, ``hidden``,
  ``pooler``, ``feature`` or ``encoding`` in it, or sklearn-onnx's regressor output
  ``variable``), and ``dl.prediction.count``.
  A ``run_with_iobinding`` span has the outputs' signals only: bound inputs cannot be
  read back.

Attach a reference and provenance to one session with
``otel_dl.watch(session, name="fraud", version="7", reference=ref)``. OrtValue inputs and
outputs are read only when they live in CPU memory; device tensors give no signals.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import report_internal_error
from otel_dl._span import Attributes, DlCall, traced_call
from otel_dl._watch import WatchState, ensure_state
from otel_dl.confidence import looks_like_probabilities
from otel_dl.monitor import combine, observe_once
from otel_dl.provenance import model_fingerprint

from ._base import DlInstrumentor, Patches

_MODULE = "onnxruntime.capi.onnxruntime_inference_collection"
_FRAMEWORK = "onnxruntime"
_SITE = "onnxruntime.run"


@dataclass(frozen=True)
class _SessionInfo:
    """What never changes for a session, read once."""

    path: str | None
    fingerprint: str | None
    name: str | None
    version: str | None
    first_input: str | None
    outputs: tuple[str, ...] = ()  # the declared outputs' names, in run()'s order


_info_lock = threading.Lock()
_infos: weakref.WeakKeyDictionary[Any, _SessionInfo] = weakref.WeakKeyDictionary()


def _read_info(session: Any) -> _SessionInfo:
    path = getattr(session, "_model_path", None)
    path = path if isinstance(path, str) and path else None
    if path is not None:
        fingerprint = model_fingerprint(path)
    else:
        model_bytes = getattr(session, "_model_bytes", None)
        fingerprint = model_fingerprint(model_bytes) if model_bytes else None
    graph_name: str | None = None
    version: str | None = None
    try:
        meta = session.get_modelmeta()
        graph_name = meta.graph_name or None
        version = str(meta.version) if meta.version else None
    except Exception:
        report_internal_error(f"{_SITE}.metadata")
    stem = os.path.splitext(os.path.basename(path))[0] if path is not None else None
    inputs = session.get_inputs()
    return _SessionInfo(
        path=path,
        fingerprint=fingerprint,
        name=stem or graph_name,
        version=version,
        first_input=inputs[0].name if inputs else None,
        outputs=tuple(o.name for o in session.get_outputs()),
    )


def _session_info(session: Any) -> _SessionInfo:
    info = _infos.get(session)
    if info is None:
        # Fingerprinting reads the model file: do it once per session, not per call.
        with _info_lock:
            info = _infos.get(session)
            if info is None:
                info = _read_info(session)
                _infos[session] = info
    return info


def _to_numpy(value: Any) -> Any:
    """A numpy view of an input or output, or None for device OrtValues and other types."""
    if hasattr(value, "device_name") and hasattr(value, "numpy"):  # OrtValue
        if value.device_name().lower() != "cpu" or not value.is_tensor():
            return None
        return value.numpy()
    return value


def _select_inputs(
    feed: Mapping[str, Any], features: Sequence[str] | None, first: str | None
) -> Any:
    names = list(features) if features is not None else [first] if first is not None else []
    picked = {name: _to_numpy(feed[name]) for name in names if name in feed}
    picked = {name: value for name, value in picked.items() if value is not None}
    if not picked:
        return None
    return next(iter(picked.values())) if len(picked) == 1 else picked


# Output names that say what an output is not: class scores. An embedding or a hidden
# state (transformers' exports), sklearn-onnx's regressor output ("variable").
_NOT_SCORES = ("embed", "hidden", "pooler", "feature", "encoding")
_REGRESSION_OUTPUTS = frozenset({"variable"})


def _not_scores(name: str | None) -> bool:
    if name is None:
        return False
    lowered = name.lower()
    return lowered in _REGRESSION_OUTPUTS or any(part in lowered for part in _NOT_SCORES)


def _class_scores(outputs: Sequence[Any], names: Sequence[str] | None = None) -> Any:
    """The output that holds class scores, or None: a ZipMap list of dicts, else the last
    2-D floating-point output whose rows are probabilities, else the last 2-D
    floating-point one read as logits, unless its name (``names``, in the outputs'
    order) says it is an embedding, a hidden state or a regression (sklearn-onnx puts
    the probabilities last; a network may also return hidden features, which are no
    distribution: read as logits, an encoder's output gave a healthy model low
    confidence on every call)."""
    named = names is not None and len(names) == len(outputs)
    found: list[tuple[int, Any]] = []  # (position, value), from the last output back
    for i in range(len(outputs) - 1, -1, -1):
        value = outputs[i]
        if isinstance(value, list) and value and isinstance(value[0], Mapping):
            found.append((i, value))  # ZipMap: one {class: probability} dict per row
            continue
        array = _to_numpy(value)
        dtype = getattr(array, "dtype", None)
        if getattr(array, "ndim", 0) == 2 and dtype is not None and dtype.kind == "f":
            found.append((i, array))
    if len(found) == 1 and not isinstance(found[0][1], list):
        # One 2-D floating-point output (the usual classifier, beside sklearn-onnx's
        # labels): it is the scores unless its name says otherwise and it holds no
        # probabilities. Only then is its probability check worth its cost on the call.
        i, array = found[0]
        excluded = named and _not_scores(names[i])  # type: ignore[index]
        if not excluded or (array.size and looks_like_probabilities(array)):
            return array
        return None
    candidates = []
    for i, value in found:
        if isinstance(value, list):
            return value
        if value.size and looks_like_probabilities(value):
            return value
        if not (named and _not_scores(names[i])):  # type: ignore[index]
            candidates.append(value)
    return candidates[0] if candidates else None


def _row_count(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape:
        return int(shape[0])
    return len(value) if isinstance(value, list) else None


class OnnxRuntimeInstrumentor(DlInstrumentor):
    """Traces ONNX Runtime ``InferenceSession`` runs; see the module docstring."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("onnxruntime >= 1.17",)

    def patches(self) -> Patches:
        return {
            _MODULE: {
                "Session.run": self._wrap_run,
                "Session.run_with_ort_values": self._wrap_run,
                "Session.run_with_iobinding": self._wrap_run_with_iobinding,
            }
        }

    def _wrap_run(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return self._traced(wrapped, instance, args, kwargs, _SITE, self._signals)

    def _wrap_run_with_iobinding(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        # Bound inputs cannot be read back from Python: such a span has the outputs'
        # signals only.
        site = f"{_SITE}_with_iobinding"
        return self._traced(wrapped, instance, args, kwargs, site, self._bound_signals)

    def _traced(
        self, wrapped: Any, instance: Any, args: Any, kwargs: Any, site: str, after: Any
    ) -> Any:
        return traced_call(
            wrapped,
            instance,
            args,
            kwargs,
            site=site,
            name=semconv.SPAN_INFERENCE,
            stage=semconv.STAGE_INFERENCE,
            component=semconv.COMPONENT_ONNXRUNTIME,
            before=self._model_attributes,
            after=after,
            hooks=self._hooks,
            tracer=self._tracer,
        )

    @staticmethod
    def _model_attributes(call: DlCall) -> Attributes:
        """The attributes every span of the session shares, built once per watch state."""
        state = ensure_state(call.instance)
        if state.static is None:
            state.static = OnnxRuntimeInstrumentor._read_model_attributes(call.instance, state)
        return state.static

    @staticmethod
    def _read_model_attributes(session: Any, state: WatchState) -> Attributes:
        info = _session_info(session)
        attrs: Attributes = state.provenance()
        attrs[semconv.DL_MODEL_FRAMEWORK] = _FRAMEWORK
        name = state.name or info.name
        if name is not None:
            attrs[semconv.DL_MODEL_NAME] = name
        version = state.version or info.version
        if version is not None:
            attrs[semconv.DL_MODEL_VERSION] = version
        if info.path is not None:
            attrs[semconv.DL_MODEL_PATH] = info.path
        if info.fingerprint is not None:
            attrs[semconv.DL_MODEL_FINGERPRINT] = info.fingerprint
        attrs[semconv.DL_MODEL_EXECUTION_PROVIDERS] = list(session.get_providers())
        return attrs

    @staticmethod
    def _bound_signals(call: DlCall, _result: Any) -> Attributes:
        binding = call.args[0] if call.args else call.kwargs.get("iobinding")
        outputs = binding.get_outputs() if binding is not None else None
        return OnnxRuntimeInstrumentor._output_signals(call.instance, outputs)

    @staticmethod
    def _output_signals(
        session: Any, outputs: Any, names: Sequence[str] | None = None
    ) -> Attributes:
        attrs: Attributes = {}
        if isinstance(outputs, Sequence) and outputs:
            config = get_config()
            scores = (
                _class_scores(outputs, names)
                if config.signals and ensure_state(session).confidence
                else None
            )
            if scores is not None:
                monitor = ensure_state(session).monitor()
                if config.signals_delay_ms > 0:
                    return monitor.confidence_later(scores)
                return dict(monitor.confidence(scores))
            else:
                rows = _row_count(_to_numpy(outputs[0]))
                if rows is not None:
                    attrs[semconv.DL_PREDICTION_COUNT] = rows
        return attrs

    @staticmethod
    def _signals(call: DlCall, outputs: Any) -> Attributes:
        attrs: Attributes = {}
        config = get_config()
        session = call.instance
        feed = (
            call.args[1]
            if len(call.args) > 1
            else call.kwargs.get("input_feed", call.kwargs.get("input_dict_ort_values"))
        )
        if isinstance(feed, Mapping):
            try:
                state = ensure_state(session)
                features = _select_inputs(feed, state.features, _session_info(session).first_input)
                first = next(iter(features.values())) if isinstance(features, dict) else features
                rows = _row_count(first)
                if rows is not None:
                    attrs[semconv.DL_BATCH_SIZE] = rows
                if features is not None and config.signals:
                    later = config.signals_delay_ms > 0
                    attrs = combine(attrs, observe_once(state.monitor(), features, later=later))
            except Exception:
                # The span still goes out, with the output's signals.
                report_internal_error(f"{_SITE}.input_signals")
        # run(output_names, feed): the outputs asked for, else every declared one in order.
        asked = call.args[0] if call.args else call.kwargs.get("output_names")
        try:
            names = list(asked) if asked else _session_info(session).outputs
        except Exception:
            names = None
        signals = OnnxRuntimeInstrumentor._output_signals(session, outputs, names)
        return combine(attrs, signals)
