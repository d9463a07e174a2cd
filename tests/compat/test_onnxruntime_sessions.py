"""The ONNX Runtime instrumentor on the ways ONNX Runtime runs a model.

One graph, built here with ``onnx.helper``, with two inputs (int64 token ids first, then
float features) and three outputs (class probabilities, hidden features, the ids
doubled), run from a session made from a path and from bytes, through ``run`` (all
outputs or some), ``run_with_ort_values`` and ``run_with_iobinding``. Each run is made
under OpenTelemetry's ``suppress_instrumentation()`` (the uninstrumented result) and
traced: the traced one must make exactly one span, give identical outputs and count no
internal error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode

import otel_dl
from otel_dl import semconv
from tests.support import InternalErrors, SpanList

ROWS, FEATURES, CLASSES, VOCAB = 5, 4, 3, 10


def _graph() -> onnx.ModelProto:
    """ids (N,) int64 and x (N, 4) float -> probs (N, 3), hidden (N, 4), ids2 (N,)."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(VOCAB, FEATURES)).astype(np.float32), "E")
    weights = numpy_helper.from_array(rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "W")
    two = numpy_helper.from_array(np.array(2, dtype=np.int64), "two")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["embedded"], axis=0),
        helper.make_node("Add", ["embedded", "x"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("Mul", ["ids", "two"], ["ids2"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_in_three_out",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES]),
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", FEATURES]),
            helper.make_tensor_value_info("ids2", TensorProto.INT64, ["N"]),
        ],
        initializer=[table, weights, two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module", autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument(include=["onnxruntime"])
    assert "otel_dl_onnxruntime" in h.instrumented
    yield h
    h.shutdown()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "two_in_three_out.onnx"
    onnx.save(_graph(), str(path))
    return path


def _feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "ids": rng.integers(0, VOCAB, ROWS).astype(np.int64),
        "x": rng.normal(size=(ROWS, FEATURES)).astype(np.float32),
    }


def _session(model_file: Path, source: str) -> ort.InferenceSession:
    model: str | bytes = str(model_file) if source == "path" else model_file.read_bytes()
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _run_all(session: ort.InferenceSession) -> list[Any]:
    return session.run(None, _feed())


def _run_some(session: ort.InferenceSession) -> list[Any]:
    return session.run(["ids2", "probs"], _feed())


def _run_ort_values(session: ort.InferenceSession) -> list[Any]:
    feed = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in _feed().items()}
    outputs = session.run_with_ort_values(["probs", "hidden", "ids2"], feed)
    return [value.numpy() for value in outputs]


def _run_iobinding(session: ort.InferenceSession) -> list[Any]:
    binding = session.io_binding()
    for name, value in _feed().items():
        binding.bind_cpu_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


RUNS: dict[str, Callable[[ort.InferenceSession], list[Any]]] = {
    "run": _run_all,
    "run-some-outputs": _run_some,
    "run_with_ort_values": _run_ort_values,
    "run_with_iobinding": _run_iobinding,
}


@pytest.mark.parametrize("source", ["path", "bytes"])
@pytest.mark.parametrize("how", list(RUNS))
def test_session(model_file: Path, source: str, how: str, spans: SpanList) -> None:
    session = _session(model_file, source)
    run = RUNS[how]
    errors = InternalErrors()
    with suppress_instrumentation():
        expected = run(session)
    assert spans.get() == []
    got = run(session)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)
    got_spans = spans.get()
    assert [s.name for s in got_spans] == [semconv.SPAN_INFERENCE]
    (span,) = got_spans
    attrs = span.attributes
    assert errors.new() == {}
    assert span.status.status_code is StatusCode.UNSET
    assert attrs[semconv.DL_COMPONENT] == "onnxruntime"
    assert attrs[semconv.DL_MODEL_FRAMEWORK] == "onnxruntime"
    assert len(attrs[semconv.DL_MODEL_FINGERPRINT]) >= 16
    if source == "path":
        assert attrs[semconv.DL_MODEL_PATH] == str(model_file)
    else:
        assert semconv.DL_MODEL_PATH not in attrs
    assert attrs[semconv.DL_PREDICTION_COUNT] == ROWS


@pytest.mark.parametrize("how", list(RUNS))
def test_confidence_comes_from_the_probabilities(
    model_file: Path, how: str, spans: SpanList
) -> None:
    # The probabilities are one of several outputs, and not the last 2-D float one: the
    # hidden features are. Confidence must be the probabilities', not the features' read
    # as logits.
    outputs = RUNS[how](_session(model_file, "path"))
    (probs,) = [o for o in outputs if o.ndim == 2 and o.shape[1] == CLASSES]
    (span,) = spans.get()
    top = probs.max(axis=1)
    assert span.attributes[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(top.mean(), rel=1e-6)
    assert span.attributes[semconv.DL_CONFIDENCE_MIN] == pytest.approx(top.min(), rel=1e-6)


def test_fingerprint_is_the_same_from_path_and_bytes(model_file: Path, spans: SpanList) -> None:
    for source in ("path", "bytes"):
        _run_all(_session(model_file, source))
    by_path, by_bytes = spans.get()
    fingerprint = semconv.DL_MODEL_FINGERPRINT
    assert by_path.attributes[fingerprint] == by_bytes.attributes[fingerprint]


def test_int64_first_input_is_the_observed_batch(model_file: Path, spans: SpanList) -> None:
    _run_all(_session(model_file, "path"))
    (span,) = spans.get()
    # The first declared input is the int64 ids: it sets the batch size.
    assert span.attributes[semconv.DL_BATCH_SIZE] == ROWS
