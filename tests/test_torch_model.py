"""The torch model instrumentor on real torch modules."""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode

import otel_dl
from otel_dl import semconv
from tests.support import SpanList


@pytest.fixture(autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


class Deep(torch.nn.Module):
    def __init__(self, depth: int = 50) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Exploding(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ArithmeticError("bad batch")


def test_watched_model_one_span_per_call_with_attributes(spans: SpanList) -> None:
    model = otel_dl.watch(mlp(), name="scorer", version="7")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(32, 4))
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    attrs = span.attributes
    assert attrs[semconv.DL_STAGE] == "inference"
    assert attrs[semconv.DL_COMPONENT] == "torch.nn"
    assert (attrs[semconv.DL_MODEL_NAME], attrs[semconv.DL_MODEL_VERSION]) == ("scorer", "7")
    assert attrs[semconv.DL_MODEL_FRAMEWORK] == "torch"
    assert len(attrs[semconv.DL_MODEL_FINGERPRINT]) >= 16
    assert attrs[semconv.DL_PREDICTION_COUNT] == 32
    assert 0.0 < attrs[semconv.DL_CONFIDENCE_MEAN] <= 1.0
    assert attrs[semconv.DL_BATCH_SIZE] == 32
    assert out.shape == (32, 3)


def test_fifty_submodules_still_one_span(spans: SpanList) -> None:
    model = Deep(50).eval()
    with torch.inference_mode():
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))
    assert len(spans.get()) == 2
    assert all(s.attributes[semconv.DL_MODEL_NAME] == "Deep" for s in spans.get())


def test_eval_registers_only_the_outer_model() -> None:
    from otel_dl.instrumentors.torch_model import TorchModelInstrumentor

    model = Deep(3)
    model.eval()
    instrumentor = TorchModelInstrumentor()
    assert instrumentor.is_traced(model)
    assert not any(instrumentor.is_traced(layer) for layer in model.layers)


def test_training_mode_is_not_traced_by_default(spans: SpanList) -> None:
    model = otel_dl.watch(mlp())
    model.train()
    model(torch.randn(8, 4)).sum().backward()
    assert spans.get() == []


def test_batchnorm_frozen_while_fine_tuning_makes_no_span(spans: SpanList) -> None:
    """The usual fine-tuning loop puts the model in training mode, then its BatchNorm
    layers in inference mode: those run inside the model's training forward and are no
    model of their own. Validation after it makes the model's own span, and the next
    epoch's freeze makes none again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _epoch in range(2):
        model.train()
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm1d):
                layer.eval()
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 4)).sum().backward()
            optimizer.step()
        assert spans.get(semconv.SPAN_INFERENCE) == []
        model.eval()
        with torch.no_grad():
            model(torch.randn(16, 4))
        (validation,) = spans.get(semconv.SPAN_INFERENCE)
        assert validation.attributes[semconv.DL_MODEL_NAME] == "Sequential"
        spans.clear()


def test_unwatched_untouched_model_is_not_traced(spans: SpanList) -> None:
    mlp()(torch.randn(3, 4))
    assert spans.get() == []


class SelfCalling(torch.nn.Module):
    """Calls itself once more, under suppression, inside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.inner_done_ns = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from opentelemetry.instrumentation.utils import suppress_instrumentation

        if not getattr(self, "_inside", False):
            self._inside = True
            try:
                with suppress_instrumentation():
                    self(x)
            finally:
                self._inside = False
            self.inner_done_ns = time.time_ns()
        return self.linear(x)


def test_suppressed_calls_make_no_span_and_leave_the_traced_call_whole(
    spans: SpanList,
) -> None:
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    model = otel_dl.watch(mlp()).eval()
    with suppress_instrumentation():
        model(torch.randn(2, 4))
        Deep(3).eval()(torch.randn(2, 4))
    assert spans.get() == []
    # A suppressed call of the model inside its own traced call: the traced call's one
    # span still ends when the outer call does, not when the inner one returns.
    looping = SelfCalling().eval()
    out = looping(torch.randn(2, 4))
    (span,) = spans.get()
    assert span.end_time >= looping.inner_done_ns
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 2
    assert out.shape == (2, 3)
    looping(torch.randn(2, 4))  # the frame stack is empty again: a root span
    assert len(spans.get()) == 2 and spans.get()[-1].parent is None


