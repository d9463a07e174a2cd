"""``otel_dl.watch()``: attach provenance and a drift reference to one object.

The object is a DataLoader, a model, an estimator, a feature store: whatever an
instrumentor traces. A string or path names a data source instead: a file, a URI or a
glob pattern that the dataset-reader instrumentor matches against the paths it reads
(``otel_dl.watch("data/day-*.parquet", reference=ref)``). Instrumentors look the object
up with :func:`watch_state` and put its provenance on their spans and its reference under
their drift signals. Without a
reference, the first ``baseline_rows`` rows the object produces become the baseline.

The registry holds objects weakly, so watching never keeps a model or loader alive.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.util.types import AttributeValue

from otel_dl import semconv
from otel_dl._context import _check
from otel_dl._guard import report_internal_error

if TYPE_CHECKING:
    from otel_dl.monitor import FeatureMonitor
    from otel_dl.reference import Reference

T = TypeVar("T")


@dataclass
class WatchState:
    """What ``watch()`` recorded for one object, plus its lazily built monitor."""

    name: str | None = None
    version: str | None = None
    source: str | None = None
    reference: Reference | None = None
    features: Sequence[str] | None = None
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    # False: the object's outputs are no class scores (a regressor, an embedding model).
    confidence: bool = True
    # The span attributes an instrumentor builds once for this object (model name,
    # version, fingerprint, provenance); None until built, and again when they change.
    static: dict[str, AttributeValue] | None = None
    _monitor: FeatureMonitor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def provenance(self) -> dict[str, AttributeValue]:
        """The span attributes this state contributes (provenance and custom ones)."""
        attrs: dict[str, AttributeValue] = dict(self.attributes)
        if self.source is not None:
            attrs[semconv.DL_DATA_SOURCE] = self.source
        return attrs

    def monitor(self) -> FeatureMonitor:
        """The drift/quality monitor of this object (built on first use)."""
        if self._monitor is None:
            with self._lock:
                if self._monitor is None:
                    from otel_dl.monitor import FeatureMonitor

                    self._monitor = FeatureMonitor(self.reference, name=self.name)
        return self._monitor


_lock = threading.Lock()
_states: weakref.WeakKeyDictionary[Any, WatchState] = weakref.WeakKeyDictionary()
# Objects that cannot be weakly referenced are kept by id together with the object itself.
_strong: dict[int, tuple[Any, WatchState]] = {}


class Source:
    """A data source: a path, URI or glob pattern. ``watch()`` makes one per location."""

    __slots__ = ("__weakref__", "key")

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"Source({self.key!r})"


_sources: dict[str, Source] = {}


def normalise_location(location: str) -> str:
    """A location as sources are keyed: URIs as given, paths absolute."""
    if "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def source_for(location: str | os.PathLike[str]) -> Source:
    """The one :class:`Source` for ``location``; relative paths are made absolute."""
    key = normalise_location(os.fspath(location))
    with _lock:
        found = _sources.get(key)
        if found is None:
            found = _sources[key] = Source(key)
        return found


def source_state(location: str) -> WatchState:
    """The state watched for ``location``, else for the first watched glob pattern it
    matches (``fnmatch``), else the location's own auto-baseline state."""
    key = normalise_location(location)
    with _lock:
        exact = _sources.get(key)
        candidates = list(_sources.values())
    if exact is not None:
        state = watch_state(exact)
        if state is not None:
            return state
    for candidate in candidates:
        if candidate.key != key and fnmatch.fnmatchcase(key, candidate.key):
            state = watch_state(candidate)
            if state is not None:
                return state
    return ensure_state(exact if exact is not None else source_for(key))


