"""The transformers instrumentor on real tiny pipelines, built here with no network."""

from __future__ import annotations

import os

# Set before transformers and huggingface_hub read it: these tests must never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode
from transformers import (
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    pipeline,
)

import otel_dl
from otel_dl import semconv
from otel_dl.instrumentors.transformers import TransformersInstrumentor
from tests.support import (
    TINY_WORDS,
    InternalErrors,
    SpanList,
    broken_extractor,
    tiny_bert_classifier,
    tiny_tokenizer,
)

PAD, SEP = 0, 3
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved where the Hub cache would put commit COMMIT."""
    path = tmp_path_factory.mktemp("hub") / "snapshots" / COMMIT
    tiny_bert_classifier(num_labels=3).save_pretrained(path)
    return path


@pytest.fixture
def classify(classifier_dir: Path, tokenizer: PreTrainedTokenizerFast):
    model = BertForSequenceClassification.from_pretrained(classifier_dir)
    return pipeline("text-classification", model=model, tokenizer=tokenizer)


@pytest.fixture
def generate(tokenizer: PreTrainedTokenizerFast):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(TINY_WORDS),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        bos_token_id=SEP,
        eos_token_id=SEP,
        pad_token_id=PAD,
    )
    return pipeline("text-generation", model=GPT2LMHeadModel(config).eval(), tokenizer=tokenizer)


def test_classification_span_with_provenance_and_confidence(
    spans: SpanList, tracer, classify, classifier_dir: Path
) -> None:
    with tracer.start_as_current_span("request") as request:
        (answer,) = classify("good movie")
    # The model's forward makes no span of its own.
    assert sorted(s.name for s in spans.get()) == ["inference", "request"]
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    assert span.name == semconv.SPAN_INFERENCE
    assert span.parent.span_id == request.get_span_context().span_id
    attrs = span.attributes
    assert attrs[semconv.DL_STAGE] == "inference"
    assert attrs[semconv.DL_COMPONENT] == "transformers"
    assert attrs[semconv.DL_MODEL_FRAMEWORK] == "transformers"
    assert attrs[semconv.DL_MODEL_TASK] == "text-classification"
    assert attrs[semconv.DL_MODEL_NAME] == str(classifier_dir)
    assert attrs[semconv.DL_MODEL_PATH] == str(classifier_dir)
    assert attrs[semconv.DL_MODEL_VERSION] == COMMIT
    assert len(attrs[semconv.DL_MODEL_FINGERPRINT]) == 32
    assert attrs[semconv.DL_PREDICTION_COUNT] == 1
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(answer["score"], rel=1e-5)
    assert semconv.DL_CONFIDENCE_MARGIN_MEAN in attrs
    assert semconv.DL_CONFIDENCE_ENTROPY_MEAN in attrs


def test_batched_list_makes_one_span(spans: SpanList, classify) -> None:
    answers = classify(["good movie", "bad", "the movie is very bad"], batch_size=2)
    (span,) = spans.get()  # nor does the pipeline's DataLoader
    scores = [a["score"] for a in answers]
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 3
    assert span.attributes[semconv.DL_CONFIDENCE_MIN] == pytest.approx(min(scores), rel=1e-5)
    assert span.attributes[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(sum(scores) / 3, rel=1e-5)


def test_a_watched_model_called_directly_takes_confidence_from_its_logits(
    spans: SpanList, classifier_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Serving code often calls the model itself, ``model(**tokens).logits``: the span reads
    the ``logits`` of its ModelOutput, and the batch size from the token ids."""
    model = otel_dl.watch(BertForSequenceClassification.from_pretrained(classifier_dir).eval())
    tokens = tokenizer(
        ["good movie", "bad", "the movie is very bad"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = model(**tokens).logits
    (span,) = spans.get(semconv.SPAN_INFERENCE)
    attrs = span.attributes
    top = torch.softmax(logits, dim=1).max(dim=1).values
    assert attrs[semconv.DL_BATCH_SIZE] == 3
    assert attrs[semconv.DL_PREDICTION_COUNT] == 3
    assert attrs[semconv.DL_CONFIDENCE_ROWS] == 3
    assert attrs[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(top.mean().item(), rel=1e-5)
    assert attrs[semconv.DL_CONFIDENCE_MIN] == pytest.approx(top.min().item(), rel=1e-5)
    with torch.inference_mode():
        hidden = model.bert(**tokens)  # no logits: no confidence, and nothing else breaks
    assert hidden.last_hidden_state.shape[0] == 3


def test_watch_names_the_pipeline(spans: SpanList, classify) -> None:
    otel_dl.watch(classify, name="sentiment", version="2026-11", team="nlp")
    classify("bad movie")
    (span,) = spans.get()
    assert span.attributes[semconv.DL_MODEL_NAME] == "sentiment"
    assert span.attributes[semconv.DL_MODEL_VERSION] == "2026-11"
    assert span.attributes["team"] == "nlp"


def test_a_pipelines_shared_attributes_follow_watch_and_new_weights(
    spans: SpanList, classify
) -> None:
    """The attributes every call of a pipeline shares are built once, and again when
    ``watch`` names it anew or its model's weights change."""
    classify("bad movie")
    classify("good movie")
    otel_dl.watch(classify, name="sentiment", version="3")
    classify("bad movie")
    with torch.no_grad():
        weights = {k: v + 0.5 for k, v in classify.model.state_dict().items()}
    classify.model.load_state_dict(weights)
    classify("bad movie")
    first, second, named, reloaded = spans.get(semconv.SPAN_INFERENCE)
    fingerprint = semconv.DL_MODEL_FINGERPRINT
    assert first.attributes[semconv.DL_MODEL_NAME] == second.attributes[semconv.DL_MODEL_NAME]
    assert first.attributes[fingerprint] == second.attributes[fingerprint]
    assert named.attributes[semconv.DL_MODEL_NAME] == "sentiment"
    assert named.attributes[semconv.DL_MODEL_VERSION] == "3"
    assert named.attributes[fingerprint] == first.attributes[fingerprint]
    assert reloaded.attributes[semconv.DL_MODEL_NAME] == "sentiment"
    assert reloaded.attributes[fingerprint] != first.attributes[fingerprint]
    assert reloaded.attributes[semconv.DL_MODEL_TASK] == "text-classification"


def test_a_model_watched_with_confidence_false_gets_none(spans: SpanList, classify) -> None:
    otel_dl.watch(classify.model, confidence=False)
    classify(["bad movie", "good movie"])
    (span,) = spans.get()
    assert not any(key.startswith("dl.confidence.") for key in span.attributes)
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 2


def test_text_generation_uses_gen_ai_attributes(spans: SpanList, generate) -> None:
    (answer,) = generate("good movie", max_new_tokens=6, do_sample=False)
    (span,) = spans.get()  # one span for the whole generation, not one per token
    attrs = span.attributes
    assert attrs[semconv.DL_MODEL_TASK] == "text-generation"
    assert attrs[semconv.GEN_AI_OPERATION_NAME] == "text_completion"
    assert attrs[semconv.GEN_AI_REQUEST_MODEL] == "GPT2LMHeadModel"
    assert attrs[semconv.GEN_AI_REQUEST_MAX_TOKENS] == 6
    assert attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] == 2
    with suppress_instrumentation():
        prompt = torch.tensor([[TINY_WORDS.index("good"), TINY_WORDS.index("movie")]])
        new = generate.model.generate(prompt, max_new_tokens=6, do_sample=False)[0, 2:].tolist()
    expected = new.index(SEP) + 1 if SEP in new else len(new)
    assert attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == expected
    assert attrs[semconv.DL_PREDICTION_COUNT] == 1
    assert answer["generated_text"].startswith("good movie")


def test_generate_called_directly_is_one_span(spans: SpanList, generate) -> None:
    """Serving code that tokenizes itself calls ``model.generate``: one span for the
    generation, with the GenAI attributes, not one model span per decoding step."""
    model = otel_dl.watch(generate.model, name="writer", version="3")
    prompt = torch.tensor([[TINY_WORDS.index("good"), TINY_WORDS.index("movie")]] * 2)
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    (span,) = spans.get()
    attrs = span.attributes
    assert (attrs[semconv.DL_MODEL_NAME], attrs[semconv.DL_MODEL_VERSION]) == ("writer", "3")
    assert attrs[semconv.GEN_AI_OPERATION_NAME] == "text_completion"
    assert attrs[semconv.GEN_AI_REQUEST_MAX_TOKENS] == 5
    assert attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] == 4
    assert attrs[semconv.DL_PREDICTION_COUNT] == 2 == out.shape[0]
    assert attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == 10  # min_new_tokens: no early end
    with suppress_instrumentation():
        bare = generate.model.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(out, bare)


def test_token_counts_and_limits_are_those_the_generation_ran_with(
    spans: SpanList, generate, tokenizer: PreTrainedTokenizerFast
) -> None:
    """A stop token given per call (as Llama-3's cards say to) ends a row's count there,
    not at the padding after it; max_new_tokens set on the pipeline or in the model's
    generation_config is the request's max_tokens."""
    model = generate.model
    prompt = torch.tensor([[TINY_WORDS.index("good"), TINY_WORDS.index("movie")]])
    with suppress_instrumentation():
        first = int(model.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1])
        prompts = torch.tensor(
            [[TINY_WORDS.index("good"), TINY_WORDS.index("movie")], [PAD, TINY_WORDS.index("bad")]]
        )
        mask = (prompts != PAD).long()
        stops = [SEP, first]
        bare = model.generate(
            prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=stops
        )
    new = bare[:, 2:].tolist()
    expected = sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new)
    assert expected < bare[:, 2:].numel()  # a row stopped early and was padded
    spans.clear()
    out = model.generate(
        prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=stops
    )
    assert torch.equal(out, bare)
    (span,) = spans.get()
    assert span.attributes[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == expected

    built = pipeline("text-generation", model=model, tokenizer=tokenizer, max_new_tokens=4)
    spans.clear()
    built("good movie", do_sample=False)
    assert spans.get()[0].attributes[semconv.GEN_AI_REQUEST_MAX_TOKENS] == 4
    model.generation_config.max_new_tokens = 3
    try:
        spans.clear()
        model.generate(prompt, do_sample=False)
        assert spans.get()[0].attributes[semconv.GEN_AI_REQUEST_MAX_TOKENS] == 3
    finally:
        model.generation_config.max_new_tokens = None


def test_a_batch_of_conversations_is_a_chat(spans: SpanList, generate) -> None:
    chats = [[{"role": "user", "content": "good movie"}], [{"role": "user", "content": "bad"}]]
    tokenizer = generate.tokenizer  # the module's: its template is put back after
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    try:
        generate(chats, max_new_tokens=3, do_sample=False)
    finally:
        tokenizer.chat_template = None
    (span,) = spans.get()
    assert span.attributes[semconv.GEN_AI_OPERATION_NAME] == "chat"
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 2


def test_one_logit_is_read_as_a_logit_and_a_regression_gets_no_confidence(
    spans: SpanList, tokenizer: PreTrainedTokenizerFast
) -> None:
    """A one-label head's logits near 0 are a sigmoid near 0.5, an unsure model: read as
    probabilities (they lie in [0, 1]) they said 0.99. A regression head's outputs are
    values, not class scores."""
    model = tiny_bert_classifier(num_labels=1)
    with torch.no_grad():
        model.classifier.bias.fill_(0.02)  # every logit just above 0: inside [0, 1]
    texts = ["good movie", "bad movie", "good", "bad"]
    one = pipeline("text-classification", model=model, tokenizer=tokenizer)
    with suppress_instrumentation(), torch.no_grad():  # one text a call, as the pipeline
        logits = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits[:, 0] for t in texts])
    assert bool(((logits > 0) & (logits < 1)).all()), "the case: logits inside [0, 1]"
    one(texts)
    (span,) = spans.get()
    sigmoid = torch.sigmoid(logits)
    expected = torch.maximum(sigmoid, 1 - sigmoid).mean().item()
    assert span.attributes[semconv.DL_CONFIDENCE_MEAN] == pytest.approx(expected, rel=1e-5)
    spans.clear()
    model.config.problem_type = "regression"
    one(texts)
    (span,) = spans.get()
    assert semconv.DL_CONFIDENCE_MEAN not in span.attributes
    assert span.attributes[semconv.DL_PREDICTION_COUNT] == 4