def test_user_exception_is_unchanged_and_recorded(spans: SpanList) -> None:
    model = Exploding().eval()
    with pytest.raises(ArithmeticError, match="bad batch"):
        model(torch.randn(1, 4))
    (span,) = spans.get()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ArithmeticError"
    # the failed call left nothing behind: the next call is a fresh root span
    ok = mlp().eval()
    ok(torch.randn(1, 4))
    assert spans.get()[-1].parent is None


def test_spans_nest_under_the_current_span(spans: SpanList, tracer) -> None:
    model = mlp().eval()
    with tracer.start_as_current_span("request") as request:
        model(torch.randn(2, 4))
    inference = spans.get(semconv.SPAN_INFERENCE)[0]
    assert inference.parent.span_id == request.get_span_context().span_id


class Calling(torch.nn.Module):
    """A forward that does what an application's own code may do inside it: start a span
    of its own, and write on the current span."""

    def __init__(self, tracer) -> None:
        super().__init__()
        self.tracer = tracer
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from opentelemetry import trace

        current = trace.get_current_span()
        assert current.is_recording()
        current.set_attribute("app.tenant", "a")
        if x.shape[0] > 1:
            with self.tracer.start_as_current_span("lookup"):
                pass
        return self.linear(x)


@pytest.mark.parametrize("rows", [1, 3])
def test_the_inference_span_is_current_during_forward(spans: SpanList, tracer, rows) -> None:
    """The span is made lazily (when it ends, or when a child needs it), yet the forward
    sees it as current: its own span is a child of it, and what it writes on the current
    span is on it. With 1 row nothing needs the span during the call (made at its end);
    with 3 the child span makes it at once."""
    model = Calling(tracer).eval()
    with tracer.start_as_current_span("request") as request:
        before = request.start_time
        model(torch.randn(rows, 4))
    (inference,) = spans.get(semconv.SPAN_INFERENCE)
    assert inference.parent.span_id == request.get_span_context().span_id
    assert inference.context.trace_id == request.get_span_context().trace_id
    assert inference.attributes["app.tenant"] == "a"
    assert semconv.DL_BATCH_SIZE in inference.attributes
    assert before <= inference.start_time <= inference.end_time
    children = spans.get("lookup")
    if rows > 1:
        (child,) = children
        assert child.parent.span_id == inference.context.span_id
        assert inference.start_time <= child.start_time <= child.end_time <= inference.end_time
    else:
        assert children == []


