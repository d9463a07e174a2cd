"""The Feast instrumentor on a real Feast repository: parquet source, local provider,
SQLite online store, built in a temporary directory, fully offline.

The only stand-in is the clock that freshness is measured against: staleness needs days
to pass, so the staleness test moves the instrumentor's clock forward.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from feast import FeatureStore
from feast.errors import FeatureViewNotFoundException
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode

import otel_dl
from otel_dl import _config, semconv
from otel_dl.instrumentors import feast as feast_instrumentor
from tests.support import InternalErrors, SpanList, broken_extractor, feast_driver_repo

ONLINE = "feature_store.get_online_features"
HISTORICAL = "feature_store.get_historical_features"
DRIVERS = 200
NOW = pd.Timestamp.now(tz="UTC").floor("s")
DATA_AGE = pd.Timedelta(hours=2)
FEATURES = ["driver_stats:conv_rate", "driver_stats:trips", "driver_stats:city"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    root = tmp_path_factory.mktemp("feast_repo")
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            "driver_id": np.arange(DRIVERS, dtype=np.int64),
            "conv_rate": rng.random(DRIVERS).astype("float32"),
            "trips": rng.integers(0, 50, DRIVERS),
            "city": rng.choice(["paris", "lyon"], DRIVERS),
            "event_timestamp": [NOW - DATA_AGE] * DRIVERS,
            "created": [NOW] * DRIVERS,
        }
    ).to_parquet(root / "drivers.parquet")
    repo = feast_driver_repo(root, "rides")
    return repo


@pytest.fixture(autouse=True)
def handle(store: FeatureStore) -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument(include=["feast"])
    assert "otel_dl_feast" in h.instrumented
    yield h
    h.shutdown()


@pytest.fixture(scope="module")
def materialised(store: FeatureStore) -> FeatureStore:
    store.materialize(
        (NOW - pd.Timedelta(days=3)).to_pydatetime(), NOW.to_pydatetime(), ["driver_stats"]
    )
    return store


def test_materialize_span(store: FeatureStore, spans: SpanList) -> None:
    store.materialize_incremental(NOW.to_pydatetime())
    (span,) = spans.get("feature_store.materialize_incremental")
    assert span.attributes[semconv.DL_STAGE] == "feature_store"
    assert span.attributes[semconv.DL_COMPONENT] == "feast"
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_stats"]
    assert span.attributes[semconv.DL_FEATURE_MATERIALIZE_END].startswith(str(NOW.year))


def test_online_read_carries_provenance_freshness_and_missing_share(
    materialised: FeatureStore, spans: SpanList, tracer
) -> None:
    rows = [{"driver_id": i} for i in range(9)] + [{"driver_id": 10_000}]  # one unknown
    with tracer.start_as_current_span("request") as parent:
        response = materialised.get_online_features(FEATURES, rows)
    assert response.to_dict()["conv_rate"][-1] is None  # the user's result is unchanged
    (span,) = spans.get(ONLINE)
    attrs = span.attributes
    assert span.parent.span_id == parent.get_span_context().span_id
    assert attrs[semconv.DL_FEATURE_PROJECT] == "rides"
    assert attrs[semconv.DL_FEATURE_REGISTRY].endswith("registry.db")
    assert list(attrs[semconv.DL_FEATURE_VIEWS]) == ["driver_stats"]
    (fingerprint,) = attrs[semconv.DL_FEATURE_VIEW_FINGERPRINTS]
    assert fingerprint.startswith("driver_stats:") and len(fingerprint) == len("driver_stats:") + 32
    assert attrs[semconv.DL_FEATURE_ENTITY_COUNT] == 10
    assert attrs[semconv.DL_FEATURE_MISSING_FRACTION] == pytest.approx(0.1)
    assert attrs[semconv.DL_FEATURE_TTL] == 86400.0
    # The rows were stamped NOW - DATA_AGE when this module was imported.
    age = DATA_AGE.total_seconds()
    since_import = time.time() - NOW.timestamp()
    assert age <= attrs[semconv.DL_FEATURE_FRESHNESS] <= age + since_import + 1
    assert attrs[semconv.DL_FEATURE_STALE] is False
    assert attrs[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(0.1)
    assert semconv.DL_DATA_SCHEMA_FINGERPRINT in attrs


def test_freshness_grows_and_crosses_the_threshold_when_materialisation_stops(
    materialised: FeatureStore, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"driver_id": i} for i in range(5)]
    clock = NOW.timestamp()
    freshness = []
    for days in (0, 0.5, 2):
        monkeypatch.setattr(feast_instrumentor, "_now", lambda d=days: clock + d * 86400)
        materialised.get_online_features(FEATURES, rows)
        span = spans.get(ONLINE)[-1]
        freshness.append(span.attributes[semconv.DL_FEATURE_FRESHNESS])
        stale = span.attributes[semconv.DL_FEATURE_STALE]
        assert stale is (freshness[-1] > 86400)
    assert freshness == sorted(freshness)
    assert freshness[0] < 86400 < freshness[-1]  # the stale-features catalog threshold
    assert freshness[-1] - freshness[0] == pytest.approx(2 * 86400)


def test_each_view_is_judged_stale_by_its_own_ttl(tmp_path, spans: SpanList) -> None:
    """A daily view's values 2 h old beside an hourly view's 10 min old: each within its
    own TTL, so the read is not stale, alone, together or through a feature service;
    freshness is still the oldest value's age. Hourly values 2 h old are stale."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource
    from feast.types import Float32
    from feast.value_type import ValueType

    now = pd.Timestamp.now(tz="UTC").floor("s")
    ages = {"daily": pd.Timedelta(hours=2), "hourly": pd.Timedelta(minutes=10)}
    (tmp_path / "feature_store.yaml").write_text(
        f"project: ttls\nregistry: {tmp_path / 'registry.db'}\nprovider: local\n"
        f"online_store:\n  type: sqlite\n  path: {tmp_path / 'online.db'}\n"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
    views = []
    for name, ttl in (("daily", dt.timedelta(days=1)), ("hourly", dt.timedelta(hours=1))):
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame(
            {
                "driver_id": np.arange(5, dtype=np.int64),
                f"{name}_rate": np.linspace(0, 1, 5).astype("float32"),
                "event_timestamp": [now - ages[name]] * 5,
            }
        ).to_parquet(path)
        views.append(
            FeatureView(
                name=f"driver_{name}",
                entities=[driver],
                ttl=ttl,
                schema=[Field(name=f"{name}_rate", dtype=Float32)],
                source=FileSource(path=str(path), timestamp_field="event_timestamp"),
            )
        )
    service = FeatureService(name="driver_all", features=views)
    repo = FeatureStore(repo_path=str(tmp_path))
    repo.apply([driver, *views, service])
    with suppress_instrumentation():
        repo.materialize((now - pd.Timedelta(days=2)).to_pydatetime(), now.to_pydatetime())
    rows = [{"driver_id": i} for i in range(5)]
    reads = {
        "daily": ["driver_daily:daily_rate"],
        "hourly": ["driver_hourly:hourly_rate"],
        "both": ["driver_daily:daily_rate", "driver_hourly:hourly_rate"],
        "service": service,
    }
    for label, features in reads.items():
        spans.clear()
        repo.get_online_features(features=features, entity_rows=rows).to_dict()
        (read,) = [s for s in spans.get() if s.name.endswith("get_online_features")]
        assert read.attributes[semconv.DL_FEATURE_STALE] is False, label
        oldest = ages["hourly"] if label == "hourly" else ages["daily"]
        freshness = read.attributes[semconv.DL_FEATURE_FRESHNESS]
        assert oldest.total_seconds() <= freshness < oldest.total_seconds() + 60, label
    # The hourly view's values two hours old: stale by its own TTL, in the same read.
    later = now + pd.Timedelta(minutes=110)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(feast_instrumentor, "_now", lambda: later.timestamp())
        spans.clear()
        repo.get_online_features(features=reads["both"], entity_rows=rows).to_dict()
        (read,) = [s for s in spans.get() if s.name.endswith("get_online_features")]
    assert read.attributes[semconv.DL_FEATURE_STALE] is True


def test_feature_service_and_drift_against_a_watched_reference(
    materialised: FeatureStore, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One read of 100 entities is the whole drift window here, scored at once.
    config = replace(_config.get_config(), drift_min_rows=100, drift_max_rows=1024, drift_every=1)
    monkeypatch.setattr(_config, "_active", config)
    baseline = {
        "conv_rate": np.random.default_rng(1).random(1000) + 5.0,  # far from the served data
        "trips": np.random.default_rng(2).integers(0, 50, 1000).astype("float64"),
    }
    otel_dl.watch(materialised, reference=otel_dl.Reference.fit(baseline))
    try:
        service = materialised.get_feature_service("driver_service")
        materialised.get_online_features(service, {"driver_id": list(range(100))})
    finally:
        otel_dl.watch(materialised)
    (span,) = spans.get(ONLINE)
    assert span.attributes[semconv.DL_FEATURE_SERVICE] == "driver_service"
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_stats"]
    assert span.attributes[semconv.DL_DRIFT_STATUS] == "alert"
    assert span.attributes[semconv.DL_DRIFT_FEATURE] == "conv_rate"
    assert span.attributes[semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] > 0


def test_historical_span_covers_the_lazy_to_df(materialised: FeatureStore, spans: SpanList) -> None:
    entity_df = pd.DataFrame({"driver_id": [1, 2, 3], "event_timestamp": [NOW] * 3})
    job = materialised.get_historical_features(entity_df=entity_df, features=FEATURES)
    assert spans.get(HISTORICAL) == []  # open until the job is materialised
    frame = job.to_df()
    (span,) = spans.get(HISTORICAL)
    assert len(frame) == 3 and span.attributes[semconv.DL_DATA_ROWS] == 3
    assert span.attributes[semconv.DL_FEATURE_ENTITY_COUNT] == 3
    assert span.attributes[semconv.DL_QUALITY_NAN_FRACTION] == 0.0
    assert semconv.DL_DATA_FINGERPRINT in span.attributes
    job.to_arrow()  # later materialisations make no span
    assert len(spans.get(HISTORICAL)) == 1


def test_historical_job_never_materialised_still_ends_its_span(
    materialised: FeatureStore, spans: SpanList
) -> None:
    entity_df = pd.DataFrame({"driver_id": [1], "event_timestamp": [NOW]})
    job = materialised.get_historical_features(entity_df=entity_df, features=FEATURES)
    del job
    (span,) = spans.get(HISTORICAL)
    assert span.status.status_code is StatusCode.UNSET


def test_missing_feature_view_and_entity_key_raise_unchanged(
    materialised: FeatureStore, spans: SpanList
) -> None:
    with pytest.raises(FeatureViewNotFoundException) as missing_view:
        materialised.get_online_features(["no_such_view:x"], [{"driver_id": 1}])
    # Feast's own error for an unknown entity key differs between releases (KeyError,
    # ValueError): whatever it is, it comes through unchanged.
    with suppress_instrumentation(), pytest.raises(Exception) as bare:
        materialised.get_online_features(FEATURES, [{"rider_id": 1}])
    with pytest.raises(type(bare.value)) as missing_key:
        materialised.get_online_features(FEATURES, [{"rider_id": 1}])
    assert str(missing_key.value) == str(bare.value)
    got = spans.get(ONLINE)
    assert len(got) == 2
    for span, caught in zip(got, (missing_view, missing_key), strict=True):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == type(caught.value).__qualname__
        assert span.events[0].name == "exception"


def test_push_and_write_to_online_store(materialised: FeatureStore, spans: SpanList) -> None:
    frame = pd.DataFrame(
        {
            "driver_id": [500, 501],
            "conv_rate": np.array([0.5, np.nan], dtype="float32"),
            "trips": [1, 2],
            "city": ["paris", "lyon"],
            "event_timestamp": [NOW] * 2,
            "created": [NOW] * 2,
        }
    )
    materialised.write_to_online_store("driver_stats", frame)
    (span,) = spans.get("feature_store.write_to_online_store")
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_stats"]
    assert span.attributes[semconv.DL_DATA_ROWS] == 2
    assert span.attributes[semconv.DL_QUALITY_NAN_FRACTION] > 0
    with pytest.raises(Exception) as caught:
        materialised.push("no_such_push_source", frame)
    (push,) = spans.get("feature_store.push")
    assert push.attributes[semconv.DL_FEATURE_PUSH_SOURCE] == "no_such_push_source"
    assert push.attributes["error.type"] == type(caught.value).__qualname__


def test_uninstrument_restores_feature_store(
    materialised: FeatureStore, handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    handle.shutdown()
    materialised.get_online_features(FEATURES, [{"driver_id": 1}])
    assert spans.get(ONLINE) == []
    assert not hasattr(FeatureStore.get_online_features, "__wrapped__")


def test_registry_change_changes_the_fingerprint(
    materialised: FeatureStore, spans: SpanList
) -> None:
    materialised.get_online_features(FEATURES, [{"driver_id": 1}])
    view = materialised.get_feature_view("driver_stats")
    before = spans.get(ONLINE)[-1].attributes[semconv.DL_FEATURE_VIEW_FINGERPRINTS]
    view.ttl = dt.timedelta(days=2)
    materialised.apply([view])
    materialised.get_online_features(FEATURES, [{"driver_id": 1}])
    after = spans.get(ONLINE)[-1].attributes
    assert after[semconv.DL_FEATURE_VIEW_FINGERPRINTS] != before
    assert after[semconv.DL_FEATURE_TTL] == 2 * 86400.0


# --- One failed extractor costs only its own attributes ------------------------------------


def _assert_counted(errors: dict[str, int], site: str) -> None:
    assert errors, "the failure was not counted"
    assert all(key.startswith(site) for key in errors), errors


@pytest.mark.parametrize(
    ("extractor", "kept", "dropped"),
    [
        ("_online_before", semconv.DL_FEATURE_MISSING_FRACTION, semconv.DL_FEATURE_VIEWS),
        ("_online_after", semconv.DL_FEATURE_VIEWS, semconv.DL_FEATURE_MISSING_FRACTION),
    ],
)
def test_failing_online_extractor_keeps_the_span(
    materialised: FeatureStore,
    spans: SpanList,
    monkeypatch: pytest.MonkeyPatch,
    extractor: str,
    kept: str,
    dropped: str,
) -> None:
    rows = [{"driver_id": i} for i in range(3)]
    with suppress_instrumentation():
        expected = materialised.get_online_features(FEATURES, rows).to_dict()
    monkeypatch.setattr(
        feast_instrumentor.FeastInstrumentor, extractor, staticmethod(broken_extractor)
    )
    errors = InternalErrors()
    assert materialised.get_online_features(FEATURES, rows).to_dict() == expected
    (span,) = spans.get(ONLINE)
    assert span.attributes[semconv.DL_STAGE] == "feature_store"
    assert kept in span.attributes
    assert dropped not in span.attributes
    _assert_counted(errors.new(), "feast.get_online_features")


def test_failing_historical_extractor_keeps_the_span(
    materialised: FeatureStore, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    entity_df = pd.DataFrame({"driver_id": [1, 2], "event_timestamp": [NOW] * 2})
    with suppress_instrumentation():
        expected = materialised.get_historical_features(entity_df, FEATURES).to_df()
    monkeypatch.setattr(
        feast_instrumentor.FeastInstrumentor, "_historical_before", staticmethod(broken_extractor)
    )
    errors = InternalErrors()
    got = materialised.get_historical_features(entity_df, FEATURES).to_df()
    pd.testing.assert_frame_equal(got, expected)
    (span,) = spans.get(HISTORICAL)
    assert span.attributes[semconv.DL_DATA_ROWS] == 2
    assert semconv.DL_FEATURE_VIEWS not in span.attributes
    _assert_counted(errors.new(), "feast.historical")


def test_failing_historical_signals_keep_the_span(
    materialised: FeatureStore, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    entity_df = pd.DataFrame({"driver_id": [1, 2], "event_timestamp": [NOW] * 2})
    monkeypatch.setattr(feast_instrumentor, "_frame_columns", broken_extractor)
    errors = InternalErrors()
    assert len(materialised.get_historical_features(entity_df, FEATURES).to_df()) == 2
    (span,) = spans.get(HISTORICAL)
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_stats"]
    assert semconv.DL_QUALITY_NAN_FRACTION not in span.attributes
    _assert_counted(errors.new(), "feast.historical")


def test_failing_write_extractors_keep_the_spans(
    materialised: FeatureStore, spans: SpanList, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = pd.DataFrame(
        {
            "driver_id": [600],
            "conv_rate": np.array([0.25], dtype="float32"),
            "trips": [3],
            "city": ["nice"],
            "event_timestamp": [NOW],
            "created": [NOW],
        }
    )
    monkeypatch.setattr(feast_instrumentor, "_written", broken_extractor)
    errors = InternalErrors()
    materialised.write_to_online_store("driver_stats", frame)
    (span,) = spans.get("feature_store.write_to_online_store")
    assert list(span.attributes[semconv.DL_FEATURE_VIEWS]) == ["driver_stats"]
    assert semconv.DL_DATA_ROWS not in span.attributes
    _assert_counted(errors.new(), "feast.write_to_online_store")
    with suppress_instrumentation():
        read = materialised.get_online_features(FEATURES, [{"driver_id": 600}]).to_dict()
    assert read["city"] == ["nice"]  # the write happened

    monkeypatch.setattr(feast_instrumentor, "_store_attributes", broken_extractor)
    errors = InternalErrors()
    assert materialised.materialize_incremental(NOW.to_pydatetime()) is None
    (span,) = spans.get("feature_store.materialize_incremental")
    assert span.attributes[semconv.DL_COMPONENT] == "feast"
    assert semconv.DL_FEATURE_VIEWS not in span.attributes
    _assert_counted(errors.new(), "feast.materialize_incremental")
