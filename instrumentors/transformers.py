"""Hugging Face transformers instrumentation: one span per pipeline call or ``generate()``.

``otel_dl.instrument()`` enables it when transformers is installed; by hand::

    from otel_dl.instrumentors.transformers import TransformersInstrumentor
    TransformersInstrumentor().instrument()

Every call of a ``transformers.Pipeline`` (``pipe("some text")``, ``pipe([...])``)
becomes an ``inference`` span (``dl.stage=inference``, ``dl.component=transformers``).
Nothing is imported up front: the patch is applied when ``transformers.pipelines`` is
first imported, so an application that never uses transformers pays nothing.

The span is the one span of the call: the model's forwards, the pipeline's own
DataLoader and any other instrumented work inside it run with instrumentation suppressed
(a text generation of 50 tokens makes one span, not 50 model spans). A pipeline called
inside another makes no span of its own.

It carries ``dl.model.framework=transformers``, the task (``dl.model.task``), the model
name (the ``watch`` name, else the model's ``name_or_path``, else its class), the version
(the ``watch`` version, else the Hub commit when known: the config's ``_commit_hash``, or
a ``snapshots/<commit>`` directory the model was loaded from), ``dl.model.path`` when the
model came from a local directory, the fingerprint of the weights (computed once per
model), and ``dl.prediction.count``; the attributes every call shares are built once
per pipeline, model, watch state and weights. Watch either the pipeline or its model:
``otel_dl.watch(pipe, name="sentiment", version="2026-11")``.

- Classification tasks (text, image, audio, video classification) get ``dl.confidence.*``
  from the class scores the answer was computed from: the model's logits, so margin and
  entropy are exact even when the pipeline returns only the top label. Zero-shot tasks
  use the returned scores over the candidate labels. The figures wait for a burst of
  the pipeline's calls (``otel_dl._burst``), read as logits, off the caller's path.
- Generation tasks get the OpenTelemetry GenAI attributes: ``gen_ai.operation.name``
  (``chat`` for chat messages, else ``text_completion``), ``gen_ai.request.model``,
  ``gen_ai.request.max_tokens`` when ``max_new_tokens`` is set, and
  ``gen_ai.usage.input_tokens``/``output_tokens`` counted from the token ids (output
  tokens stop at the first end-of-sequence token, which counts). Both read the settings
  the ``generate`` call ran with: its keywords (the pipeline's own, given when it was
  built or to the call, and ``eos_token_id`` given per call), else its
  ``generation_config`` keyword, else the model's ``generation_config``.

A model's ``generate()`` called directly (serving code that tokenizes itself) is one
``inference`` span too, with the same GenAI attributes and ``dl.prediction.count`` (the
sequences), not one model span per decoding step; inside a pipeline it makes none of
its own. In training mode it is traced only with ``trace_training``.

Streaming inputs (a generator or a Dataset) return a lazy iterator; such calls make no
pipeline span, and the model's forwards are traced by the torch instrumentor instead.
Text inputs give no drift or quality signals.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
import weakref
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import report_internal_error
from otel_dl._span import Attributes, DlCall, traced_call
from otel_dl._watch import WatchState, ensure_state, watch_state
from otel_dl.monitor import combine, confidence_attributes
from otel_dl.provenance import model_fingerprint

from ._base import DlInstrumentor, Patches

_MODULE = "transformers.pipelines.base"
_GENERATION_MODULE = "transformers.generation.utils"
_FRAMEWORK = "transformers"
_SITE = "transformers.pipeline"
_GENERATE_SITE = "transformers.generate"
_CLASSIFICATION_TASKS: Final = frozenset(
    {
        "text-classification",
        "sentiment-analysis",
        "image-classification",
        "audio-classification",
        "video-classification",
    }
)
_GENERATION_TASKS: Final = ("text-generation", "text2text-generation", "summarization")
_SNAPSHOT = re.compile(r"snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")


@dataclass
class _Capture:
    """What the forwards of one pipeline call leave behind for its span."""

    pipeline: Any
    logits: bool
    generation: bool
    class_scores: list[Any] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    sequences: int = 0
    token_counts: bool = False
    # The settings the pipeline's generate call ran with (None: not called yet).
    max_tokens: int | None = None
    stops: tuple[list[int], int | None] | None = None


_capture: ContextVar[_Capture | None] = ContextVar("otel_dl_transformers_call", default=None)


def _is_generation(pipe: Any) -> bool:
    task = str(getattr(pipe, "task", "") or "")
    return bool(getattr(type(pipe), "_pipeline_calls_generate", False)) or task.startswith(
        (*_GENERATION_TASKS, "translation")
    )


def _inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    return args[0] if args else kwargs.get("inputs")


def _is_chat(inputs: Any) -> bool:
    """One conversation (a list of ``{"role": ...}`` messages), or a batch of them."""
    if not isinstance(inputs, list | tuple) or not inputs:
        return False
    first = inputs[0]
    if isinstance(first, list | tuple) and first:  # a batch: its first conversation
        first = first[0]
    return isinstance(first, Mapping) and "role" in first


def _streams(inputs: Any) -> bool:
    if isinstance(inputs, types.GeneratorType):
        return True
    torch_data = sys.modules.get("torch.utils.data")
    return torch_data is not None and isinstance(inputs, torch_data.Dataset)


def _revision(model: Any, name_or_path: str) -> str | None:
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if isinstance(commit, str) and commit:
        return commit
    match = _SNAPSHOT.search(name_or_path)
    return match.group(1) if match else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def _setting(model: Any, kwargs: Mapping[str, Any], name: str) -> Any:
    """The value of generation setting ``name`` a ``generate`` call runs with: its keyword,
    else its ``generation_config`` keyword's, else the model's ``generation_config``'s (a
    pipeline passes its own settings, given when it was built or to the call, as
    keywords or a ``generation_config``)."""
    value = kwargs.get(name)
    if value is None:
        value = getattr(kwargs.get("generation_config"), name, None)
    if value is None:
        value = getattr(getattr(model, "generation_config", None), name, None)
    return value


def _stops(model: Any, kwargs: Mapping[str, Any]) -> tuple[list[int], int | None]:
    """The end-of-sequence ids and the padding id a ``generate`` call runs with."""
    pad = _setting(model, kwargs, "pad_token_id")
    return _ids(_setting(model, kwargs, "eos_token_id")), pad if isinstance(pad, int) else None


def _generated_tokens(new_tokens: Any, eos_ids: list[int], pad_id: int | None) -> int:
    """Tokens generated per sequence, up to and including the first end-of-sequence."""
    import torch

    rows = new_tokens.reshape(-1, new_tokens.shape[-1])
    if rows.shape[-1] == 0:
        return 0
    lengths = torch.full((rows.shape[0],), rows.shape[-1], device=rows.device)
    if eos_ids:
        is_eos = torch.isin(rows, torch.tensor(eos_ids, device=rows.device))
        first = is_eos.int().argmax(dim=-1)
        lengths = torch.where(is_eos.any(dim=-1), first + 1, lengths)
    elif pad_id is not None:
        lengths = (rows != pad_id).sum(dim=-1)
    return int(lengths.sum())


def _record_forward(capture: _Capture, model_inputs: Any, outputs: Any) -> None:
    import torch

    if not isinstance(outputs, Mapping):
        return
    if capture.logits:
        logits = outputs.get("logits")
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_floating_point():
            capture.class_scores.append(logits.detach())
        return
    if not capture.generation or not isinstance(model_inputs, Mapping):
        return
    input_ids = model_inputs.get("input_ids")
    mask = model_inputs.get("attention_mask")
    prompt = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0
    if isinstance(mask, torch.Tensor):
        capture.input_tokens += int(mask.sum())
    elif isinstance(input_ids, torch.Tensor):
        capture.input_tokens += int(input_ids.numel())
    generated = outputs.get("generated_sequence")
    if generated is None:
        # Encoder-decoder pipelines return only the decoder's ids, after its start token.
        generated, prompt = outputs.get("output_ids"), 1
    if not isinstance(generated, torch.Tensor) or generated.dim() < 2:
        return
    eos_ids, pad_id = capture.stops or _stops(capture.pipeline.model, {})
    new_tokens = generated[..., prompt:]
    capture.output_tokens += _generated_tokens(new_tokens, eos_ids, pad_id)
    capture.sequences += new_tokens.reshape(-1, new_tokens.shape[-1]).shape[0]
    capture.token_counts = True


def _call_option(pipe: Any, kwargs: Mapping[str, Any], name: str) -> Any:
    """A postprocessing option of this call, else the one the pipeline was built with."""
    if name in kwargs:
        return kwargs[name]
    built = getattr(pipe, "_postprocess_params", None)
    return built.get(name) if isinstance(built, Mapping) else None


def _sigmoid_per_label(pipe: Any, kwargs: Mapping[str, Any]) -> bool:
    """Whether a classification pipeline scores several labels each with its own sigmoid
    (a multi-label model, or ``function_to_apply="sigmoid"``), or is a regression: its
    logits are then not one distribution over the labels, and carry no confidence. One
    label's sigmoid is a binary distribution and does."""
    config = getattr(getattr(pipe, "model", None), "config", None)
    if getattr(config, "problem_type", None) == "regression":
        return True  # a regression head's outputs are values, not class scores
    if int(getattr(config, "num_labels", 0) or 0) <= 1:
        return False
    function = _call_option(pipe, kwargs, "function_to_apply")
    if function is not None:
        return str(getattr(function, "value", function)).lower() == "sigmoid"
    return getattr(config, "problem_type", None) == "multi_label_classification"