def watch(
    obj: T,
    *,
    name: str | None = None,
    version: str | None = None,
    source: str | None = None,
    reference: Reference | None = None,
    features: Sequence[str] | None = None,
    confidence: bool = True,
    **attributes: AttributeValue,
) -> T:
    """Attach provenance and a drift reference to ``obj``; returns ``obj`` unchanged.

    ``name``/``version`` name a model (``dl.model.name``/``dl.model.version``);
    ``source``/``version`` name a data source (``dl.data.source``/``dl.data.version``).
    ``reference`` is an :class:`otel_dl.Reference`; ``features`` selects the batch keys
    or columns that are features. ``confidence=False`` says a model's outputs are no
    class scores (a regressor, an embedding or feature model): its spans then carry
    ``dl.prediction.count`` and no ``dl.confidence.*``, which a value read as a logit
    would make low on healthy calls. Other keyword arguments become span attributes.
    Calling ``watch`` again on the same object replaces what was recorded. A string or
    path ``obj`` names a data source (file, URI or glob pattern) for the dataset readers.
    A ``reference`` that is not a :class:`otel_dl.Reference` (raw training data, a path)
    raises ``TypeError`` here, naming the fix.
    """
    if reference is not None:
        _check_reference(reference)
    if not isinstance(confidence, bool):
        raise TypeError(
            f"otel_dl.watch(confidence=...) takes True or False, not {confidence!r}: "
            "pass confidence=False for a model whose outputs are no class scores"
        )
    target: Any = source_for(obj) if isinstance(obj, str | os.PathLike) else obj
    state = WatchState(
        name=name,
        version=version,
        source=source,
        reference=reference,
        features=list(features) if features is not None else None,
        attributes={key: _check(key, value) for key, value in attributes.items()},
        confidence=confidence,
    )
    with _lock:
        try:
            _states[target] = state
        except TypeError:
            _strong[id(target)] = (target, state)
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(target, state)
        except Exception:
            report_internal_error("watch.listener")
    return obj


def copy_watch(source: Any, target: Any) -> None:
    """Record for ``target``, a copy of ``source`` (``copy.deepcopy``), what ``watch()``
    recorded for ``source``: name, version, data source, reference, features, custom
    attributes and the confidence setting. A reference ``source`` learned from its own
    traffic (the auto-baseline) is the copy's reference too. Nothing else carries over:
    the copy has its own drift window, and its own span attributes (its weights may
    change apart from the source's). Nothing is recorded when ``source`` has no state;
    listeners are not called (the caller starts tracing the copy as it sees fit)."""
    state = watch_state(source)
    if state is None:
        return
    reference = state.reference
    if reference is None and state._monitor is not None:
        reference = state._monitor.reference
    copied = WatchState(
        name=state.name,
        version=state.version,
        source=state.source,
        reference=reference,
        features=state.features,
        attributes=dict(state.attributes),
        confidence=state.confidence,
    )
    with _lock:
        try:
            _states[target] = copied
        except TypeError:
            _strong[id(target)] = (target, copied)


def _check_reference(reference: object) -> None:
    from otel_dl.reference import Reference

    if not isinstance(reference, Reference):
        raise TypeError(
            f"otel_dl.watch(reference=...) takes an otel_dl.Reference, not a "
            f"{type(reference).__module__}.{type(reference).__qualname__}: fit one from "
            "the training data with otel_dl.Reference.fit(data), or load a saved one with "
            "otel_dl.Reference.load(path)"
        )


WatchListener = Callable[[Any, WatchState], None]
_listeners: list[WatchListener] = []


def add_watch_listener(listener: WatchListener) -> None:
    """Call ``listener(obj, state)`` on every later ``watch()``, and now for each watched object.

    Instrumentors use it to start tracing an object the moment it is watched.
    """
    with _lock:
        _listeners.append(listener)
        current = [*_states.items(), *_strong.values()]
    for obj, state in current:
        try:
            listener(obj, state)
        except Exception:
            report_internal_error("watch.listener")


def remove_watch_listener(listener: WatchListener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def watch_state(obj: Any) -> WatchState | None:
    """The state ``watch()`` recorded for ``obj``, or None."""
    try:
        state = _states.get(obj)
    except TypeError:
        state = None
    if state is None and _strong:
        entry = _strong.get(id(obj))
        if entry is not None and entry[0] is obj:
            state = entry[1]
    return state


def ensure_state(obj: Any) -> WatchState:
    """The state of ``obj``, creating an empty one (auto-baseline) when it has none."""
    state = watch_state(obj)
    if state is None:
        with _lock:
            state = watch_state(obj)
            if state is None:
                state = WatchState()
                try:
                    _states[obj] = state
                except TypeError:
                    _strong[id(obj)] = (obj, state)
    return state
