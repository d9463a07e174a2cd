"""PyTorch model instrumentation: one span per model call, and spans for model loading.

``otel_dl.instrument()`` enables it when torch is installed. Which models are traced:

- a model passed to ``otel_dl.watch(model, name=..., version=..., reference=...)``;
- a model user code puts in inference mode: the module on which ``eval()`` (or
  ``train(False)``) is called, not its submodules, nor a submodule of a model user code
  put in training mode (BatchNorm layers frozen while fine-tuning run inside that
  model's training forward); on a ``torch.compile``, ``DistributedDataParallel`` or
  ``DataParallel`` wrapper, the model it wraps (its name, version, weights and
  baseline, the same as in a process that runs it unwrapped);
- a model returned by ``torch.load`` or ``torch.jit.load``, and a ``torch.jit.script``
  or ``torch.jit.trace`` module that is watched or put in inference mode;
- with ``trace_training`` on, also a model user code puts in training mode.

Such a model makes one ``inference`` span per call (``dl.stage=inference``,
``dl.component=torch.nn``), never one per submodule: the model's own instance gets a
forward pre-hook and an always-called forward hook, so its submodules run with no
otel-dl code at all. A call made inside another traced model's call makes no span of its
own. Forwards in training mode are not traced unless ``trace_training`` is on.

The span carries the model's name (the ``watch`` name, else its class), version,
framework (``torch``), fingerprint of its weights (computed once, and again after
``load_state_dict`` and after ``eval()`` ends a spell in training mode: fine-tuning
changed them), the file it was loaded from, the drift and quality of the first tensor
argument against the model's reference (or a learned baseline), the confidence of the
output when it is a 2-D floating tensor of class scores (the output, its ``logits``, or
the first tensor of a tuple or list output), and ``dl.prediction.count``. A 1-D
floating-point input is one example without a batch dimension, as torch's layers read
it (its 1-D output is one prediction), unless a DataLoader made it or the model's
reference has a single feature (see ``_unbatched``).

It works under ``torch.no_grad`` and ``torch.inference_mode``, and with
``torch.compile(model)`` and ``model.compile()``, ``fullgraph=True`` included: while
dynamo traces a model, its hooks return at once (``torch.compiler.is_compiling()``), so
nothing of otel-dl is in the compiled graph and there is no graph break; the model's
span is made around the compiled call, eagerly, by hooks on the ``torch.compile``
wrapper, or, for ``model.compile()``, around the compiled call it installs. A traced
model called inside a compiled function (``torch.compile(fn)``) is part of that
function's graph, and makes no span of its own.

CUDA: nothing synchronises the GPU. When the output is on a GPU, the output's confidence
and a CUDA input's NaN/Inf share and drift row sample are reduced on the device, copied
to pinned memory without blocking, and a CUDA event is recorded after them; otel-dl's
poller thread ends the span when that event has completed (see ``otel_dl._gpu``), so the
span covers the GPU's execution, not only the kernel launches. With ``signals`` off a
GPU call's span ends when the call returns.

Cost: the attributes every span of a model shares (name, version, framework, file,
weights fingerprint, provenance) are built once per model and reused; a batch that the
DataLoader span already profiled is not profiled again (``otel_dl.monitor.observe_once``).

``torch.load``, ``torch.jit.load`` and ``Module.load_state_dict`` make a ``model.load``
span (``dl.stage=model_load``) with the file path and its fingerprint where there is a
file. Pickling a traced model (``torch.save(model)``) leaves the otel-dl hooks out.
``copy.deepcopy`` of a traced model is a traced model: the copy keeps what ``watch``
recorded (name, version, reference, confidence setting; a learned baseline too) and
has its own drift window and weights fingerprint (see ``otel_dl._watch.copy_watch``).
"""

from __future__ import annotations

import copy
import copyreg
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from otel_dl import _gpu as gpu
from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import instrumentation_enabled, report_internal_error
from otel_dl._span import (
    Attributes,
    DlCall,
    DlSpan,
    base_attributes,
    traced_call,
)
from otel_dl._watch import (
    WatchState,
    add_watch_listener,
    copy_watch,
    ensure_state,
    remove_watch_listener,
    watch_state,
)
from otel_dl.monitor import FeatureMonitor, observe_once, profiled_elsewhere
from otel_dl.provenance import file_fingerprint, forget_model, model_fingerprint