def test_the_current_span_kept_past_the_call_still_names_the_inference_span(
    spans: SpanList,
) -> None:
    """Work the forward hands on (a task, a thread's context) may read the current span
    after the call has ended, even after its burst ended the span: it still names it."""
    from opentelemetry import trace

    kept = []

    class Keeping(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kept.append(trace.get_current_span())
            return x * 2

    Keeping().eval()(torch.randn(1, 4))
    (inference,) = spans.get(semconv.SPAN_INFERENCE)  # its burst has ended it
    (late,) = kept
    assert late.get_span_context().span_id == inference.context.span_id
    assert late.get_span_context().trace_id == inference.context.trace_id
    assert not late.is_recording()


def test_torch_load_and_load_state_dict_spans(tmp_path: Path, spans: SpanList) -> None:
    model = mlp()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = mlp()
    torch.manual_seed(1)
    for p in fresh.parameters():
        torch.nn.init.normal_(p)
    before = otel_dl.watch(fresh, name="m")
    before.eval()
    before(torch.randn(1, 4))
    fresh.load_state_dict(torch.load(path))
    fresh(torch.randn(1, 4))
    # In start order: the first call's span ends later, with its burst of small calls.
    found = sorted(spans.get(), key=lambda s: s.start_time or 0)
    assert [s.name for s in found] == ["inference", "model.load", "model.load", "inference"]
    first, file_load, sd_load, second = found
    assert file_load.attributes[semconv.DL_MODEL_PATH] == str(path)
    assert file_load.attributes[semconv.DL_STAGE] == "model_load"
    assert len(file_load.attributes[semconv.DL_MODEL_FINGERPRINT]) >= 16
    fp1 = first.attributes[semconv.DL_MODEL_FINGERPRINT]
    fp2 = second.attributes[semconv.DL_MODEL_FINGERPRINT]
    assert fp1 != fp2 == sd_load.attributes[semconv.DL_MODEL_FINGERPRINT]


def test_whole_model_load_is_traced_and_pickles_without_hooks(
    tmp_path: Path, spans: SpanList
) -> None:
    path = tmp_path / "whole.pt"
    torch.save(mlp().eval(), path)
    loaded = torch.load(path, weights_only=False)
    loaded(torch.randn(2, 4))
    load_span, call = spans.get()
    assert call.attributes[semconv.DL_MODEL_PATH] == str(path)
    assert load_span.attributes[semconv.DL_MODEL_NAME] == "Sequential"
    # the traced model pickles without otel-dl's hooks
    restored = pickle.loads(pickle.dumps(loaded))
    assert not restored._forward_hooks and not restored._forward_pre_hooks


def test_a_deep_copy_of_a_traced_model_is_traced_as_the_model_is(spans: SpanList) -> None:
    """A model kept as a copy (the best epoch's, one per serving thread) is the model:
    the copy makes its own spans under the watched name, with its own weights'
    fingerprint, and the original is unchanged."""
    import copy

    x = torch.randn(600, 4)  # drift_min_rows (500): each call is scored
    reference = otel_dl.Reference.fit(torch.randn(1000, 4).numpy())
    model = otel_dl.watch(mlp().eval(), name="ranker", version="3", reference=reference)
    unwatched = mlp().eval()
    with torch.no_grad():
        expected = model(x)
        copied, plain = copy.deepcopy(model), copy.deepcopy(unwatched)
        torch.testing.assert_close(copied(x), expected)
        plain(x)
        moved = copy.deepcopy(model)
        moved[0].weight.add_(1.0)  # a copy that moves on (averaged or fine-tuned weights)
        moved(x)
        model(x)
    # in call order (a span ends when its burst is profiled, not always in that order)
    found = sorted(spans.get(semconv.SPAN_INFERENCE), key=lambda span: span.start_time or 0)
    original, of_copy, of_plain, of_moved, again = found
    watched = (original, of_copy, of_moved, again)
    for span in watched:
        attrs = span.attributes
        assert (attrs[semconv.DL_MODEL_NAME], attrs[semconv.DL_MODEL_VERSION]) == ("ranker", "3")
        assert attrs[semconv.DL_DRIFT_STATUS] == "ok"  # the reference came along
    assert of_plain.attributes[semconv.DL_MODEL_NAME] == "Sequential"
    assert semconv.DL_DRIFT_STATUS not in of_plain.attributes  # learning its own baseline
    # each copy has a drift window and a weights fingerprint of its own
    assert [s.attributes[semconv.DL_DRIFT_WINDOW_ROWS] for s in watched] == [600, 600, 600, 1200]
    fingerprint = original.attributes[semconv.DL_MODEL_FINGERPRINT]
    assert of_copy.attributes[semconv.DL_MODEL_FINGERPRINT] == fingerprint
    assert again.attributes[semconv.DL_MODEL_FINGERPRINT] == fingerprint
    assert of_moved.attributes[semconv.DL_MODEL_FINGERPRINT] != fingerprint
    # the copy still pickles without otel-dl's hooks, and an untraced model's copy stays so
    restored = pickle.loads(pickle.dumps(copied))
    assert not restored._forward_hooks and not restored._forward_pre_hooks
    spans.clear()
    bare = mlp()
    with suppress_instrumentation():
        bare.eval()
    copy.deepcopy(bare)(x)
    assert spans.get() == []


def test_a_deep_copy_keeps_the_baseline_its_model_learned(spans: SpanList) -> None:
    import copy

    model = mlp().eval()
    with torch.no_grad():
        model(torch.randn(1000, 4))  # baseline_rows: the auto-baseline is fitted
        copied = copy.deepcopy(model)
        copied(torch.randn(600, 4))
    *_, span = spans.get(semconv.SPAN_INFERENCE)
    assert span.attributes[semconv.DL_DRIFT_STATUS] == "ok"
    assert span.attributes[semconv.DL_DRIFT_WINDOW_ROWS] == 600


def test_deep_copies_are_plain_once_instrumentation_is_off(handle: otel_dl.Instrumentation) -> None:
    import copy

    handle.shutdown()
    assert "__deepcopy__" not in vars(torch.nn.Module)
    assert not copy.deepcopy(mlp().eval())._forward_hooks


def test_jit_load_model_is_traced(spans: SpanList) -> None:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(mlp().eval()), buffer)
    buffer.seek(0)
    with pytest.warns(FutureWarning):
        scripted = torch.jit.load(buffer)
    scripted(torch.randn(5, 4))
    load_span, call = spans.get()
    assert load_span.name == "model.load" and call.name == "inference"
    assert call.attributes[semconv.DL_PREDICTION_COUNT] == 5


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_torch_compile_with_fullgraph_adds_no_graph_break(how: str, spans: SpanList) -> None:
    """fullgraph=True refuses any graph break: the hooks return at once while dynamo
    traces the model, and the span is made around the compiled call."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = otel_dl.watch(mlp().eval(), name="compiled", version="2")
    bare = mlp()
    with suppress_instrumentation():
        bare.eval()  # untraced: the reference result
    bare.load_state_dict(model.state_dict())
    if how == "torch.compile":
        compiled = torch.compile(model, backend="eager", fullgraph=True)
    else:
        compiled = model
        model.compile(backend="eager", fullgraph=True)
    x = torch.randn(4, 4)
    spans.clear()
    for _ in range(3):
        torch.testing.assert_close(compiled(x), bare(x))
    assert sum(counters["graph_break"].values()) == 0
    calls = spans.get(semconv.SPAN_INFERENCE)
    assert [s.attributes[semconv.DL_MODEL_NAME] for s in calls] == ["compiled"] * 3
    assert calls[0].attributes[semconv.DL_MODEL_VERSION] == "2"
    assert calls[0].attributes[semconv.DL_PREDICTION_COUNT] == 4


def test_a_model_inside_a_compiled_function_is_part_of_its_graph(spans: SpanList) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = otel_dl.watch(mlp().eval(), name="inner")
    probabilities = torch.compile(lambda t: model(t).softmax(-1), backend="eager", fullgraph=True)
    x = torch.randn(4, 4)
    spans.clear()
    torch.testing.assert_close(probabilities(x), model(x).softmax(-1))
    assert sum(counters["graph_break"].values()) == 0
    # The eager call of the model makes its span; the compiled function's makes none.
    assert len(spans.get(semconv.SPAN_INFERENCE)) == 1


def test_an_error_in_a_compiled_call_ends_its_span(spans: SpanList) -> None:
    model = otel_dl.watch(mlp().eval(), name="compiled")
    model.compile(backend="eager")
    spans.clear()
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 5))  # the wrong width
    (call,) = spans.get(semconv.SPAN_INFERENCE)
    assert call.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize("watched", [True, False])
def test_a_compiled_wrapper_put_in_eval_traces_the_model_it_wraps(
    watched: bool, spans: SpanList
) -> None:
    """``torch.compile(model)`` first, then ``train()``/``eval()`` on the wrapper, as a
    training script does: the spans are the model's (its watch name and version, else
    its class), not the wrapper's, and its hooks stay out of the compiled graph."""
    model = mlp()
    if watched:
        model = otel_dl.watch(model, name="clf", version="3")
    compiled = torch.compile(model, backend="eager")
    compiled.train()
    compiled(torch.randn(4, 4)).sum().backward()
    compiled.eval()
    x = torch.randn(4, 4)
    assert torch._dynamo.explain(compiled)(x).graph_break_count == 0
    spans.clear()
    with torch.no_grad():
        compiled(x)
    (call,) = spans.get(semconv.SPAN_INFERENCE)
    assert call.attributes[semconv.DL_MODEL_NAME] == ("clf" if watched else "Sequential")
    assert call.attributes.get(semconv.DL_MODEL_VERSION) == ("3" if watched else None)


