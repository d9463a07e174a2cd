"""Shared test support: one in-memory SDK pipeline, set globally once per test process.

OpenTelemetry allows the global providers to be set only once per process, so every test
reads the same in-memory exporter and metric reader; the ``spans`` fixture (conftest.py)
clears them around each test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_dl import _burst

EXPORTER = InMemorySpanExporter()
METRIC_READER = InMemoryMetricReader()
_RESOURCE = Resource.create({"service.name": "otel-dl-tests"})
TRACER_PROVIDER = TracerProvider(resource=_RESOURCE)
TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(TRACER_PROVIDER)
metrics.set_meter_provider(MeterProvider(resource=_RESOURCE, metric_readers=[METRIC_READER]))


class SpanList:
    """Finished spans of the current test."""

    def get(self, name: str | None = None) -> list[ReadableSpan]:
        _burst.drain()  # small calls' spans end once their burst is profiled
        found = list(EXPORTER.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def clear(self) -> None:
        _burst.drain()  # parked spans of earlier calls end now, then go with the rest
        EXPORTER.clear()


def metric_points(name: str) -> list[object]:
    """Data points recorded so far for the metric ``name``."""
    data = METRIC_READER.get_metrics_data()
    points: list[object] = []
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points


def feast_driver_repo(root: Path, project: str) -> Any:
    """A real Feast repository on SQLite in ``root``, over ``root/drivers.parquet``
    (columns driver_id, conv_rate, trips, city, event_timestamp, created): the entity
    ``driver``, the view ``driver_stats`` (1-day TTL) and the service ``driver_service``,
    applied. Feast is imported here, not at module level: most tests do not need it."""
    import datetime as dt

    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource
    from feast.types import Float32, Int64, String
    from feast.value_type import ValueType

    (root / "feature_store.yaml").write_text(
        f"project: {project}\nregistry: {root / 'registry.db'}\nprovider: local\n"
        f"online_store:\n  type: sqlite\n  path: {root / 'online.db'}\n"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    repo = FeatureStore(repo_path=str(root))
    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
    view = FeatureView(
        name="driver_stats",
        entities=[driver],
        ttl=dt.timedelta(days=1),
        schema=[
            Field(name="conv_rate", dtype=Float32),
            Field(name="trips", dtype=Int64),
            Field(name="city", dtype=String),
        ],
        source=FileSource(
            path=str(root / "drivers.parquet"),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        ),
    )
    repo.apply([driver, view, FeatureService(name="driver_service", features=[view])])
    return repo


# The tiny Hugging Face parts: built in the test, so no test ever reaches the Hub.
TINY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "very", "the", "is", "a"]


def tiny_tokenizer(mask: bool = False) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``TINY_WORDS``, built locally; with
    ``mask``, a ``[MASK]`` token follows them (fill-mask needs one). Its decoder joins
    words with spaces (grouped token classification in transformers 4.40 needs one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*TINY_WORDS, "[MASK]"] if mask else list(TINY_WORDS)
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.decoder = decoders.WordPiece()
    special = {"mask_token": "[MASK]"} if mask else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        **special,
    )


def tiny_bert_classifier(num_labels: int) -> Any:
    """A one-layer ``BertForSequenceClassification`` over ``TINY_WORDS``, seeded, in eval
    mode."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(TINY_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


class InternalErrors:
    """otel-dl internal errors counted since this object was made, per site.

    ``otel_dl.internal_error_counts()`` is cumulative over the test process, so a test
    reads the difference."""

    def __init__(self) -> None:
        import otel_dl

        self._counts = otel_dl.internal_error_counts
        self._start = self._counts()

    def new(self) -> dict[str, int]:
        now = self._counts()
        return {
            site: count - self._start.get(site, 0)
            for site, count in now.items()
            if count != self._start.get(site, 0)
        }


def broken_extractor(*_args: object, **_kwargs: object) -> None:
    """Stands in for an instrumentor's extractor that has a bug."""
    raise RuntimeError("extractor bug")


def promql_parts(tree: Any) -> tuple[list[Any], set[str]]:
    """The vector selectors of a parsed PromQL expression (``promql_parser.parse``) and
    the labels its aggregations group by."""
    import promql_parser

    selectors: list[Any] = []
    groupings: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            groupings.update(node.modifier.labels)
        return True

    promql_parser.walk(tree, visit)
    return selectors, groupings