from ._base import DlInstrumentor, Patches

_SITE = "torch.forward"


@dataclass(slots=True)
class _Frame:
    module: Any
    call: DlSpan | None  # None: a call that makes no span (training mode, nested)


_frames: ContextVar[tuple[_Frame, ...]] = ContextVar("otel_dl_torch_frames", default=())
_train_depth = threading.local()


@dataclass
class _Traced:
    pre: Any
    post: Any
    path: str | None = None
    fingerprint: str | None = None


_MODULE_MODULE: Final = "torch.nn.modules.module"


class _DeepCopy:
    """``Module.__deepcopy__`` while otel-dl is instrumented (torch defines none): the
    copy ``copy.deepcopy`` would make without it, then ``copied(module, copy)``, which
    traces the copy of a traced model. Only otel-dl's part is guarded: the copy itself,
    and any error it raises, are what ``copy.deepcopy`` gives without otel-dl."""

    def __init__(self, copied: Callable[[Any, Any], None]) -> None:
        self.copied = copied

    def __get__(self, module: Any, owner: type | None = None) -> Any:
        if module is None:
            return self
        return lambda memo: self.deepcopy(module, memo)

    def deepcopy(self, module: Any, memo: dict[int, Any]) -> Any:
        reductor = copyreg.dispatch_table.get(type(module))
        reduced = reductor(module) if reductor is not None else module.__reduce_ex__(4)
        result = copy._reconstruct(module, memo, *reduced)  # type: ignore[attr-defined]
        try:
            self.copied(module, result)
        except Exception:
            report_internal_error("torch.deepcopy")
        return result


def _add_deepcopy(module_class: type, copied: Callable[[Any, Any], None]) -> None:
    if "__deepcopy__" not in vars(module_class):  # a torch that defines one: left alone
        module_class.__deepcopy__ = _DeepCopy(copied)  # type: ignore[attr-defined]


def _remove_deepcopy(module_class: type) -> None:
    if isinstance(vars(module_class).get("__deepcopy__"), _DeepCopy):
        del module_class.__deepcopy__  # type: ignore[attr-defined]


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    import torch

    tensor = torch.Tensor
    for value in args:
        if isinstance(value, tensor):
            return value
    for value in kwargs.values():
        if isinstance(value, tensor):
            return value
    return None


def _on_gpu(output: Any) -> bool:
    return bool(getattr(output, "is_cuda", False))


def _scores(output: Any) -> Any:
    """The tensor whose confidence a call's span carries: the output, the ``logits`` of a
    structured output (a transformers ``ModelOutput``, a dict, a dataclass, a
    namedtuple), or the first tensor of one or more dimensions in a tuple or list output
    (``(logits, hidden)``, ``(loss, logits)``, an LSTM's ``(output, (h, c))``); else
    None."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if logits is None:
        logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list):
        logits = next((o for o in output if isinstance(o, torch.Tensor) and o.dim()), None)
    return logits if isinstance(logits, torch.Tensor) else None


def _unbatched(monitor: FeatureMonitor, features: Any) -> bool:
    """Whether a floating-point input is one example without a batch dimension: a 1-D
    tensor, as torch's layers read one (``nn.Linear`` takes ``(in,)`` and returns
    ``(out,)``), unless it is a batch a DataLoader made (a dataset of scalars) or the
    model's reference has a single feature (then it holds one value per example)."""
    if features.dim() != 1:
        return False
    reference = monitor.reference
    if reference is not None and len(reference.names) == 1:
        return False
    return not profiled_elsewhere(features, monitor)


