"""Feast instrumentation: one span per feature-store call.

``otel_dl.instrument()`` enables it when Feast is installed; by hand::

    from otel_dl.instrumentors.feast import FeastInstrumentor
    FeastInstrumentor().instrument()

Nothing is imported up front: ``FeatureStore`` is patched when ``feast`` is first
imported, so an application that never uses Feast pays nothing.

These ``FeatureStore`` methods make a ``feature_store.<method>`` span
(``dl.stage=feature_store``, ``dl.component=feast``) with the project, the registry path
(``dl.feature.registry``), the feature views read or written (``dl.feature.views``; a
feature service adds ``dl.feature.service``), and per view a fingerprint of its
registered definition (``dl.feature.view.fingerprints``, ``"view:digest"``, read from the
registry cache, so it changes when the view is re-applied with another schema, source,
TTL or transformation, not when Feast stores the same fields in another order) and its
version where Feast versions it (``dl.feature.view.versions``, ``"view:v3"``). Every
kind of view counts: feature, on-demand, stream feature and label views.

- ``get_online_features``: ``dl.feature.entity_count``, ``dl.feature.missing_fraction``
  (share of returned feature values that are missing: an entity not in the online store
  comes back as nulls), ``dl.feature.freshness`` (seconds between now and the oldest
  event timestamp among the values returned), ``dl.feature.ttl`` (smallest TTL of the
  views read) and ``dl.feature.stale`` (a value older than its own view's TTL: each
  view is judged by its own, so a daily view's two-hour-old values beside an hourly
  view's fresh ones are not stale), and the drift, quality and data fingerprint of the
  returned features.
- ``get_historical_features``: the retrieval job Feast returns is lazy, so the span
  starts at the call and ends when the job is first materialised by ``to_df()`` or
  ``to_arrow()`` (or ``to_feast_df()``, which goes through ``to_arrow()``), covering the
  query time too; it then carries the entity count and the drift and quality of the
  returned features. A job never materialised ends its span, at the call's end, when the
  job is garbage-collected. Later materialisations of the same job make no span.
- ``materialize`` and ``materialize_incremental``: the views (when none are named, those
  Feast materialises: online feature and stream feature views, and on-demand views
  written to the online store) and the time window
  (``dl.feature.materialize.start``/``.end``, ISO 8601).
- ``push`` (``dl.feature.push_source``; its views are every view the push source feeds,
  and Feast writes each to the online store through ``write_to_online_store``, whose
  spans nest under the push's) and ``write_to_online_store``: rows written and the
  quality and fingerprints of the DataFrame written.

Freshness of online reads. Feast's online stores keep each row's event timestamp beside
its values and return it in the response (``OnlineResponse.proto``, one timestamp per
value; it is what ``to_dict(include_event_timestamps=True)`` reads), so no extra lookup
is made. Only values whose status is ``PRESENT`` count. When no returned value has a
timestamp (every entity missing, an online store that returns none, on-demand features
computed at request time), ``dl.feature.freshness`` and ``dl.feature.stale`` are left
off. Historical reads carry no freshness: Feast does not return the feature rows' own
timestamps there. Time is measured with the wall clock at the end of the call.

Drift and quality. The returned features (entity keys left out) are observed by the
store's monitor: ``otel_dl.watch(store, reference=ref)`` gives the reference, otherwise
the first ``baseline_rows`` rows read become the baseline. Online and historical reads
share it and present the features the same way: one column per feature, in name order,
numeric features as float64 (missing values as NaN), others as strings. Fit a reference
on that form, e.g. ``Reference.fit(df[sorted(feature_columns)].astype("float64"))``.
List-valued features (embeddings) are left out of the signals.

The user's exceptions (an unknown feature view, a missing entity key) are recorded on the
span and re-raised unchanged. The async methods are not traced.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import numpy as np

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import report_internal_error
from otel_dl._span import Attributes, DlCall, DlSpan, traced_call
from otel_dl._watch import ensure_state
from otel_dl.provenance import data_fingerprint
from otel_dl.quality import nan_fraction
from otel_dl.reference import to_table

from ._base import DlInstrumentor, Patches

_STORE_MODULE: Final = "feast.feature_store"
_JOB_MODULE: Final = "feast.infra.offline_stores.offline_store"
_SITE: Final = "feast"
_PRESENT: Final = 1  # feast.serving.FieldStatus.PRESENT
_NUMERIC_KINDS: Final = frozenset(
    {"int32_val", "int64_val", "float_val", "double_val", "bool_val", "unix_timestamp_val"}
)
_TEXT_KINDS: Final = frozenset({"string_val", "bytes_val"})
# Columns of a historical result that are not features.
_HISTORICAL_META: Final = frozenset({"event_timestamp", "created_timestamp"})


def _now() -> float:
    """Wall-clock seconds; freshness is measured against it."""
    return time.time()


def _arg(call: DlCall, index: int, name: str, default: Any = None) -> Any:
    if len(call.args) > index:
        return call.args[index]
    return call.kwargs.get(name, default)


# --- What was read -------------------------------------------------------------------------


def _views_of(features: Any) -> tuple[list[str], str | None]:
    """Feature view names (in order of first mention) and the feature service's name."""
    projections = getattr(features, "feature_view_projections", None)
    if projections is not None:
        return [str(p.name) for p in projections], str(getattr(features, "name", ""))
    views: dict[str, None] = {}
    for ref in features or ():
        if isinstance(ref, str) and ":" in ref:
            views[ref.split(":", 1)[0].split("@", 1)[0]] = None
    return list(views), None