def _score_rows(result: Any, batched: bool) -> list[list[float]] | None:
    """Zero-shot results as rows of scores over the candidate labels, or None."""
    rows: list[list[float]] = []
    for answer in result if batched else [result]:
        if isinstance(answer, Mapping) and isinstance(answer.get("scores"), list):
            rows.append([float(s) for s in answer["scores"]])
        elif isinstance(answer, list) and all(
            isinstance(a, Mapping) and "score" in a for a in answer
        ):
            rows.append([float(a["score"]) for a in answer])
        else:
            return None
    return rows if rows and len({len(r) for r in rows}) == 1 else None


class TransformersInstrumentor(DlInstrumentor):
    """Traces Hugging Face ``Pipeline`` calls; see the module docstring."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("transformers >= 4.40",)

    def patches(self) -> Patches:
        return {
            _MODULE: {"Pipeline.__call__": self._wrap_call, "Pipeline.forward": self._wrap_forward},
            _GENERATION_MODULE: {"GenerationMixin.generate": self._wrap_generate},
        }

    # -- model.generate() called directly -------------------------------------------------
    def _wrap_generate(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        """One span for the whole generation, as a text-generation pipeline's, instead of
        one model span per decoding step (a 512-token answer made 512 spans). Inside a
        pipeline the call is suppressed already and makes none of its own."""
        if getattr(instance, "training", False) and not get_config().trace_training:
            return wrapped(*args, **kwargs)
        capture = _capture.get()
        if capture is not None and capture.generation:
            # A pipeline's generate: its span counts tokens by what this call stops at.
            try:
                max_tokens = _setting(instance, kwargs, "max_new_tokens")
                capture.max_tokens = max_tokens if isinstance(max_tokens, int) else None
                capture.stops = _stops(instance, kwargs)
            except Exception:
                report_internal_error(f"{_GENERATE_SITE}.settings")
        return self._one_span(
            wrapped, instance, args, kwargs, _GENERATE_SITE, _generate_attributes, _generated
        )

    def _one_span(
        self,
        wrapped: Any,
        instance: Any,
        args: Any,
        kwargs: Any,
        site: str,
        before: Callable[[DlCall], Attributes],
        after: Callable[[DlCall, Any], Attributes],
    ) -> Any:
        """``wrapped`` as one ``inference`` span, everything inside it suppressed."""
        return traced_call(
            _suppressing(wrapped),
            instance,
            args,
            kwargs,
            site=site,
            name=semconv.SPAN_INFERENCE,
            stage=semconv.STAGE_INFERENCE,
            component=semconv.COMPONENT_TRANSFORMERS,
            before=before,
            after=after,
            hooks=self._hooks,
            tracer=self._tracer,
        )

    # -- calls --------------------------------------------------------------------------
    def _wrap_call(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        inputs = _inputs(args, kwargs)
        if _streams(inputs):
            return wrapped(*args, **kwargs)
        task = str(getattr(instance, "task", "") or "")
        capture = _Capture(
            instance, logits=task in _CLASSIFICATION_TASKS, generation=_is_generation(instance)
        )
        token = _capture.set(capture)
        try:
            return self._one_span(
                wrapped,
                instance,
                args,
                kwargs,
                _SITE,
                lambda call: self._model_attributes(call, capture),
                lambda call, result: self._signals(call, capture, result),
            )
        finally:
            _capture.reset(token)

    @staticmethod
    def _wrap_forward(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        outputs = wrapped(*args, **kwargs)
        capture = _capture.get()
        if capture is not None and capture.pipeline is instance:
            try:
                _record_forward(capture, args[0] if args else kwargs.get("model_inputs"), outputs)
            except Exception:
                report_internal_error(f"{_SITE}.forward")
        return outputs

    @staticmethod
    def _state(pipe: Any) -> WatchState:
        return watch_state(pipe) or watch_state(pipe.model) or ensure_state(pipe)

    def _model_attributes(self, call: DlCall, capture: _Capture) -> Attributes:
        pipe = call.instance
        model = pipe.model
        attrs = dict(self._pipeline_attributes(pipe, model))
        name_or_path = str(getattr(model, "name_or_path", "") or "")
        if capture.generation:
            inputs = _inputs(call.args, call.kwargs)
            attrs[semconv.GEN_AI_OPERATION_NAME] = "chat" if _is_chat(inputs) else "text_completion"
            attrs[semconv.GEN_AI_REQUEST_MODEL] = name_or_path or attrs[semconv.DL_MODEL_NAME]
            max_tokens = call.kwargs.get("max_new_tokens")
            if isinstance(max_tokens, int):
                attrs[semconv.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
        return attrs

    def _pipeline_attributes(self, pipe: Any, model: Any) -> Attributes:
        """The attributes every call of ``pipe`` shares (its model's identity, path and
        the task), built once while the pipeline keeps its model, watch state and
        weights (a fingerprint that changes, after ``load_state_dict``, builds them anew)."""
        state = self._state(pipe)
        fingerprint = model_fingerprint(model)
        try:
            cached = _pipeline_static.get(pipe)
        except TypeError:  # a pipeline that cannot be weakly referenced: built each call
            cached = None
        if (
            cached is not None
            and cached[0] is model
            and cached[1] is state
            and cached[2] == fingerprint
        ):
            return cached[3]
        attrs = _model_identity(model, state)
        name_or_path = str(getattr(model, "name_or_path", "") or "")
        if name_or_path and os.path.isdir(name_or_path):
            attrs[semconv.DL_MODEL_PATH] = name_or_path
        if pipe.task:
            attrs[semconv.DL_MODEL_TASK] = pipe.task
        with contextlib.suppress(TypeError):
            _pipeline_static[pipe] = (model, state, fingerprint, attrs)
        return attrs

    @staticmethod
    def _signals(call: DlCall, capture: _Capture, result: Any) -> Attributes:
        import torch

        attrs: Attributes = {}
        inputs = _inputs(call.args, call.kwargs)
        batched = isinstance(inputs, list) and not _is_chat(inputs)
        attrs[semconv.DL_PREDICTION_COUNT] = len(inputs) if batched else 1
        if capture.token_counts:
            attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] = capture.input_tokens
            attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = capture.output_tokens
            attrs[semconv.DL_PREDICTION_COUNT] = capture.sequences
        if capture.max_tokens is not None:  # the limit the pipeline's generate ran with
            attrs[semconv.GEN_AI_REQUEST_MAX_TOKENS] = capture.max_tokens
        config = get_config()
        if not config.signals:
            return attrs
        state = TransformersInstrumentor._state(call.instance)
        if not state.confidence:
            return attrs
        scores: Any = None
        kind = "auto"
        if capture.class_scores and not _sigmoid_per_label(call.instance, call.kwargs):
            # The model's logits, whatever their values: one logit of 0.01 is a sigmoid
            # of 0.5, not a probability of 0.99.
            scores, kind = torch.cat(capture.class_scores), "logits"
        elif str(getattr(call.instance, "task", "")).startswith("zero-shot"):
            rows = _score_rows(result, batched)
            # multi_label scores each candidate on its own: a row is not a distribution.
            independent = _call_option(call.instance, call.kwargs, "multi_label")
            scores = None if rows and len(rows[0]) > 1 and independent else rows
        if scores is None:
            return attrs
        if config.signals_delay_ms > 0:  # every prediction, as below, but in a burst
            later = state.monitor().confidence_later(scores, sample=False, kind=kind)
            return combine(attrs, later)
        attrs.update(confidence_attributes(scores, config.confidence_threshold, kind=kind))
        return attrs


def _prompt(call: DlCall) -> Any:
    return call.args[0] if call.args else call.kwargs.get("input_ids", call.kwargs.get("inputs"))


# Pipeline -> (model, watch state, weights fingerprint, the attributes built for them).
_pipeline_static: weakref.WeakKeyDictionary[Any, tuple[Any, WatchState, str | None, Attributes]] = (
    weakref.WeakKeyDictionary()
)


def _model_identity(model: Any, state: WatchState) -> Attributes:
    """Provenance, framework, name (the ``watch`` name, else ``name_or_path``, else the
    class), version (the ``watch`` version, else the Hub commit) and weights fingerprint."""
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    attrs: Attributes = state.provenance()
    attrs[semconv.DL_MODEL_FRAMEWORK] = _FRAMEWORK
    attrs[semconv.DL_MODEL_NAME] = state.name or name_or_path or type(model).__name__
    version = state.version or _revision(model, name_or_path)
    if version is not None:
        attrs[semconv.DL_MODEL_VERSION] = version
    fingerprint = model_fingerprint(model)
    if fingerprint is not None:
        attrs[semconv.DL_MODEL_FINGERPRINT] = fingerprint
    return attrs


def _generate_attributes(call: DlCall) -> Attributes:
    """A directly called ``generate``'s model and GenAI request attributes."""
    model = call.instance
    attrs = _model_identity(model, watch_state(model) or ensure_state(model))
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    attrs[semconv.GEN_AI_OPERATION_NAME] = "text_completion"
    attrs[semconv.GEN_AI_REQUEST_MODEL] = name_or_path or attrs[semconv.DL_MODEL_NAME]
    max_tokens = _setting(model, call.kwargs, "max_new_tokens")
    if isinstance(max_tokens, int):
        attrs[semconv.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    return attrs


def _generated(call: DlCall, result: Any) -> Attributes:
    """Token counts and sequences of a directly called ``generate``."""
    import torch

    sequences = getattr(result, "sequences", result)
    prompt = _prompt(call)
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        return {}
    attrs: Attributes = {semconv.DL_PREDICTION_COUNT: int(sequences.shape[0])}
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        return attrs
    mask = call.kwargs.get("attention_mask")
    inputs = int(mask.sum()) if isinstance(mask, torch.Tensor) else int(prompt.numel())
    model_config = getattr(call.instance, "config", None)
    # An encoder-decoder's sequences are the decoder's: its start token, then new tokens.
    start = 1 if getattr(model_config, "is_encoder_decoder", False) else prompt.shape[-1]
    attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] = inputs
    attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = _generated_tokens(
        sequences[:, start:], *_stops(call.instance, call.kwargs)
    )
    return attrs


def _suppressing(wrapped: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with suppress_instrumentation():
            return wrapped(*args, **kwargs)

    return run