def _input_signals(
    module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Mapping[str, Any]:
    """Drift, quality and fingerprint of the first tensor argument when it holds floats
    (a CPU one: a CUDA input is read on the device when the call has completed; a small
    one's are left for a burst), an unbatched one read as one row; of token ids or
    masks, the batch size only."""
    features = _first_tensor(args, kwargs)
    if features is None:
        return {}
    if not features.is_floating_point():
        return {semconv.DL_BATCH_SIZE: int(features.shape[0])} if features.dim() else {}
    if features.is_cuda:
        return {}
    monitor = ensure_state(module).monitor()
    if _unbatched(monitor, features):
        features = features.unsqueeze(0)
    return observe_once(monitor, features, later=get_config().signals_delay_ms > 0)


def _one_row(module: Any, args: tuple[Any, ...], kwargs: Any, scores: Any) -> Any:
    """``scores`` as a batch of one row when the call was unbatched (a 1-D output of a
    1-D input, see :func:`_unbatched`), else as they are."""
    if scores.dim() != 1:
        return scores
    features = _first_tensor(args, kwargs)
    if features is None or not features.is_floating_point():
        return scores
    if not _unbatched(ensure_state(module).monitor(), features):
        return scores
    return scores.unsqueeze(0)


def _output_signals(module: Any, output: Any) -> Mapping[str, Any]:
    """Confidence of a 2-D floating-point output (left for a burst), else the prediction
    count."""
    import torch

    if not isinstance(output, torch.Tensor):
        return {}
    state = ensure_state(module)
    if output.dim() == 2 and output.is_floating_point() and state.confidence:
        monitor = state.monitor()
        if get_config().signals_delay_ms > 0:
            return monitor.confidence_later(output)
        return monitor.confidence(output)
    if output.dim() >= 1:
        return {semconv.DL_PREDICTION_COUNT: int(output.shape[0])}
    return {}


def _call_signals(call: DlCall) -> Attributes:
    return _input_signals(call.instance, call.args, call.kwargs)  # type: ignore[return-value]


def _finish_on_gpu(
    call: DlSpan, module: Any, args: tuple[Any, ...], kwargs: Any, output: Any
) -> None:
    features = _first_tensor(args, kwargs)
    state = ensure_state(module)
    monitor = state.monitor()
    if features is not None and features.is_floating_point() and _unbatched(monitor, features):
        features = features.unsqueeze(0)
    config = get_config()
    gpu.finish_when_done(
        call,
        output,
        config.confidence_threshold if state.confidence else None,
        inputs=features if features is not None and features.is_cuda else None,
        observe=monitor.observe,
        sample_rows=config.drift_max_rows,
    )


# Wrappers that run one model (the attribute that holds it): a span is about that model.
_WRAPPERS: Final = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DistributedDataParallel": "module",
    "DataParallel": "module",
}


def _unwrapped(module: Any) -> Any:
    """The model a ``torch.compile``, ``DistributedDataParallel`` or ``DataParallel``
    wrapper runs (its name, version, weights and baseline are what the spans are about:
    the wrapper's state_dict prefixes every key with ``module.``), else ``module``."""
    klass = type(module)
    attribute = _WRAPPERS.get(klass.__name__)
    if attribute is None or not klass.__module__.startswith("torch."):
        return module
    inner = getattr(module, attribute, None)
    return module if inner is None else _unwrapped(inner)


class _TracedCompiledCall:
    """What ``model.compile()`` put in place of the model's call, with the model's span
    made around it, eagerly, as its hooks would outside a compiled region."""

    def __init__(self, instrumentor: TorchModelInstrumentor, model: Any, compiled: Any) -> None:
        self._instrumentor = instrumentor
        self._model = weakref.ref(model)  # the model holds this: no cycle through it
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self._model()
        instrumentor = self._instrumentor
        if model is None or model not in instrumentor._traced:
            return self.compiled(*args, **kwargs)
        instrumentor._pre_hook(model, args, kwargs)
        try:
            output = self.compiled(*args, **kwargs)
        except BaseException:
            instrumentor._post_hook(model, args, kwargs, None)  # ends it with the error
            raise
        instrumentor._post_hook(model, args, kwargs, output)
        return output


def _not_compiling() -> bool:
    return False