def _entity_count(entity_rows: Any) -> int | None:
    if isinstance(entity_rows, Mapping):
        first = next(iter(entity_rows.values()), None)
        return len(first) if first is not None else 0
    if isinstance(entity_rows, Sequence):
        return len(entity_rows)
    return None


def _entity_keys(entity_rows: Any) -> set[str]:
    if isinstance(entity_rows, Mapping):
        return {str(k) for k in entity_rows}
    if isinstance(entity_rows, Sequence) and entity_rows and isinstance(entity_rows[0], Mapping):
        return {str(k) for k in entity_rows[0]}
    return set()


@dataclass(frozen=True)
class _ViewInfo:
    fingerprint: str
    ttl_s: float | None
    version: int | None
    push_source: str | None  # the push source that feeds it, if any
    materialized: bool  # what ``materialize`` with no view list writes


@dataclass
class _RegistryCache:
    key: tuple[int, int, int]
    views: dict[str, _ViewInfo]


_registry_lock = threading.Lock()
_registry_cache: weakref.WeakKeyDictionary[Any, _RegistryCache] = weakref.WeakKeyDictionary()
# Registry groups that hold views, with what ``materialize`` does to each when it is given
# no view list: Feast writes online, enabled feature and stream feature views, and
# on-demand views only when they are written to the online store; label views are pushed.
_VIEW_GROUPS: Final = (
    ("feature_views", "online"),
    ("stream_feature_views", "online"),
    ("on_demand_feature_views", "write_to_online_store"),
    ("label_views", None),
)


def _spec_value(spec: Any, name: str) -> Any:
    """A spec field's value, or None where the field is unset or this kind of view has
    none: each view kind has its own spec message (an on-demand view has no TTL, a label
    view's source is ``source``, not ``stream_source``), and Feast releases add fields."""
    field = spec.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        return None
    if field.message_type is not None and not spec.HasField(name):
        return None
    return getattr(spec, name)


def _is_push(source: Any) -> bool:
    """Whether a ``DataSource`` proto is a push source (read by name: no Feast import)."""
    kinds = source.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number
    kind = kinds.get(source.type)
    return kind is not None and kind.name == "PUSH_SOURCE"