def test_uninstrument_removes_hooks(handle: otel_dl.Instrumentation, spans: SpanList) -> None:
    model = otel_dl.watch(mlp().eval())
    handle.shutdown()
    model(torch.randn(2, 4))
    assert spans.get() == []
    assert not model._forward_hooks


def test_traced_model_can_still_be_scripted_traced_and_exported(spans: SpanList) -> None:
    model = mlp().eval()  # eval() under instrumentation: the model is traced
    x = torch.randn(3, 4)
    scripted = torch.jit.script(model)
    jit_traced = torch.jit.trace(model, x)
    exported = torch.export.export(model, (x,))
    for other in (scripted, jit_traced, exported.module()):
        torch.testing.assert_close(other(x), model(x))
    spans.clear()
    model(x)
    assert len(spans.get(semconv.SPAN_INFERENCE)) == 1, "hooks restored after scripting"


def test_a_jit_traced_module_makes_its_span(spans: SpanList) -> None:
    traced = torch.jit.trace(mlp().eval(), torch.randn(2, 4))
    otel_dl.watch(traced, name="traced-scorer")
    spans.clear()
    with torch.no_grad():
        traced(torch.randn(16, 4))
    (call,) = spans.get(semconv.SPAN_INFERENCE)
    assert call.attributes[semconv.DL_MODEL_NAME] == "traced-scorer"
    assert call.attributes[semconv.DL_PREDICTION_COUNT] == 16