#: ``torch.compiler.is_compiling`` once torch is imported. The hooks ask it first: while
#: dynamo traces a compiled model, they then return at once, a call dynamo traces through
#: (no graph break, nothing of otel-dl in the graph); the span comes from outside the
#: compiled region (:meth:`TorchModelInstrumentor._wrap_optimized_init`).
_compiling: Callable[[], bool] = _not_compiling


def _capturing() -> bool:
    """True while torch.jit.trace or torch.export records the model's graph.

    The hooks must then do nothing: a trace records what runs, and otel-dl is not part
    of the model.
    """
    tracing, exporting = _capture_checks or _load_capture_checks()
    return bool(tracing() or exporting())


_capture_checks: tuple[Callable[[], bool], Callable[[], bool]] | None = None


def _load_capture_checks() -> tuple[Callable[[], bool], Callable[[], bool]]:
    """torch's two checks, looked up once: both hooks ask on every call."""
    global _capture_checks
    import torch

    _capture_checks = (torch._C._is_tracing, torch.compiler.is_exporting)
    return _capture_checks


class TorchModelInstrumentor(DlInstrumentor):
    """Traces calls of PyTorch models; see the module docstring."""

    # Class-level: BaseInstrumentor is a singleton whose __init__ runs on every call.
    _traced: ClassVar[weakref.WeakKeyDictionary[Any, _Traced]] = weakref.WeakKeyDictionary()
    # Submodules of the models put in training mode by user code, until those are put in
    # inference mode: eval() on one of them (BatchNorm frozen while fine-tuning) does not
    # make it a traced model, since it runs inside its model's training forward.
    _training_parts: ClassVar[weakref.WeakSet[Any]] = weakref.WeakSet()
    # torch.compile wrappers (OptimizedModule), each with the hooks that trace its calls.
    _wrappers: ClassVar[weakref.WeakKeyDictionary[Any, _Traced]] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("torch >= 2.1",)

    # -- patching -----------------------------------------------------------------------
    def patches(self) -> Patches:
        return {
            _MODULE_MODULE: {
                "Module.train": self._wrap_train,
                "Module.load_state_dict": self._wrap_load_state_dict,
                "Module.__getstate__": self._wrap_getstate,
                "Module.compile": self._wrap_module_compile,
            },
            "torch": {"load": self._wrap_load},
            "torch.jit": {"load": self._wrap_load, "script": self._wrap_jit_script},
            "torch.jit._script": {"RecursiveScriptModule.__call__": self._wrap_script_call},
            "torch.jit._trace": {"TracedModule.__call__": self._wrap_script_call},
            # torch._dynamo takes seconds to import: it is patched once the application
            # imports it (torch.compile does).
            "torch._dynamo.eval_frame": {"OptimizedModule.__init__": self._wrap_optimized_init},
        }

    def on_instrument(self, **kwargs: Any) -> None:
        add_watch_listener(self._on_watch)

    def _patch_module(self, module: Any) -> None:
        super()._patch_module(module)
        if module.__name__ == _MODULE_MODULE:
            with self._dl_lock:
                if self._dl_enabled:
                    _add_deepcopy(module.Module, self._copied)

    def on_uninstrument(self) -> None:
        remove_watch_listener(self._on_watch)
        module = sys.modules.get(_MODULE_MODULE)
        if module is not None:
            _remove_deepcopy(module.Module)
        with self._lock:
            traced = [*self._traced.items(), *self._wrappers.items()]
            self._traced.clear()
            self._wrappers.clear()
        for _model, entry in traced:
            if entry.pre is not None:
                entry.pre.remove()
                entry.post.remove()

    # -- which models -------------------------------------------------------------------
    def _copied(self, model: Any, copied: Any) -> None:
        """``copied`` is a deep copy of ``model``: trace it as ``model`` is traced."""
        entry = self._traced.get(model)
        if entry is not None:
            copy_watch(model, copied)
            self.trace_model(copied, entry.path, entry.fingerprint)

    def _on_watch(self, obj: Any, state: WatchState) -> None:
        import torch

        if isinstance(obj, torch.nn.Module):
            self.trace_model(obj)

    def trace_model(
        self, model: Any, path: str | None = None, fingerprint: str | None = None
    ) -> None:
        """Start tracing ``model`` (idempotent); a ``torch.compile`` wrapper stands for
        the model it wraps."""
        global _compiling
        import torch

        _compiling = torch.compiler.is_compiling
        model = _unwrapped(model)
        with self._lock:
            entry = self._traced.get(model)
            if entry is None:
                entry = _Traced(pre=None, post=None)
                if not isinstance(model, torch.jit.ScriptModule):  # those: through __call__
                    self._add_hooks(model, entry)
                self._traced[model] = entry
            if path is not None:
                entry.path, entry.fingerprint = path, fingerprint

    def _add_hooks(self, model: Any, entry: _Traced) -> None:
        entry.pre = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        entry.post = model.register_forward_hook(
            self._post_hook, with_kwargs=True, always_call=True
        )

    # -- torch.compile: the compiled region runs the model's hooks as no-ops (_compiling);
    # the span is made around it, eagerly, for the model it compiles.
    def _wrap_optimized_init(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            # The wrapper's own hooks run outside its compiled forward.
            entry = _Traced(
                pre=instance.register_forward_pre_hook(self._wrapper_pre_hook, with_kwargs=True),
                post=instance.register_forward_hook(
                    self._wrapper_post_hook, with_kwargs=True, always_call=True
                ),
            )
            with self._lock:
                self._wrappers[instance] = entry
        except Exception:
            report_internal_error("torch.compile")
        return result

    def _wrapper_pre_hook(self, wrapper: Any, args: tuple[Any, ...], kwargs: Any) -> None:
        model = wrapper._orig_mod
        if model in self._traced:
            self._pre_hook(model, args, kwargs)

    def _wrapper_post_hook(
        self, wrapper: Any, args: tuple[Any, ...], kwargs: Any, output: Any
    ) -> None:
        model = wrapper._orig_mod
        if model in self._traced:
            self._post_hook(model, args, kwargs, output)

    def _wrap_module_compile(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        """``model.compile()`` compiles the model's own call, hooks included: its span is
        made around that compiled call."""
        result = wrapped(*args, **kwargs)
        try:
            compiled = instance._compiled_call_impl
            if compiled is not None and not isinstance(compiled, _TracedCompiledCall):
                instance._compiled_call_impl = _TracedCompiledCall(self, instance, compiled)
        except Exception:
            report_internal_error("torch.compile")
        return result

    def _wrap_jit_script(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        """Script the model without otel-dl's hooks, which TorchScript cannot compile."""
        import torch

        root = args[0] if args else kwargs.get("obj")
        if not isinstance(root, torch.nn.Module):
            return wrapped(*args, **kwargs)
        with self._lock:
            hooked = [
                (m, self._traced[m])
                for m in root.modules()
                if m in self._traced and self._traced[m].pre is not None
            ]
            for _module, entry in hooked:
                entry.pre.remove()
                entry.post.remove()
        try:
            return wrapped(*args, **kwargs)
        finally:
            with self._lock:
                for module, entry in hooked:
                    self._add_hooks(module, entry)

    def is_traced(self, model: Any) -> bool:
        return model in self._traced

    def _wrap_train(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        depth = getattr(_train_depth, "value", 0)
        was_training = getattr(instance, "training", False)
        _train_depth.value = depth + 1
        try:
            result = wrapped(*args, **kwargs)
        finally:
            _train_depth.value = depth
        if depth == 0 and instrumentation_enabled():
            mode = args[0] if args else kwargs.get("mode", True)
            try:
                if mode is False:
                    part_of_training = instance in self._training_parts
                    self._training_parts.difference_update(instance.modules())
                    if not part_of_training:
                        # A wrapper's eval() traces the model it wraps (trace_model).
                        model = _unwrapped(instance)
                        if was_training and model in self._traced:
                            # Trained since its last span: its weights are new.
                            self._forget_weights(model)
                        self.trace_model(model)
                else:
                    parts = instance.modules()
                    next(parts)  # the model itself
                    self._training_parts.update(parts)
                    if get_config().trace_training:
                        self.trace_model(instance)
            except Exception:
                report_internal_error("torch.eval")
        return result

    @staticmethod
    def _forget_weights(model: Any) -> None:
        """The next span of ``model`` fingerprints its weights anew."""
        forget_model(model)
        state = watch_state(model)
        if state is not None:
            state.static = None

    # -- model calls --------------------------------------------------------------------
    def _model_attributes(self, model: Any) -> Attributes:
        """The attributes every span of ``model`` shares, built once per watch state."""
        state = ensure_state(model)
        static = state.static
        if static is None:
            attrs = base_attributes(
                semconv.STAGE_INFERENCE, semconv.COMPONENT_TORCH_NN, state.provenance()
            )
            attrs[semconv.DL_MODEL_NAME] = state.name or type(model).__qualname__
            if state.version is not None:
                attrs[semconv.DL_MODEL_VERSION] = state.version
            attrs[semconv.DL_MODEL_FRAMEWORK] = "torch"
            entry = self._traced.get(model)
            if entry is not None and entry.path is not None:
                attrs[semconv.DL_MODEL_PATH] = entry.path
            fingerprint = model_fingerprint(model)
            if fingerprint is not None:
                attrs[semconv.DL_MODEL_FINGERPRINT] = fingerprint
            static = state.static = attrs
        return static

    def _pre_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _compiling():
            return None  # dynamo traces this: nothing of otel-dl goes into the graph
        # A suppressed call pushes no frame: its post-hook finds none of its own.
        if not instrumentation_enabled() or _capturing():
            return None
        frames = _frames.get()
        frame = _Frame(module, None)
        try:
            config = get_config()
            if not frames and (not module.training or config.trace_training):
                static = self._model_attributes(module)
                call = DlSpan(_SITE, static)
                if config.signals:
                    call.extract("input_signals", _input_signals, module, args, kwargs)
                if self._hooks.request is None and self._hooks.response is None:
                    # The SDK span is made when the span ends (in its burst), unless the
                    # forward needs it sooner (a child span): see DlSpan.start_lazily.
                    call.start_lazily(self._tracer, semconv.SPAN_INFERENCE)
                else:
                    call.start(self._tracer, semconv.SPAN_INFERENCE)
                frame.call = call
                if self._hooks.request is not None:
                    call.hook(
                        self._hooks.request,
                        DlCall(semconv.COMPONENT_TORCH_NN, module, args, kwargs),
                    )
        except Exception:
            report_internal_error(_SITE)
        _frames.set((*frames, frame))
        return None

    def _post_hook(
        self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if _compiling():
            return None
        frames = _frames.get()
        if (
            not frames
            or frames[-1].module is not module
            or not instrumentation_enabled()
            or _capturing()
        ):
            # Not this call's frame: a suppressed or captured call pushed none, and may
            # be a call of the module inside its own traced call.
            return None
        frame = frames[-1]
        _frames.set(frames[:-1])
        call = frame.call
        if call is None:
            return None
        try:
            self._end(call, module, args, kwargs, output)
        except Exception:
            report_internal_error(_SITE)
        return None

    def _end(
        self, call: DlSpan, module: Any, args: tuple[Any, ...], kwargs: Any, output: Any
    ) -> None:
        end_ns = time.time_ns()
        call.detach()
        exc = sys.exc_info()[1]
        if exc is not None:
            call.error(exc)
            call.end(end_ns)
            return
        if self._hooks.response is not None:
            call.hook(
                self._hooks.response,
                DlCall(semconv.COMPONENT_TORCH_NN, module, args, kwargs),
                output,
            )
        signals = get_config().signals
        scores = _scores(output) if signals else None
        if scores is not None:
            scores = _one_row(module, args, kwargs, scores)
        if signals and _on_gpu(scores):
            # The GPU may still be running the forward: the span ends when it has.
            try:
                later, call.later = call.later, None
                if later is not None and later.inputs is not None:  # a CPU input, kept
                    call.attributes.update(later.monitor.observe(later.inputs))
                if later is not None and later.source is not None:  # the loader's profile
                    call.attributes.update(later.source.resolved())
                _finish_on_gpu(call, module, args, kwargs, scores)
                return
            except Exception:
                report_internal_error(f"{_SITE}.gpu")
        elif signals and scores is not None:
            call.extract("output_signals", _output_signals, module, scores)
        call.end(end_ns)

    def _wrap_script_call(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if instance not in self._traced or _frames.get():
            return wrapped(*args, **kwargs)
        if instance.training and not get_config().trace_training:
            return wrapped(*args, **kwargs)
        return traced_call(
            wrapped,
            instance,
            args,
            kwargs,
            site="torch.script",
            name=semconv.SPAN_INFERENCE,
            stage=semconv.STAGE_INFERENCE,
            component=semconv.COMPONENT_TORCH_NN,
            before=lambda call: _call_signals(call),
            after=lambda call, out: _output_signals(call.instance, out),  # type: ignore[arg-type,return-value]
            hooks=self._hooks,
            attributes=self._model_attributes(instance),
            tracer=self._tracer,
        )

    # -- loading ------------------------------------------------------------------------
    def _wrap_load(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        source = args[0] if args else kwargs.get("f")
        path = os.fspath(source) if isinstance(source, str | os.PathLike) else None
        fingerprint: list[str | None] = [None]

        def before(call: DlCall) -> Attributes:
            attrs: Attributes = {semconv.DL_MODEL_FRAMEWORK: "torch"}
            if path is not None:
                attrs[semconv.DL_MODEL_PATH] = path
                fingerprint[0] = file_fingerprint(path)
                if fingerprint[0] is not None:
                    attrs[semconv.DL_MODEL_FINGERPRINT] = fingerprint[0]
            return attrs

        def after(call: DlCall, loaded: Any) -> Attributes:
            import torch

            if isinstance(loaded, torch.nn.Module):
                self.trace_model(loaded, path=path, fingerprint=fingerprint[0])
                return {semconv.DL_MODEL_NAME: type(loaded).__qualname__}
            return {}

        return traced_call(
            wrapped,
            instance,
            args,
            kwargs,
            site="torch.load",
            name=semconv.SPAN_MODEL_LOAD,
            stage=semconv.STAGE_MODEL_LOAD,
            component=semconv.COMPONENT_TORCH_NN,
            before=before,
            after=after,
            hooks=self._hooks,
        )

    def _wrap_load_state_dict(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        def after(call: DlCall, result: Any) -> Attributes:
            # The weights changed: the next fingerprint must be computed afresh.
            fingerprint = model_fingerprint(instance, refresh=True)
            ensure_state(instance).static = None
            attrs: Attributes = {
                semconv.DL_MODEL_NAME: ensure_state(instance).name or type(instance).__qualname__
            }
            if fingerprint is not None:
                attrs[semconv.DL_MODEL_FINGERPRINT] = fingerprint
            return attrs

        return traced_call(
            wrapped,
            instance,
            args,
            kwargs,
            site="torch.load_state_dict",
            name=semconv.SPAN_MODEL_LOAD,
            stage=semconv.STAGE_MODEL_LOAD,
            component=semconv.COMPONENT_TORCH_NN,
            before=lambda call: {semconv.DL_MODEL_FRAMEWORK: "torch"},
            after=after,
            hooks=self._hooks,
        )

    def _wrap_getstate(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        state = wrapped(*args, **kwargs)
        entry = self._traced.get(instance)
        if entry is None or entry.pre is None:
            return state
        try:
            # A pickled model must load where otel-dl is not installed: leave our hooks out.
            state = dict(state)
            for key, hook_id in (
                ("_forward_pre_hooks", entry.pre.id),
                ("_forward_pre_hooks_with_kwargs", entry.pre.id),
                ("_forward_hooks", entry.post.id),
                ("_forward_hooks_with_kwargs", entry.post.id),
                ("_forward_hooks_always_called", entry.post.id),
            ):
                if key in state:
                    hooks = type(state[key])(state[key])
                    hooks.pop(hook_id, None)
                    state[key] = hooks
        except Exception:
            report_internal_error("torch.getstate")
        return state