def _definition_digest(spec: Any) -> str:
    """Digest of a view's spec with its unordered lists sorted: Feast stores a view's
    fields in set order, so the same definition comes back reordered after
    ``materialize`` rewrites it (a stream feature view does)."""
    canonical = type(spec)()
    canonical.CopyFrom(spec)
    fields = spec.DESCRIPTOR.fields_by_name
    for name in ("features", "entity_columns"):
        if name in fields:
            ordered = sorted(
                getattr(spec, name), key=lambda f: (f.name, f.SerializeToString(deterministic=True))
            )
            del getattr(canonical, name)[:]
            getattr(canonical, name).extend(ordered)
    if "entities" in fields:
        names = sorted(spec.entities)
        del canonical.entities[:]
        canonical.entities.extend(names)
    data = canonical.SerializeToString(deterministic=True)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _view_info(spec: Any, meta: Any, materialize_flag: str | None) -> _ViewInfo:
    ttl = _spec_value(spec, "ttl")
    ttl_s = ttl.seconds + ttl.nanos / 1e9 if ttl is not None else None
    source = _spec_value(spec, "stream_source") or _spec_value(spec, "source")
    push_source = str(source.name) if source is not None and _is_push(source) else None
    version = getattr(meta, "current_version_number", 0) or None
    materialized = (
        materialize_flag is not None
        and bool(_spec_value(spec, materialize_flag))
        and not _spec_value(spec, "disabled")
    )
    return _ViewInfo(_definition_digest(spec), ttl_s or None, version, push_source, materialized)


def _view_infos(store: Any) -> dict[str, _ViewInfo]:
    """Definition fingerprint, TTL, version and sources of every view of the store's
    project: feature, stream feature, on-demand and label views.

    Read from the registry's in-memory cache (file and SQL registries both keep one) and
    recomputed only when that cache is replaced or updated, so a call costs a dict lookup.
    """
    registry = getattr(store, "_registry", None) or getattr(store, "registry", None)
    proto = getattr(registry, "cached_registry_proto", None)
    if proto is None:
        return {}
    key = (id(proto), proto.last_updated.seconds, proto.last_updated.nanos)
    with _registry_lock:
        cached = _registry_cache.get(store)
    if cached is not None and cached.key == key:
        return cached.views
    project = getattr(store, "project", None)
    views: dict[str, _ViewInfo] = {}
    for group, materialize_flag in _VIEW_GROUPS:
        for view in getattr(proto, group, ()):
            spec = view.spec
            if project is not None and spec.project and spec.project != project:
                continue
            views[spec.name] = _view_info(spec, view.meta, materialize_flag)
    with _registry_lock:
        _registry_cache[store] = _RegistryCache(key, views)
    return views


def _registry_path(store: Any) -> str | None:
    registry = getattr(getattr(store, "config", None), "registry", None)
    path = getattr(registry, "path", registry)
    if not path:
        return None
    path = str(path)
    repo = getattr(store, "repo_path", None)
    # A local path relative to the repository (the template's ``data/registry.db``) is
    # resolved as Feast resolves it, so it names one registry wherever the app runs.
    if repo is not None and "://" not in path and not os.path.isabs(path):
        path = os.path.join(os.fspath(repo), path)
    return path


def _store_attributes(store: Any, views: Sequence[str], service: str | None) -> Attributes:
    attrs: Attributes = ensure_state(store).provenance()
    project = getattr(store, "project", None)
    if project:
        attrs[semconv.DL_FEATURE_PROJECT] = str(project)
    registry = _registry_path(store)
    if registry:
        attrs[semconv.DL_FEATURE_REGISTRY] = registry
    if views:
        attrs[semconv.DL_FEATURE_VIEWS] = list(views)
    if service:
        attrs[semconv.DL_FEATURE_SERVICE] = service
    infos = _view_infos(store)
    known = [(v, infos[v]) for v in views if v in infos]
    if known:
        attrs[semconv.DL_FEATURE_VIEW_FINGERPRINTS] = [f"{v}:{i.fingerprint}" for v, i in known]
        versions = [f"{v}:v{i.version}" for v, i in known if i.version is not None]
        if versions:
            attrs[semconv.DL_FEATURE_VIEW_VERSIONS] = versions
        ttls = [i.ttl_s for _, i in known if i.ttl_s]
        if ttls:
            attrs[semconv.DL_FEATURE_TTL] = float(min(ttls))
    return attrs