def test_trainer_evaluation_and_prediction_make_a_span_per_batch_training_none(
    spans: SpanList, tmp_path: Path
) -> None:
    """transformers' Trainer: training steps make no inference span; each batch of its
    evaluation and prediction loops (the model in eval mode) makes one."""
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(
                5, len(TINY_WORDS), (8,), generator=torch.Generator().manual_seed(i)
            )
            mask = torch.ones(8, dtype=torch.long)
            return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % 3)}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=5,
        per_device_eval_batch_size=5,
        num_train_epochs=1,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    errors = InternalErrors()
    model = tiny_bert_classifier(num_labels=3)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens())
    trainer.train()
    evaluated = spans.get(semconv.SPAN_INFERENCE)
    assert len(evaluated) == 4  # one epoch's evaluation: 20 rows in batches of 5
    loaded = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert len(loaded) == 8 and {s.attributes[semconv.DL_BATCH_SIZE] for s in loaded} == {5}
    spans.clear()
    out = trainer.predict(Tokens())
    predicted = spans.get(semconv.SPAN_INFERENCE)
    assert [s.attributes[semconv.DL_PREDICTION_COUNT] for s in predicted] == [5] * 4
    assert out.predictions.shape == (20, 3)
    assert all(semconv.DL_CONFIDENCE_MEAN in s.attributes for s in predicted)
    assert errors.new() == {}


