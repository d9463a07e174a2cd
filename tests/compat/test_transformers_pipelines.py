"""The transformers instrumentor on Hugging Face pipelines of several tasks.

Every pipeline is transformers' own, built from a tiny random configuration with a
tokenizer or image processor made here, so nothing reaches the Hub. Each call is made
under OpenTelemetry's ``suppress_instrumentation()`` (the uninstrumented result) and
traced, with every otel-dl instrumentor on (torch and DataLoader included, as with a
plain ``otel_dl.instrument()``): the traced call must make exactly one span, return the
same answer and count no internal error.
"""

from __future__ import annotations

import os

# Set before transformers and huggingface_hub read it: these tests must never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from PIL import Image
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    Pipeline,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import otel_dl
from otel_dl import semconv
from tests.support import (
    TINY_WORDS,
    InternalErrors,
    SpanList,
    tiny_bert_classifier,
    tiny_tokenizer,
)

LABELS = ["negative", "neutral", "positive"]
NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}


@pytest.fixture(scope="module", autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    assert {"otel_dl_transformers", "otel_dl_torch_model"} <= set(h.instrumented)
    yield h
    h.shutdown()


def _bert_config(**kwargs: Any) -> BertConfig:
    torch.manual_seed(0)
    return BertConfig(
        vocab_size=len(TINY_WORDS) + 1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        **kwargs,
    )


def _text_classifier() -> Pipeline:
    model = tiny_bert_classifier(num_labels=3)
    model.config.id2label = dict(enumerate(LABELS))
    return pipeline("text-classification", model=model, tokenizer=tiny_tokenizer())


def _multi_label_classifier() -> Pipeline:
    config = _bert_config(num_labels=3, problem_type="multi_label_classification")
    model = BertForSequenceClassification(config).eval()
    return pipeline("text-classification", model=model, tokenizer=tiny_tokenizer())


def _token_classifier() -> Pipeline:
    model = BertForTokenClassification(_bert_config(num_labels=3)).eval()
    return pipeline("token-classification", model=model, tokenizer=tiny_tokenizer())


def _fill_mask() -> Pipeline:
    model = BertForMaskedLM(_bert_config()).eval()
    return pipeline("fill-mask", model=model, tokenizer=tiny_tokenizer(mask=True))


def _zero_shot() -> Pipeline:
    config = _bert_config(
        num_labels=3, id2label=NLI_LABELS, label2id={v: k for k, v in NLI_LABELS.items()}
    )
    model = BertForSequenceClassification(config).eval()
    return pipeline("zero-shot-classification", model=model, tokenizer=tiny_tokenizer())


def _image_classifier() -> Pipeline:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
    )
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    model = ViTForImageClassification(config).eval()
    return pipeline("image-classification", model=model, image_processor=processor)


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)
    ]


# id, pipeline factory, arguments of the call, keyword arguments, predictions, confidence
CASES: list[tuple[str, Callable[[], Pipeline], tuple[Any, ...], dict[str, Any], int, bool]] = [
    ("text-classification", _text_classifier, ("good movie",), {}, 1, True),
    (
        "text-classification-batch",
        _text_classifier,
        (["good movie", "bad", "the movie is very bad"],),
        {"batch_size": 2, "top_k": None},
        3,
        True,
    ),
    # Sigmoid scores per label are not one distribution over the labels.
    ("text-classification-multi-label", _multi_label_classifier, ("good movie",), {}, 1, False),
    (
        "text-classification-sigmoid",
        _text_classifier,
        ("good movie",),
        {"function_to_apply": "sigmoid", "top_k": None},
        1,
        False,
    ),
    # One answer per token: token logits are not one row of class scores per prediction.
    ("token-classification", _token_classifier, ("the movie is good",), {}, 1, False),
    (
        "token-classification-grouped",
        _token_classifier,
        (["the movie is good", "bad movie"],),
        {"aggregation_strategy": "simple"},
        2,
        False,
    ),
    # The top-k words over the vocabulary are a truncated distribution.
    ("fill-mask", _fill_mask, ("the movie is [MASK]",), {"top_k": 3}, 1, False),
    (
        "zero-shot-classification",
        _zero_shot,
        ("a very good movie",),
        {"candidate_labels": ["good", "bad", "movie"]},
        1,
        True,
    ),
    (
        "zero-shot-classification-batch",
        _zero_shot,
        (["a very good movie", "bad"],),
        {"candidate_labels": ["good", "bad"]},
        2,
        True,
    ),
    # Independent per-label probabilities, not one distribution.
    (
        "zero-shot-classification-multi-label",
        _zero_shot,
        ("a very good movie",),
        {"candidate_labels": ["good", "bad", "movie"], "multi_label": True},
        1,
        False,
    ),
    ("image-classification", _image_classifier, (_images(1)[0],), {}, 1, True),
    (
        "image-classification-batch",
        _image_classifier,
        (_images(3),),
        {"batch_size": 2, "top_k": 2},
        3,
        True,
    ),
]


def _one_span(spans: SpanList) -> ReadableSpan:
    got = spans.get()
    assert [s.name for s in got] == [semconv.SPAN_INFERENCE]
    return got[0]


@pytest.mark.parametrize(
    ("case", "make", "args", "kwargs", "predictions", "confidence"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_pipeline(
    case: str,
    make: Callable[[], Pipeline],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    predictions: int,
    confidence: bool,
    spans: SpanList,
) -> None:
    pipe = make()
    errors = InternalErrors()
    with suppress_instrumentation():
        expected = pipe(*args, **kwargs)
    assert spans.get() == []
    got = pipe(*args, **kwargs)
    assert got == expected
    span = _one_span(spans)
    attrs = span.attributes
    assert errors.new() == {}
    assert span.status.status_code is StatusCode.UNSET
    assert attrs[semconv.DL_COMPONENT] == "transformers"
    assert attrs[semconv.DL_MODEL_TASK] == pipe.task
    assert attrs[semconv.DL_MODEL_NAME] == type(pipe.model).__name__
    assert len(attrs[semconv.DL_MODEL_FINGERPRINT]) == 32
    assert attrs[semconv.DL_PREDICTION_COUNT] == predictions
    # The signal is there exactly where the output is one distribution per prediction.
    assert (semconv.DL_CONFIDENCE_MEAN in attrs) is confidence
    if confidence:
        assert 0.0 < attrs[semconv.DL_CONFIDENCE_MIN] <= attrs[semconv.DL_CONFIDENCE_MEAN] <= 1.0


def _top_scores(answer: Any) -> list[float]:
    """The best score of each prediction of a classification answer."""
    rows = answer if isinstance(answer, list) and isinstance(answer[0], list) else [answer]
    return [max(a["score"] for a in row) if isinstance(row, list) else row["score"] for row in rows]


@pytest.mark.parametrize("case", ["text-classification-batch", "image-classification-batch"])
def test_confidence_is_the_answers_top_score(case: str, spans: SpanList) -> None:
    _id, make, args, kwargs, _predictions, _confidence = next(c for c in CASES if c[0] == case)
    answer = make()(*args, **kwargs)
    attrs = _one_span(spans).attributes
    top = _top_scores(answer)
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(np.mean(top), rel=1e-5)
    assert attrs[semconv.DL_CONFIDENCE_MIN] == pytest.approx(min(top), rel=1e-5)


def test_zero_shot_confidence_is_the_best_label_score(spans: SpanList) -> None:
    answer = _zero_shot()("a very good movie", candidate_labels=["good", "bad", "movie"])
    attrs = _one_span(spans).attributes
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(max(answer["scores"]), rel=1e-5)