def _min_ttl(store: Any, features: Any) -> float | None:
    """Smallest TTL of the views ``features`` reads, in seconds; None when none has one."""
    views, _service = _views_of(features)
    infos = _view_infos(store)
    ttls = [infos[v].ttl_s for v in views if v in infos and infos[v].ttl_s]
    return float(min(t for t in ttls if t is not None)) if ttls else None


def _feature_views(features: Any) -> dict[str, str]:
    """The view of each feature a read names, by the names a response may give it: the
    feature's own and ``view__feature`` (``full_feature_names``)."""
    out: dict[str, str] = {}
    projections = getattr(features, "feature_view_projections", None)
    if projections is not None:
        for projection in projections:
            view = str(projection.name)
            shown = str(getattr(projection, "name_alias", None) or view)
            for feature in getattr(projection, "features", ()):
                out.setdefault(str(feature.name), view)
                out[f"{shown}__{feature.name}"] = view
        return out
    for ref in features or ():
        if isinstance(ref, str) and ":" in ref:
            view, feature = ref.split(":", 1)
            view = view.split("@", 1)[0]
            out.setdefault(feature, view)
            out[f"{view}__{feature}"] = view
    return out


def _stale(store: Any, features: Any, oldest: Mapping[str, int], now: float) -> bool | None:
    """Whether a value read is older than its own view's TTL (None: no view has a TTL).
    Each view is judged by its own TTL: a daily view's two-hour-old values beside an
    hourly view's fresh ones are not stale. A feature whose view is unknown is judged by
    the smallest TTL of the read."""
    infos = _view_infos(store)
    views = _feature_views(features)
    smallest: float | None = None  # looked up only for a feature whose view has no TTL
    looked = False
    judged = False
    for name, stamp in oldest.items():
        view = views.get(name)
        info = infos.get(view) if view is not None else None
        ttl = info.ttl_s if info is not None and info.ttl_s else None
        if ttl is None:
            if not looked:
                smallest, looked = _min_ttl(store, features), True
            ttl = smallest
        if ttl is None:
            continue
        judged = True
        if now - stamp > ttl:
            return True
    return False if judged else None


# --- Returned features -------------------------------------------------------------------


@dataclass
class _OnlineRead:
    columns: dict[str, np.ndarray]
    missing: int
    total: int
    oldest: int | None  # epoch seconds of the oldest present value
    oldest_by_name: dict[str, int] = field(default_factory=dict)  # the same, per feature


def _read_online(response: Any, entity_keys: set[str]) -> _OnlineRead:
    """The feature columns, missing count and oldest event time of an online response."""
    proto = response.proto
    out = _OnlineRead({}, 0, 0, None)
    # Plain Python over the repeated fields: a lookup holds a few entities, and numpy's
    # per-call cost was most of this function's time.
    for name, vector in zip(proto.metadata.feature_names.val, proto.results, strict=False):
        if name in entity_keys:
            continue
        statuses = list(vector.statuses)
        present = statuses.count(_PRESENT)
        out.total += len(statuses)
        out.missing += len(statuses) - present
        stamps = vector.event_timestamps
        if present and len(stamps) == len(statuses):
            stamped = [
                t.seconds
                for t, status in zip(stamps, statuses, strict=True)
                if status == _PRESENT and t.seconds > 0
            ]
            if stamped:
                oldest = min(stamped)
                out.oldest = oldest if out.oldest is None else min(out.oldest, oldest)
                out.oldest_by_name[str(name)] = oldest
        column = _column(vector.values)
        if column is not None:
            out.columns[str(name)] = column
    return out


