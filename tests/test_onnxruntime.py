"""The ONNX Runtime instrumentor on a real InferenceSession over a graph built here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode

import otel_dl
from otel_dl import semconv
from otel_dl.provenance import file_fingerprint
from otel_dl.reference import Reference
from tests.onnx_models import zipmap_classifier
from tests.support import SpanList

FEATURES, CLASSES = 4, 3


@pytest.fixture(autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def _classifier() -> onnx.ModelProto:
    """x (N, 4) -> softmax(x @ W + b) as "probs" (N, 3) and its argmax as "label" (N,)."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "scorer_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES]),
        ],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "classifier.onnx"
    onnx.save(_classifier(), str(path))
    return path


def _session(source: Path | bytes) -> ort.InferenceSession:
    source = str(source) if isinstance(source, Path) else source
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def test_one_span_with_model_provenance_and_confidence(
    spans: SpanList, tracer, model_file: Path
) -> None:
    session = _session(model_file)
    x = np.random.default_rng(1).normal(size=(64, FEATURES)).astype(np.float32)
    with tracer.start_as_current_span("request") as request:
        label, probs = session.run(None, {"x": x})
    got = spans.get(semconv.SPAN_INFERENCE)
    assert len(got) == 1
    attrs = got[0].attributes
    assert got[0].parent.span_id == request.get_span_context().span_id
    assert got[0].status.status_code is StatusCode.UNSET
    assert attrs[semconv.DL_STAGE] == "inference"
    assert attrs[semconv.DL_COMPONENT] == "onnxruntime"
    assert attrs[semconv.DL_MODEL_FRAMEWORK] == "onnxruntime"
    assert attrs[semconv.DL_MODEL_NAME] == "classifier"
    assert attrs[semconv.DL_MODEL_PATH] == str(model_file)
    assert attrs[semconv.DL_MODEL_FINGERPRINT] == file_fingerprint(model_file)
    assert list(attrs[semconv.DL_MODEL_EXECUTION_PROVIDERS]) == ["CPUExecutionProvider"]
    assert attrs[semconv.DL_BATCH_SIZE] == 64
    assert attrs[semconv.DL_PREDICTION_COUNT] == 64
    # The first call of a session: its confidence covers 16 evenly spaced predictions.
    sampled = probs[(np.arange(16) * 64) // 16].max(axis=1)
    assert attrs[semconv.DL_CONFIDENCE_ROWS] == 16
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(sampled.mean(), rel=1e-5)
    assert attrs[semconv.DL_CONFIDENCE_MIN] == pytest.approx(sampled.min(), rel=1e-5)
    # Every drift_every-th (8th) call covers all of them.
    for _ in range(7):
        session.run(None, {"x": x})
    eighth = spans.get(semconv.SPAN_INFERENCE)[-1].attributes
    assert eighth[semconv.DL_CONFIDENCE_ROWS] == 64
    assert eighth[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(probs.max(axis=1).mean(), rel=1e-5)
    assert semconv.DL_QUALITY_NAN_FRACTION in attrs
    assert semconv.DL_DATA_FINGERPRINT in attrs
    assert label.shape == (64,)


def test_zipmap_probabilities_give_the_confidence(spans: SpanList) -> None:
    weights = np.random.default_rng(2).normal(size=(CLASSES, FEATURES))
    session = _session(zipmap_classifier(weights))
    x = np.random.default_rng(1).normal(size=(256, FEATURES)).astype(np.float32)
    for _ in range(8):
        _, rows = session.run(None, {"x": x})
    probs = np.array([[row[k] for k in sorted(row)] for row in rows])
    got = [span.attributes for span in spans.get(semconv.SPAN_INFERENCE)]
    assert len(got) == 8
    sampled = probs[(np.arange(16) * 256) // 16].max(axis=1)
    assert got[0][semconv.DL_PREDICTION_COUNT] == 256
    assert got[0][semconv.DL_CONFIDENCE_ROWS] == 16
    assert got[0][semconv.DL_CONFIDENCE_MEAN] == pytest.approx(sampled.mean(), rel=1e-6)
    assert got[0][semconv.DL_CONFIDENCE_MIN] == pytest.approx(sampled.min(), rel=1e-6)
    assert got[7][semconv.DL_CONFIDENCE_ROWS] == 256  # every drift_every-th call: all rows
    assert got[7][semconv.DL_CONFIDENCE_MEAN] == pytest.approx(probs.max(axis=1).mean(), rel=1e-6)


def _linear(name: str, width: int, outputs: tuple[str, ...]) -> bytes:
    """x (N, 4) -> x @ W (N, width), given out under each name of ``outputs``."""
    rng = np.random.default_rng(1)
    weights = numpy_helper.from_array(rng.normal(size=(FEATURES, width)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"])]
    nodes += [helper.make_node("Identity", ["xw"], [out]) for out in outputs]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", width]) for out in outputs],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("outputs", "asked", "scored"),
    [
        (("sentence_embedding",), None, False),  # an encoder
        (("last_hidden_state", "pooler_output"), None, False),
        (("variable",), None, False),  # sklearn-onnx's regressor output
        (("logits",), None, True),  # logits: read as such
        (("output",), None, True),  # no name to go by: the last 2-D output, as logits
        (("logits", "embeddings"), ["embeddings"], False),  # only the embeddings asked for
        (("logits", "embeddings"), None, True),
    ],
)
def test_an_output_named_as_no_class_scores_gets_no_confidence(
    outputs: tuple[str, ...], asked: list[str] | None, scored: bool, spans: SpanList
) -> None:
    """An embedding, a hidden state or a regression read as logits gave a healthy model
    a low confidence on every call, which the collector's low-confidence mode flags."""
    session = _session(_linear("model", 16, outputs))
    session.run(asked, {"x": np.random.default_rng(2).normal(size=(8, FEATURES)).astype("f4")})
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert (semconv.DL_CONFIDENCE_MEAN in span.attributes) is scored
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 8


def test_the_class_scores_output_is_chosen_with_no_probability_check_it_does_not_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Which output holds the class scores: a ZipMap, else the last output whose rows are
    probabilities, else the last 2-D floating-point output not named as something else.
    With a single 2-D floating-point output (a network, or sklearn-onnx's labels beside
    its probabilities), only a name saying it is no class scores makes its values matter:
    otherwise it is chosen without reading them on the caller's path."""
    from otel_dl.instrumentors import onnxruntime as instrumentor

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3)).astype("f4")
    probs = np.full((4, 3), 1 / 3, "f4")
    labels = np.zeros(4, np.int64)
    zipmap = [{0: 0.5, 1: 0.5}] * 4
    pick = instrumentor._class_scores
    assert pick([logits], ["logits"]) is logits
    assert pick([labels, probs], ["label", "probabilities"]) is probs
    assert pick([probs, logits], ["probabilities", "logits"]) is probs  # probabilities win
    assert pick([logits, logits.copy()], None) is not logits  # the last one, as logits
    assert pick([zipmap, logits], None) is zipmap
    assert pick([labels, zipmap], ["label", "output_probability"]) is zipmap
    assert pick([logits], ["hidden_state"]) is None
    assert pick([probs], ["hidden_state"]) is probs  # its rows are probabilities
    assert pick([labels], ["label"]) is None

    def unneeded(scores: np.ndarray) -> bool:
        raise AssertionError("the probability check ran for a single candidate")

    monkeypatch.setattr(instrumentor, "looks_like_probabilities", unneeded)
    assert pick([logits], ["output"]) is logits
    assert pick([labels, probs], ["label", "probabilities"]) is probs


def test_session_from_bytes_and_run_with_ort_values(spans: SpanList) -> None:
    model_bytes = _classifier().SerializeToString()
    session = _session(model_bytes)
    x = np.ones((8, FEATURES), np.float32)
    outputs = session.run_with_ort_values(None, {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    session.run(["probs"], {"x": x})
    first, second = spans.get(semconv.SPAN_INFERENCE)
    assert outputs[1].numpy().shape == (8, CLASSES)
    for span in (first, second):
        assert semconv.DL_MODEL_PATH not in span.attributes
        assert span.attributes[semconv.DL_MODEL_NAME] == "scorer_graph"
        assert len(span.attributes[semconv.DL_MODEL_FINGERPRINT]) == 32
        assert span.attributes[semconv.DL_BATCH_SIZE] == 8
        assert span.attributes[semconv.DL_PREDICTION_COUNT] == 8
        assert semconv.DL_CONFIDENCE_MEAN in span.attributes
    assert (
        first.attributes[semconv.DL_MODEL_FINGERPRINT]
        == second.attributes[semconv.DL_MODEL_FINGERPRINT]
    )


def test_watch_names_the_model_and_drift_uses_the_reference(
    spans: SpanList, model_file: Path
) -> None:
    rng = np.random.default_rng(2)
    train = rng.normal(size=(2000, FEATURES)).astype(np.float32)
    session = otel_dl.watch(
        _session(model_file),
        name="fraud",
        version="7",
        reference=Reference.fit(train),
        features=["x"],
        team="risk",
    )
    for start in range(0, 512, 64):  # 64 rows a call: the 8th reaches drift_min_rows (500)
        session.run(None, {"x": train[start : start + 64]})
    shifted = train[:256].copy()
    shifted[:, 2] += 5.0
    for _ in range(8):  # the window is scored again on the 8th call after
        session.run(None, {"x": shifted})
    got = spans.get(semconv.SPAN_INFERENCE)
    ok, drifted = got[7], got[-1]
    assert ok.attributes[semconv.DL_MODEL_NAME] == "fraud"
    assert ok.attributes[semconv.DL_MODEL_VERSION] == "7"
    assert ok.attributes["team"] == "risk"
    assert ok.attributes[semconv.DL_DRIFT_STATUS] == "ok"
    assert drifted.attributes[semconv.DL_DRIFT_STATUS] == "alert"
    assert drifted.attributes[semconv.DL_DRIFT_FEATURE] == "2"
    assert drifted.attributes[semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] > 0


def test_user_error_is_recorded_and_reraised_unchanged(spans: SpanList, model_file: Path) -> None:
    session = _session(model_file)
    bad = {"x": np.ones((2, FEATURES + 1), np.float32)}
    with suppress_instrumentation(), pytest.raises(Exception) as bare:
        session.run(None, bad)
    assert spans.get() == []
    with pytest.raises(type(bare.value)) as got:
        session.run(None, bad)
    assert str(got.value) == str(bare.value)
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == type(bare.value).__qualname__
    assert span.events[0].name == "exception"


def test_uninstrument_removes_the_spans(
    spans: SpanList, model_file: Path, handle: otel_dl.Instrumentation
) -> None:
    session = _session(model_file)
    x = np.ones((4, FEATURES), np.float32)
    handle.shutdown()
    session.run(None, {"x": x})
    assert spans.get() == []
    again = otel_dl.instrument()
    session.run(None, {"x": x})
    assert len(spans.get(semconv.SPAN_INFERENCE)) == 1
    again.shutdown()


def test_a_session_watched_with_confidence_false_gets_none(spans: SpanList) -> None:
    """An output with no telling name (a torch export's ``output``) is read as logits;
    ``watch(session, confidence=False)`` says it is a regression, and the span keeps only
    the prediction count."""
    session = otel_dl.watch(_session(_linear("model", 2, ("output",))), confidence=False)
    session.run(None, {"x": np.random.default_rng(3).normal(size=(8, FEATURES)).astype("f4")})
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert not any(key.startswith("dl.confidence.") for key in span.attributes)
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 8
