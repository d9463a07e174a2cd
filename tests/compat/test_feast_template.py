"""The Feast instrumentor on the repository Feast itself ships: ``feast init``, ``feast
apply``, then the calls of the template's own ``test_workflow.py``, fully offline.

The template has an on-demand feature view, a push source and a label view, but no stream
feature view: one over the template's push source is appended to its definitions before
``feast apply``, so all four kinds of view are traced. Nothing else is added or mocked.

The template's workflow functions print their results rather than return them, so the
tests that compare results make the same calls directly, once under OpenTelemetry's
``suppress_instrumentation()`` (the uninstrumented result) and once traced.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import feast
import pandas as pd
import pytest
from feast import FeatureStore
from feast.data_source import PushMode
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

import otel_dl
from otel_dl import semconv
from tests.support import EXPORTER, InternalErrors, SpanList

STREAM_VIEW = "driver_hourly_stats_stream"
# Appended to the template's feature_definitions.py; it reuses the template's own names.
STREAM_VIEW_DEFINITION = f"""

from feast import StreamFeatureView

driver_stats_stream_fv = StreamFeatureView(
    name="{STREAM_VIEW}",
    entities=[driver],
    ttl=timedelta(days=1),
    schema=[
        Field(name="conv_rate", dtype=Float32),
        Field(name="acc_rate", dtype=Float32),
        Field(name="avg_daily_trips", dtype=Int64),
    ],
    source=driver_stats_push_source,
    online=True,
)
"""
TTL_S = 86400.0  # every template view has a one-day TTL
ONLINE = "feature_store.get_online_features"
HISTORICAL = "feature_store.get_historical_features"
WRITE = "feature_store.write_to_online_store"
# The template's entity rows, with the request values its on-demand views need.
ENTITY_ROWS = [
    {"driver_id": 1001, "val_to_add": 1000, "val_to_add_2": 2000},
    {"driver_id": 1002, "val_to_add": 1001, "val_to_add_2": 2002},
]


def _feast_cli() -> list[str]:
    """The ``feast`` command of the interpreter running the tests."""
    script = Path(sys.executable).with_name("feast")
    return [str(script)] if script.exists() else [sys.executable, "-m", "feast.cli.cli"]


def _run_feast(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [*_feast_cli(), *args], cwd=cwd, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"feast {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("feast_init")
    _run_feast("init", "demo", cwd=root)
    repo = root / "demo" / "feature_repo"
    # The file's name changes between Feast releases (example_repo.py, then
    # feature_definitions.py): the one that defines the push source.
    (definitions,) = [
        path
        for path in repo.glob("*.py")
        if "driver_stats_push_source = PushSource(" in path.read_text()
    ]
    with definitions.open("a") as file:
        file.write(STREAM_VIEW_DEFINITION)
    _run_feast("apply", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def handle(repo: Path) -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument(include=["feast"])
    assert "otel_dl_feast" in h.instrumented
    yield h
    h.shutdown()


@pytest.fixture(scope="module")
def store(repo: Path, handle: otel_dl.Instrumentation) -> Iterator[FeatureStore]:
    # The template's file source and registry paths are relative to the repository, and
    # its workflow runs from there.
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        yield FeatureStore(repo_path=str(repo))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def template(repo: Path) -> ModuleType:
    """The template's ``test_workflow.py``, imported as a module (its functions only run
    when called)."""
    spec = importlib.util.spec_from_file_location(
        "feast_template_workflow", repo / "test_workflow.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event_df(conv_rate: float) -> pd.DataFrame:
    """The stream event ``run_demo`` pushes, with the conversion rate given."""
    now = dt.datetime.now()
    return pd.DataFrame.from_dict(
        {
            "driver_id": [1001],
            "event_timestamp": [now],
            "created": [now],
            "conv_rate": [conv_rate],
            "acc_rate": [1.0],
            "avg_daily_trips": [1000],
            "driver_metadata": [{"vehicle_type": "truck", "rating": "5.0"}],
            "driver_config": [json.dumps({"max_distance_km": 500, "preferred_zones": ["north"]})],
            "driver_profile": [{"name": "driver_1001_updated", "age": "30"}],
        }
    )


@dataclass
class Step:
    spans: list[ReadableSpan]
    errors: dict[str, int]


@pytest.fixture(scope="module")
def workflow(store: FeatureStore, template: ModuleType) -> dict[str, Step]:
    """``run_demo`` of the template, step by step (without its ``feast apply`` and
    ``feast teardown`` subprocesses): the spans and internal errors of each step."""
    steps: dict[str, Step] = {}

    def step(name: str, call: Callable[[], Any]) -> None:
        EXPORTER.clear()
        errors = InternalErrors()
        call()
        steps[name] = Step(list(EXPORTER.get_finished_spans()), errors.new())

    step("historical_training", lambda: template.fetch_historical_features_entity_df(store, False))
    step("historical_scoring", lambda: template.fetch_historical_features_entity_df(store, True))
    step(
        "materialize_incremental", lambda: store.materialize_incremental(end_date=dt.datetime.now())
    )
    step("online", lambda: template.fetch_online_features(store))
    step("online_service", lambda: template.fetch_online_features(store, "feature_service"))
    step("online_push_service", lambda: template.fetch_online_features(store, "push"))
    step(
        "push",
        lambda: store.push(
            "driver_stats_push_source", _event_df(1.0), to=PushMode.ONLINE_AND_OFFLINE
        ),
    )
    step("online_after_push", lambda: template.fetch_online_features(store, "push"))
    EXPORTER.clear()
    return steps


# step, its outermost span, dl.feature.views of that span, dl.feature.service
WORKFLOW = [
    ("historical_training", HISTORICAL, ["driver_hourly_stats", "transformed_conv_rate"], None),
    ("historical_scoring", HISTORICAL, ["driver_hourly_stats", "transformed_conv_rate"], None),
    (
        "materialize_incremental",
        "feature_store.materialize_incremental",
        # What Feast materialises: online feature and stream feature views, not the
        # on-demand or label views.
        ["driver_hourly_stats", "driver_hourly_stats_fresh", STREAM_VIEW],
        None,
    ),
    ("online", ONLINE, ["driver_hourly_stats", "transformed_conv_rate"], None),
    (
        "online_service",
        ONLINE,
        ["driver_hourly_stats", "transformed_conv_rate"],
        "driver_activity_v1",
    ),
    (
        "online_push_service",
        ONLINE,
        ["driver_hourly_stats_fresh", "transformed_conv_rate_fresh"],
        "driver_activity_v3",
    ),
    # A push writes every view its push source feeds.
    ("push", "feature_store.push", ["driver_hourly_stats_fresh", STREAM_VIEW], None),
    (
        "online_after_push",
        ONLINE,
        ["driver_hourly_stats_fresh", "transformed_conv_rate_fresh"],
        "driver_activity_v3",
    ),
]


@pytest.mark.parametrize(
    ("step", "name", "views", "service"), WORKFLOW, ids=[w[0] for w in WORKFLOW]
)
def test_each_template_call_gets_its_span(
    repo: Path,
    workflow: dict[str, Step],
    step: str,
    name: str,
    views: list[str],
    service: str | None,
) -> None:
    got = workflow[step]
    assert got.errors == {}
    roots = [s for s in got.spans if s.parent is None]
    assert [s.name for s in roots] == [name]
    (span,) = roots
    attrs = span.attributes
    assert span.status.status_code is StatusCode.UNSET
    assert attrs[semconv.DL_STAGE] == "feature_store"
    assert attrs[semconv.DL_COMPONENT] == "feast"
    assert attrs[semconv.DL_FEATURE_PROJECT] == "demo"
    # The template's registry path is relative to the repository.
    assert attrs[semconv.DL_FEATURE_REGISTRY] == str(repo / "data" / "registry.db")
    assert list(attrs[semconv.DL_FEATURE_VIEWS]) == views
    assert attrs.get(semconv.DL_FEATURE_SERVICE) == service
    # Every view, of whatever kind, has its definition fingerprint.
    fingerprinted = [f.split(":", 1)[0] for f in attrs[semconv.DL_FEATURE_VIEW_FINGERPRINTS]]
    assert fingerprinted == views
    assert attrs[semconv.DL_FEATURE_TTL] == TTL_S


@pytest.mark.parametrize(
    "step", ["online", "online_service", "online_push_service", "online_after_push"]
)
def test_online_reads_of_stored_views_carry_freshness(workflow: dict[str, Step], step: str) -> None:
    (span,) = workflow[step].spans
    attrs = span.attributes
    assert attrs[semconv.DL_FEATURE_ENTITY_COUNT] == 2
    assert attrs[semconv.DL_FEATURE_MISSING_FRACTION] == 0.0
    # The template's data is hourly up to the hour before `feast init`.
    assert 0.0 <= attrs[semconv.DL_FEATURE_FRESHNESS] < TTL_S
    assert attrs[semconv.DL_FEATURE_STALE] is False


def test_materialize_incremental_carries_the_window_end(workflow: dict[str, Step]) -> None:
    (span,) = workflow["materialize_incremental"].spans
    end = dt.datetime.fromisoformat(span.attributes[semconv.DL_FEATURE_MATERIALIZE_END])
    assert abs((dt.datetime.now() - end).total_seconds()) < 600
    assert semconv.DL_FEATURE_MATERIALIZE_START not in span.attributes  # Feast chooses it


def test_push_writes_each_fed_view_under_the_push_span(workflow: dict[str, Step]) -> None:
    spans = workflow["push"].spans
    (push,) = [s for s in spans if s.name == "feature_store.push"]
    assert push.attributes[semconv.DL_FEATURE_PUSH_SOURCE] == "driver_stats_push_source"
    assert push.attributes[semconv.DL_DATA_ROWS] == 1
    writes = [s for s in spans if s.name == WRITE]
    assert sorted(w.attributes[semconv.DL_FEATURE_VIEWS][0] for w in writes) == [
        "driver_hourly_stats_fresh",
        STREAM_VIEW,
    ]
    assert all(w.parent is not None and w.parent.span_id == push.context.span_id for w in writes)


def test_view_fingerprints_hold_across_the_workflow(workflow: dict[str, Step]) -> None:
    # No view is re-applied during the workflow, so each keeps one fingerprint, although
    # materialisation rewrites the stream feature view with its fields in another order.
    seen: dict[str, set[str]] = {}
    for step in workflow.values():
        for span in step.spans:
            for entry in span.attributes.get(semconv.DL_FEATURE_VIEW_FINGERPRINTS, ()):
                view, digest = entry.split(":", 1)
                seen.setdefault(view, set()).add(digest)
    assert STREAM_VIEW in seen
    assert {view: len(digests) for view, digests in seen.items()} == dict.fromkeys(seen, 1)


# --- The user's results are unchanged ------------------------------------------------------


def _untraced(call: Callable[[], Any]) -> Any:
    with suppress_instrumentation():
        return call()


ONLINE_READS: list[tuple[str, Any]] = [
    (
        "refs",
        [
            "driver_hourly_stats:acc_rate",
            "driver_hourly_stats:driver_metadata",
            "driver_hourly_stats:driver_config",
            "driver_hourly_stats:driver_profile",
            "transformed_conv_rate:conv_rate_plus_val1",
            "transformed_conv_rate:conv_rate_plus_val2",
        ],
    ),
    ("service_v1", "driver_activity_v1"),
    ("service_v3", "driver_activity_v3"),
    ("stream_view", [f"{STREAM_VIEW}:conv_rate", f"{STREAM_VIEW}:avg_daily_trips"]),
]


@pytest.mark.parametrize(("case", "features"), ONLINE_READS, ids=[c for c, _ in ONLINE_READS])
def test_online_result_unchanged(
    store: FeatureStore, workflow: dict[str, Step], spans: SpanList, case: str, features: Any
) -> None:
    if isinstance(features, str):
        features = store.get_feature_service(features)
    errors = InternalErrors()
    expected = _untraced(lambda: store.get_online_features(features, ENTITY_ROWS).to_dict())
    assert spans.get() == []
    got = store.get_online_features(features, ENTITY_ROWS).to_dict()
    assert got == expected
    (span,) = spans.get(ONLINE)
    assert errors.new() == {}
    assert span.attributes[semconv.DL_FEATURE_ENTITY_COUNT] == 2


def test_on_demand_values_alone_carry_no_freshness(
    store: FeatureStore, workflow: dict[str, Step], spans: SpanList
) -> None:
    # On-demand features are computed at request time: they have no event timestamp, so
    # a read of only on-demand features leaves freshness off. The template's on-demand
    # view needs its source feature read with it; entity 9999 has no stored row, so
    # nothing read has a timestamp.
    features = ["driver_hourly_stats:conv_rate", "transformed_conv_rate:conv_rate_plus_val1"]
    rows = [{"driver_id": 9999, "val_to_add": 1, "val_to_add_2": 2}]
    errors = InternalErrors()
    result = store.get_online_features(features, rows).to_dict()
    assert result["conv_rate"] == [None]
    (span,) = spans.get(ONLINE)
    assert errors.new() == {}
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == [
        "driver_hourly_stats",
        "transformed_conv_rate",
    ]
    assert semconv.DL_FEATURE_FRESHNESS not in span.attributes
    assert semconv.DL_FEATURE_STALE not in span.attributes


def test_historical_result_unchanged(
    store: FeatureStore, workflow: dict[str, Step], spans: SpanList
) -> None:
    entity_df = pd.DataFrame(
        {
            "driver_id": [1001, 1002, 1003],
            "event_timestamp": [
                dt.datetime(2021, 4, 12, 10, 59, 42),
                dt.datetime(2021, 4, 12, 8, 12, 10),
                dt.datetime(2021, 4, 12, 16, 40, 26),
            ],
            "val_to_add": [1, 2, 3],
            "val_to_add_2": [10, 20, 30],
        }
    )
    features = [
        "driver_hourly_stats:conv_rate",
        "driver_hourly_stats:acc_rate",
        "driver_hourly_stats:avg_daily_trips",
        "transformed_conv_rate:conv_rate_plus_val1",
        "transformed_conv_rate:conv_rate_plus_val2",
    ]
    errors = InternalErrors()
    expected = _untraced(
        lambda: store.get_historical_features(entity_df=entity_df, features=features).to_df()
    )
    got = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    pd.testing.assert_frame_equal(got, expected)
    (span,) = spans.get(HISTORICAL)
    assert errors.new() == {}
    assert span.attributes[semconv.DL_DATA_ROWS] == 3
    assert span.attributes[semconv.DL_FEATURE_ENTITY_COUNT] == 3
    assert semconv.DL_QUALITY_NAN_FRACTION in span.attributes


def _conv_rate(store: FeatureStore, view: str) -> float:
    read = _untraced(
        lambda: store.get_online_features([f"{view}:conv_rate"], [{"driver_id": 1001}])
    )
    return float(read.to_dict()["conv_rate"][0])


def test_materialize_window(
    store: FeatureStore, workflow: dict[str, Step], spans: SpanList
) -> None:
    end = dt.datetime.now(dt.timezone.utc)
    start = end - dt.timedelta(days=2)
    errors = InternalErrors()
    assert store.materialize(start, end, ["driver_hourly_stats"]) is None
    (span,) = spans.get("feature_store.materialize")
    assert errors.new() == {}
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_hourly_stats"]
    assert span.attributes[semconv.DL_FEATURE_MATERIALIZE_START] == start.isoformat()
    assert span.attributes[semconv.DL_FEATURE_MATERIALIZE_END] == end.isoformat()


@pytest.mark.parametrize("view", ["driver_hourly_stats_fresh", STREAM_VIEW])
def test_push_reaches_the_store(
    store: FeatureStore, workflow: dict[str, Step], spans: SpanList, view: str
) -> None:
    errors = InternalErrors()
    store.push("driver_stats_push_source", _event_df(0.25), to=PushMode.ONLINE)
    assert _conv_rate(store, view) == 0.25
    assert errors.new() == {}
    (push,) = spans.get("feature_store.push")
    assert view in push.attributes[semconv.DL_FEATURE_VIEWS]


def test_write_to_online_store_reaches_the_store(
    store: FeatureStore, workflow: dict[str, Step], spans: SpanList
) -> None:
    frame = _event_df(0.75)
    errors = InternalErrors()
    store.write_to_online_store("driver_hourly_stats", frame)
    assert _conv_rate(store, "driver_hourly_stats") == 0.75
    assert errors.new() == {}
    (span,) = spans.get(WRITE)
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_hourly_stats"]
    assert span.attributes[semconv.DL_DATA_ROWS] == 1
    assert semconv.DL_DATA_SCHEMA_FINGERPRINT in span.attributes


def test_push_to_the_label_view(
    store: FeatureStore, workflow: dict[str, Step], spans: SpanList
) -> None:
    labels = pd.DataFrame(
        {
            "driver_id": [1001],
            "is_reliable": [1],
            "quality_score": [0.9],
            "reviewer_notes": ["ok"],
            "labeler": ["tests"],
            "event_timestamp": [dt.datetime.now(dt.timezone.utc)],
        }
    )
    label_views = getattr(store, "list_label_views", list)()
    if "driver_quality_labels" not in {view.name for view in label_views}:
        pytest.skip(f"the template of Feast {feast.__version__} has no label view")
    errors = InternalErrors()
    store.push("driver_quality_labels_push", labels, to=PushMode.ONLINE)
    (push,) = spans.get("feature_store.push")
    assert errors.new() == {}
    assert list(push.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_quality_labels"]
    assert push.attributes[semconv.DL_FEATURE_PUSH_SOURCE] == "driver_quality_labels_push"