def _column(values: Any) -> np.ndarray | None:
    kinds = [v.WhichOneof("val") for v in values]
    found = set(kinds)
    found.discard(None)
    found.discard("null_val")
    if found <= _NUMERIC_KINDS:
        return np.array(
            [
                float(getattr(v, k)) if k in _NUMERIC_KINDS else np.nan
                for v, k in zip(values, kinds, strict=True)
            ],
            dtype=np.float64,
        )
    if found <= _TEXT_KINDS:
        return np.array(
            [
                str(getattr(v, k)) if k in _TEXT_KINDS else None
                for v, k in zip(values, kinds, strict=True)
            ],
            dtype=object,
        )
    return None


def _frame_columns(frame: Any, exclude: set[str]) -> dict[str, np.ndarray]:
    """Feature columns of a historical result, in the same form as online reads."""
    columns: dict[str, np.ndarray] = {}
    for name in sorted(str(c) for c in frame.columns):
        if name in exclude or name in _HISTORICAL_META:
            continue
        series = frame[name]
        kind = series.dtype.kind
        if kind in "biuf":
            columns[name] = series.to_numpy(dtype=np.float64, na_value=np.nan)
        elif kind == "O" or str(series.dtype).startswith("string"):
            values = series.to_numpy(dtype=object)
            if all(v is None or isinstance(v, str | float) for v in values[:64]):
                columns[name] = np.array(
                    [v if isinstance(v, str) else None for v in values], dtype=object
                )
    return columns


def _observe(store: Any, columns: Mapping[str, np.ndarray]) -> tuple[Attributes, int | None]:
    if not columns or not get_config().signals:
        return {}, None
    monitor = ensure_state(store).monitor()
    attrs: Attributes = dict(monitor.observe(dict(sorted(columns.items()))))
    return attrs, monitor.feature_count


def _written(frame: Any) -> Attributes:
    """Rows, quality and fingerprints of a DataFrame written to the store."""
    if frame is None or not (hasattr(frame, "columns") or isinstance(frame, Mapping)):
        return {}
    table = to_table(frame)
    attrs: Attributes = {semconv.DL_DATA_ROWS: table.rows}
    if not get_config().signals:
        return attrs
    attrs[semconv.DL_DATA_SCHEMA_FINGERPRINT] = table.schema_fingerprint
    fingerprint = data_fingerprint(table)
    if fingerprint is not None:
        attrs[semconv.DL_DATA_FINGERPRINT] = fingerprint
    share = nan_fraction(table)
    if share is not None:
        attrs[semconv.DL_QUALITY_NAN_FRACTION] = share
    return attrs


def _written_guarded(method: str, frame: Any) -> Attributes:
    """``_written`` under its own guard: the written data's signals failing must not cost
    the span its views and source."""
    try:
        return _written(frame)
    except Exception:
        report_internal_error(f"{_SITE}.{method}.written")
        return {}


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime.datetime | datetime.date) else None


# --- Historical retrieval jobs -----------------------------------------------------------


@dataclass
class _PendingJob:
    store: Any
    call: DlSpan
    entity_keys: set[str]
    finalizer: weakref.finalize[Any, Any] | None = None


def _end_unmaterialised(call: DlSpan, end_ns: int) -> None:
    call.finish(end_ns)


def _job_signals(pending: _PendingJob, result: Any) -> Attributes:
    frame = result.to_pandas() if hasattr(result, "to_pandas") else result
    attrs: Attributes = {semconv.DL_DATA_ROWS: len(frame)}
    signals, _count = _observe(pending.store, _frame_columns(frame, pending.entity_keys))
    attrs.update(signals)
    return attrs


_in_job: ContextVar[bool] = ContextVar("otel_dl_feast_in_job", default=False)