def test_a_data_parallel_wrapper_is_the_model_it_runs(spans: SpanList, tmp_path: Path) -> None:
    """eval() on the DistributedDataParallel or DataParallel wrapper that user code calls:
    the spans carry the wrapped model's watch name, version and fingerprint (the
    wrapper's state_dict prefixes each key with ``module.``: the same weights served
    unwrapped would look like another model)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from otel_dl.provenance import model_fingerprint

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = otel_dl.watch(mlp(), name="fraud-mlp", version="7")
        for wrap in (DistributedDataParallel, torch.nn.DataParallel):
            wrapper = wrap(model)
            wrapper.eval()
            spans.clear()
            with torch.no_grad():
                wrapper(torch.randn(16, 4))
            (call,) = spans.get(semconv.SPAN_INFERENCE)
            assert call.attributes[semconv.DL_MODEL_NAME] == "fraud-mlp", wrap
            assert call.attributes[semconv.DL_MODEL_VERSION] == "7"
            assert call.attributes[semconv.DL_MODEL_FINGERPRINT] == model_fingerprint(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shape", ["tuple", "list", "loss first"])
def test_a_tuple_output_counts_and_scores_its_first_tensor(shape: str, spans: SpanList) -> None:
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()

        def forward(self, x: torch.Tensor) -> object:
            logits = self.body(x)
            if shape == "tuple":
                return logits, x
            if shape == "list":
                return [logits, x]
            return logits.sum(), logits  # a 0-d loss first: not the predictions

    model = otel_dl.watch(TwoHeads().eval())
    spans.clear()
    with torch.no_grad():
        model(torch.randn(20, 4))
    (call,) = spans.get(semconv.SPAN_INFERENCE)
    assert call.attributes[semconv.DL_PREDICTION_COUNT] == 20
    assert 0 < call.attributes[semconv.DL_CONFIDENCE_MEAN] <= 1


def test_trace_training_traces_a_model_only_ever_trained_and_eval_fingerprints_the_new_weights(
    spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from otel_dl import _config

    monkeypatch.setattr(_config, "_active", replace(_config.get_config(), trace_training=True))
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    fingerprints = []
    for _epoch in range(2):
        model.train()
        spans.clear()
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
        assert len(spans.get(semconv.SPAN_INFERENCE)) == 3  # every training forward
        model.eval()
        spans.clear()
        with torch.no_grad():
            model(torch.randn(8, 4))
        (call,) = spans.get(semconv.SPAN_INFERENCE)
        fingerprints.append(call.attributes[semconv.DL_MODEL_FINGERPRINT])
    assert fingerprints[0] != fingerprints[1]  # the second epoch's weights


@pytest.mark.parametrize("targets", [1, 3])
def test_a_regressor_watched_with_confidence_false_gets_no_confidence(
    targets: int, spans: SpanList
) -> None:
    """A regressor's values read as logits give a healthy model low confidence on every
    call (values near 0 are a sigmoid of 0.5); ``confidence=False`` says they are values."""
    torch.manual_seed(0)
    regressor = torch.nn.Linear(4, targets).eval()
    guessed = otel_dl.watch(torch.nn.Linear(4, targets).eval(), name="guessed")
    otel_dl.watch(regressor, name="regressor", confidence=False)
    with torch.no_grad():
        regressor(torch.randn(16, 4))
        guessed(torch.randn(16, 4))
    by_name = {s.attributes[semconv.DL_MODEL_NAME]: s for s in spans.get(semconv.SPAN_INFERENCE)}
    assert semconv.DL_CONFIDENCE_MEAN in by_name["guessed"].attributes  # read as logits
    attrs = by_name["regressor"].attributes
    assert not any(key.startswith("dl.confidence.") for key in attrs)
    assert attrs[semconv.DL_PREDICTION_COUNT] == 16
    assert semconv.DL_QUALITY_NAN_FRACTION in attrs  # the input's signals stay


def test_watch_refuses_a_confidence_that_is_not_a_bool() -> None:
    with pytest.raises(TypeError, match="confidence=False"):
        otel_dl.watch(mlp(), confidence="no")  # type: ignore[arg-type]


def _iris() -> tuple[torch.Tensor, torch.nn.Module]:
    """scikit-learn's iris as float32 rows, and a small classifier trained on them."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    rows = torch.tensor(x, dtype=torch.float32)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(rows), torch.tensor(y)).backward()
        optimizer.step()
    return rows, model