def test_user_errors_are_recorded_and_reraised_unchanged(spans: SpanList, classify) -> None:
    with suppress_instrumentation(), pytest.raises(Exception) as bare:
        classify(42)
    with pytest.raises(type(bare.value)) as got:
        classify(42)
    assert str(got.value) == str(bare.value)
    (span,) = spans.get()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == type(bare.value).__qualname__


def test_uninstrument_removes_the_spans(
    spans: SpanList, classify, handle: otel_dl.Instrumentation
) -> None:
    handle.shutdown()
    classify("good")
    assert spans.get() == []
    again = otel_dl.instrument()
    classify("good")
    assert len(spans.get()) == 1
    again.shutdown()


# --- One failed extractor costs only its own attributes ------------------------------------


@pytest.mark.parametrize(
    ("extractor", "kept", "dropped"),
    [
        ("_model_attributes", semconv.DL_CONFIDENCE_MEAN, semconv.DL_MODEL_TASK),
        ("_signals", semconv.DL_MODEL_TASK, semconv.DL_CONFIDENCE_MEAN),
    ],
)
def test_failing_extractor_keeps_the_span(
    spans: SpanList,
    classify,
    monkeypatch: pytest.MonkeyPatch,
    extractor: str,
    kept: str,
    dropped: str,
) -> None:
    with suppress_instrumentation():
        expected = classify(["good movie", "bad"])
    monkeypatch.setattr(TransformersInstrumentor, extractor, broken_extractor)
    errors = InternalErrors()
    assert classify(["good movie", "bad"]) == expected
    (span,) = spans.get()
    assert span.attributes[semconv.DL_COMPONENT] == "transformers"
    assert kept in span.attributes
    assert dropped not in span.attributes
    counted = errors.new()
    assert counted and all(site.startswith("transformers.pipeline") for site in counted)