class FeastInstrumentor(DlInstrumentor):
    """Traces Feast ``FeatureStore`` calls; see the module docstring."""

    # Class-level: BaseInstrumentor is a singleton whose __init__ runs on every call.
    _lock = threading.RLock()
    _pending: ClassVar[weakref.WeakKeyDictionary[Any, _PendingJob]] = weakref.WeakKeyDictionary()

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("feast >= 0.44",)

    # -- patching -----------------------------------------------------------------------
    def patches(self) -> Patches:
        return {
            _STORE_MODULE: {
                "FeatureStore.get_online_features": self._wrap_online,
                "FeatureStore.get_historical_features": self._wrap_historical,
                "FeatureStore.materialize": self._wrap_materialize,
                "FeatureStore.materialize_incremental": self._wrap_materialize,
                "FeatureStore.push": self._wrap_push,
                "FeatureStore.write_to_online_store": self._wrap_write,
            },
            _JOB_MODULE: {
                "RetrievalJob.to_df": self._wrap_materialise_job,
                "RetrievalJob.to_arrow": self._wrap_materialise_job,
            },
        }

    def _traced(
        self, wrapped: Any, instance: Any, args: Any, kwargs: Any, method: str, **extract: Any
    ) -> Any:
        return traced_call(
            wrapped,
            instance,
            args,
            kwargs,
            site=f"{_SITE}.{method}",
            name=semconv.SPAN_FEATURE_STORE_PREFIX + method,
            stage=semconv.STAGE_FEATURE_STORE,
            component=semconv.COMPONENT_FEAST,
            hooks=self._hooks,
            tracer=self._tracer,
            **extract,
        )

    # -- online reads -------------------------------------------------------------------
    def _wrap_online(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return self._traced(
            wrapped,
            instance,
            args,
            kwargs,
            "get_online_features",
            before=self._online_before,
            after=self._online_after,
        )

    @staticmethod
    def _online_before(call: DlCall) -> Attributes:
        views, service = _views_of(_arg(call, 0, "features"))
        attrs = _store_attributes(call.instance, views, service)
        count = _entity_count(_arg(call, 1, "entity_rows"))
        if count is not None:
            attrs[semconv.DL_FEATURE_ENTITY_COUNT] = count
        return attrs

    @staticmethod
    def _online_after(call: DlCall, response: Any) -> Attributes:
        read = _read_online(response, _entity_keys(_arg(call, 1, "entity_rows")))
        attrs: Attributes = {}
        if read.total:
            attrs[semconv.DL_FEATURE_MISSING_FRACTION] = read.missing / read.total
        if read.oldest is not None:
            now = _now()
            attrs[semconv.DL_FEATURE_FRESHNESS] = max(now - read.oldest, 0.0)
            stale = _stale(call.instance, _arg(call, 0, "features"), read.oldest_by_name, now)
            if stale is not None:
                attrs[semconv.DL_FEATURE_STALE] = stale
        try:
            signals, _count = _observe(call.instance, read.columns)
            attrs.update(signals)
        except Exception:
            report_internal_error(f"{_SITE}.online.signals")
        return attrs

    # -- historical reads ---------------------------------------------------------------
    def _wrap_historical(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return traced_call(
            wrapped,
            instance,
            args,
            kwargs,
            site=f"{_SITE}.historical",
            name=semconv.SPAN_FEATURE_STORE_PREFIX + "get_historical_features",
            stage=semconv.STAGE_FEATURE_STORE,
            component=semconv.COMPONENT_FEAST,
            before=self._historical_before,
            hooks=self._hooks,
            keep_open=self._park_job,
            tracer=self._tracer,
        )

    def _park_job(self, lifecycle: DlSpan, call: DlCall, job: Any, end_ns: int) -> bool:
        """Keep the span open until the lazy retrieval job is materialised."""
        entity_df = _arg(call, 0, "entity_df")
        keys = {str(c) for c in getattr(entity_df, "columns", ())}
        pending = _PendingJob(call.instance, lifecycle, keys)
        pending.finalizer = weakref.finalize(job, _end_unmaterialised, lifecycle, end_ns)
        with self._lock:
            self._pending[job] = pending
        return True

    @staticmethod
    def _historical_before(call: DlCall) -> Attributes:
        views, service = _views_of(_arg(call, 1, "features", []))
        attrs = _store_attributes(call.instance, views, service)
        entity_df = _arg(call, 0, "entity_df")
        if hasattr(entity_df, "columns"):
            attrs[semconv.DL_FEATURE_ENTITY_COUNT] = len(entity_df)
        return attrs

    def _wrap_materialise_job(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if _in_job.get():
            return wrapped(*args, **kwargs)
        with self._lock:
            pending = self._pending.pop(instance, None)
        if pending is None:
            return wrapped(*args, **kwargs)
        marker = _in_job.set(True)
        lifecycle = pending.call
        try:
            if pending.finalizer is not None:
                pending.finalizer.detach()
            lifecycle.attach()
        except Exception:
            report_internal_error(f"{_SITE}.historical")
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            end_ns = time.time_ns()
            _in_job.reset(marker)
            lifecycle.detach()
            lifecycle.error(exc)
            lifecycle.finish(end_ns)
            raise
        end_ns = time.time_ns()
        _in_job.reset(marker)
        lifecycle.detach()
        try:
            self._finish_job(pending, instance, result, end_ns)
        except Exception:
            report_internal_error(f"{_SITE}.historical")
        return result

    def _finish_job(self, pending: _PendingJob, job: Any, result: Any, end_ns: int) -> None:
        lifecycle = pending.call
        lifecycle.extract("historical.signals", _job_signals, pending, result)
        lifecycle.hook(self._hooks.response, DlCall(semconv.COMPONENT_FEAST, job, (), {}), result)
        lifecycle.finish(end_ns)

    # -- writes -------------------------------------------------------------------------
    def _wrap_materialize(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        method = wrapped.__name__
        incremental = method == "materialize_incremental"

        def before(call: DlCall) -> Attributes:
            offset = 0 if incremental else 1
            views = _arg(call, offset + 1, "feature_views")
            if views is None:
                views = sorted(n for n, i in _view_infos(call.instance).items() if i.materialized)
            attrs = _store_attributes(call.instance, [str(v) for v in views], None)
            start = None if incremental else _iso(_arg(call, 0, "start_date"))
            end = _iso(_arg(call, offset, "end_date"))
            if start:
                attrs[semconv.DL_FEATURE_MATERIALIZE_START] = start
            if end:
                attrs[semconv.DL_FEATURE_MATERIALIZE_END] = end
            return attrs

        return self._traced(wrapped, instance, args, kwargs, method, before=before)

    def _wrap_push(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        def before(call: DlCall) -> Attributes:
            source = _arg(call, 0, "push_source_name")
            # The views the push writes: every view the push source feeds, as Feast finds them.
            infos = _view_infos(call.instance)
            fed = sorted(name for name, info in infos.items() if info.push_source == source)
            attrs = _store_attributes(call.instance, fed, None)
            if source:
                attrs[semconv.DL_FEATURE_PUSH_SOURCE] = str(source)
            attrs.update(_written_guarded("push", _arg(call, 1, "df")))
            return attrs

        return self._traced(wrapped, instance, args, kwargs, "push", before=before)

    def _wrap_write(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        def before(call: DlCall) -> Attributes:
            view = _arg(call, 0, "feature_view_name")
            attrs = _store_attributes(call.instance, [str(view)] if view else [], None)
            frame = _arg(call, 1, "df")
            written = frame if frame is not None else _arg(call, 2, "inputs")
            attrs.update(_written_guarded("write_to_online_store", written))
            return attrs

        return self._traced(wrapped, instance, args, kwargs, "write_to_online_store", before=before)