def test_an_unbatched_example_is_one_row(spans: SpanList) -> None:
    """torch's layers read a 1-D input as one example without a batch dimension
    (``nn.Linear`` takes ``(in,)`` and returns ``(out,)``): its span is a batch of one,
    judged against the reference's four features, with the confidence of its one
    prediction, as the same flower sent as a batch of one is. It used to be four rows of
    one feature: a schema mismatch, out of range and three predictions on every call."""
    rows, model = _iris()
    otel_dl.watch(model.eval(), name="iris", reference=otel_dl.Reference.fit(rows.numpy()))
    with torch.no_grad():
        alone = model(rows[7])
        batched = model(rows[7:8])
    assert torch.equal(alone, batched[0])  # the user's result is unchanged
    unbatched_span, batch_span = spans.get(semconv.SPAN_INFERENCE)
    for key in (
        semconv.DL_BATCH_SIZE,
        semconv.DL_PREDICTION_COUNT,
        semconv.DL_QUALITY_SCHEMA_MISMATCH,
        semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION,
        semconv.DL_CONFIDENCE_ROWS,
        semconv.DL_CONFIDENCE_MEAN,
        semconv.DL_DATA_FINGERPRINT,
    ):
        assert unbatched_span.attributes[key] == batch_span.attributes[key], key
    assert unbatched_span.attributes[semconv.DL_BATCH_SIZE] == 1
    assert unbatched_span.attributes[semconv.DL_QUALITY_SCHEMA_MISMATCH] is False


class _Scalars(torch.nn.Module):
    """A model of one value per example, given as a 1-D batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.unsqueeze(1))


def test_a_1d_batch_of_scalars_stays_a_batch(spans: SpanList) -> None:
    """A 1-D float tensor is a batch, not one example, when a DataLoader made it (a
    dataset of scalars) or when the model's reference has a single feature."""
    from torch.utils.data import DataLoader, TensorDataset

    values = torch.randn(64)
    from_loader = otel_dl.watch(_Scalars().eval(), name="from-loader")
    with torch.no_grad():
        for (batch,) in DataLoader(TensorDataset(values), batch_size=16):
            from_loader(batch)
    referenced = otel_dl.watch(
        _Scalars().eval(), name="referenced", reference=otel_dl.Reference.fit(values)
    )
    with torch.no_grad():
        referenced(values[:16])
    by_model = [
        (s.attributes[semconv.DL_MODEL_NAME], s.attributes[semconv.DL_BATCH_SIZE])
        for s in spans.get(semconv.SPAN_INFERENCE)
    ]
    assert by_model == [("from-loader", 16)] * 4 + [("referenced", 16)]
    referenced_span = spans.get(semconv.SPAN_INFERENCE)[-1]
    assert referenced_span.attributes[semconv.DL_QUALITY_SCHEMA_MISMATCH] is False
    assert referenced_span.attributes[semconv.DL_PREDICTION_COUNT] == 16
