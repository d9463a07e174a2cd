"""Dataset-reader instrumentation: one span per file or dataset read.

``otel_dl.instrument()`` enables it when pandas is installed; by hand::

    from otel_dl.instrumentors.ingest import IngestInstrumentor
    IngestInstrumentor().instrument()

``pandas.read_parquet``, ``pandas.read_csv``, ``pyarrow.parquet.read_table`` and Hugging
Face ``datasets.load_dataset`` each make an ``ingest.<function>`` span
(``dl.stage=ingest``, ``dl.component=ingest``). Each library is patched when it is first
imported, so a library the application never imports costs nothing. A read made inside
another traced read (pandas reading through pyarrow) makes no span of its own.

The span carries:

- ``dl.data.source``: the absolute path of a local file or directory (a
  ``datasets.load_dataset`` call names its ``data_files``, else its ``path``), a URI as
  given, or the ``name`` of an open file object;
- ``dl.data.bytes``: size of the local files read (all files of a directory);
- ``dl.data.rows``: rows returned (summed over the splits of a ``DatasetDict``);
- ``dl.data.version``: ``<mtime ISO 8601>/<size>`` of the local files (latest mtime,
  total size), or the ``datasets`` fingerprint (``split:fingerprint`` per split);
- the schema and data fingerprints, ``dl.quality.nan_fraction``, and, against the
  source's reference, ``dl.quality.out_of_range_fraction``, ``dl.quality.schema_mismatch``
  and the drift signals. They are computed on at most :data:`SIGNAL_ROWS` evenly spaced
  rows, so their cost does not grow with the file.

A reference per source: ``otel_dl.watch`` a path, URI or glob pattern::

    otel_dl.watch("data/*.parquet", reference=Reference.load("ref.json"))
    otel_dl.watch("s3://bucket/train.csv", source="train-set", owner="ranking")

A read uses the state watched for its exact path, else that of the first watched pattern
(``fnmatch``) its path matches, else its own auto-baseline (the first ``baseline_rows``
rows read from that path). The watch's ``source``/``version`` replace the computed
``dl.data.source``/``dl.data.version``; other keyword arguments become span attributes.

Schema changes. Each path remembers the schema fingerprint of its last read; a read whose
schema differs (a column renamed, a dtype changed) sets ``dl.quality.schema_mismatch=true``
whether or not a reference exists, and a reference's own schema check is kept as well.

``read_csv`` with ``chunksize`` or ``iterator=True``, and streaming datasets, return
readers rather than data: their span carries the source, bytes and version only.
"""

from __future__ import annotations

import datetime
import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Final

import numpy as np

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import instrumentation_enabled
from otel_dl._span import Attributes, DlCall, traced_call
from otel_dl._watch import WatchState, normalise_location, source_state

from ._base import DlInstrumentor, Patches

SIGNAL_ROWS: Final = 4096
"""Rows, evenly spaced, on which a read's quality, drift and fingerprints are computed."""

_SITE: Final = "ingest"
_MAX_TRACKED_PATHS: Final = 4096
# (module, attribute) pairs patched once their module is imported.
_TARGETS: Final = {
    "pandas": ("read_parquet", "read_csv"),
    "pyarrow.parquet": ("read_table",),
    "datasets": ("load_dataset",),
}

_in_read: ContextVar[bool] = ContextVar("otel_dl_ingest_in_read", default=False)


_lock = threading.Lock()
_last_schema: OrderedDict[str, str] = OrderedDict()


def _schema_changed(key: str, fingerprint: str) -> bool | None:
    """Whether ``key``'s schema differs from its last read; None on its first read."""
    with _lock:
        previous = _last_schema.pop(key, None)
        _last_schema[key] = fingerprint
        while len(_last_schema) > _MAX_TRACKED_PATHS:
            _last_schema.popitem(last=False)
    return None if previous is None else previous != fingerprint


# --- Where the data comes from -------------------------------------------------------------


def _locations(value: Any) -> list[str]:
    """Paths or URIs named by a reader argument (a path, a list of them, a split mapping)."""
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    if isinstance(value, Mapping):
        return [loc for item in value.values() for loc in _locations(item)]
    if isinstance(value, list | tuple):
        return [loc for item in value for loc in _locations(item)]
    name = getattr(value, "name", None)  # an open file object
    return [name] if isinstance(name, str) else []


def _local_files(locations: Iterable[str]) -> list[str]:
    files: list[str] = []
    for location in locations:
        if "://" in location:
            continue
        if os.path.isdir(location):
            for root, _dirs, names in os.walk(location):
                files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
        elif os.path.isfile(location):
            files.append(location)
    return files


def _file_attributes(locations: list[str]) -> Attributes:
    attrs: Attributes = {}
    if locations:
        attrs[semconv.DL_DATA_SOURCE] = (
            normalise_location(locations[0])
            if len(locations) == 1
            else ",".join(map(normalise_location, locations))
        )
    files = _local_files(locations)
    if files:
        stats = [os.stat(f) for f in files]
        size = sum(s.st_size for s in stats)
        latest = max(s.st_mtime for s in stats)
        stamp = datetime.datetime.fromtimestamp(latest, datetime.timezone.utc)
        attrs[semconv.DL_DATA_BYTES] = size
        attrs[semconv.DL_DATA_VERSION] = f"{stamp.isoformat().replace('+00:00', 'Z')}/{size}"
    return attrs


def _dataset_locations(call: DlCall) -> list[str]:
    files = _locations(call.kwargs.get("data_files"))
    if not files and len(call.args) > 2:
        files = _locations(call.args[2])
    if files:
        return files
    path = call.args[0] if call.args else call.kwargs.get("path")
    return _locations(path)


# --- What was read -------------------------------------------------------------------------


def _rows_positions(rows: int) -> np.ndarray | None:
    """Evenly spaced row positions when ``rows`` exceeds SIGNAL_ROWS, else None (all)."""
    if rows <= SIGNAL_ROWS:
        return None
    return (np.arange(SIGNAL_ROWS, dtype=np.int64) * rows) // SIGNAL_ROWS


def _sample(result: Any) -> tuple[int, Any, str | None]:
    """(rows, a DataFrame of at most SIGNAL_ROWS rows or None, dataset version or None)."""
    module = type(result).__module__
    if module.startswith("pandas") and hasattr(result, "columns"):
        positions = _rows_positions(len(result))
        return len(result), result if positions is None else result.iloc[positions], None
    if module.startswith("pyarrow") and hasattr(result, "num_rows"):
        positions = _rows_positions(result.num_rows)
        part = result if positions is None else result.take(positions)
        return result.num_rows, part.to_pandas(), None
    if module.startswith("datasets"):
        return _dataset_sample(result)
    return 0, None, None


def _dataset_sample(result: Any) -> tuple[int, Any, str | None]:
    if hasattr(result, "num_rows") and hasattr(result, "_fingerprint"):
        positions = _rows_positions(result.num_rows)
        part = result if positions is None else result.select(positions)
        return result.num_rows, part.to_pandas(), str(result._fingerprint)
    if isinstance(result, Mapping):  # DatasetDict: rows of every split, signals of one
        splits = {name: split for name, split in result.items() if hasattr(split, "num_rows")}
        if not splits:
            return 0, None, None
        rows = sum(int(split.num_rows) for split in splits.values())
        version = ",".join(
            f"{name}:{getattr(split, '_fingerprint', '')}" for name, split in splits.items()
        )
        main = splits.get("train") or next(iter(splits.values()))
        _rows, frame, _version = _dataset_sample(main)
        return rows, frame, version
    return 0, None, None


def _signals(key: str, state: WatchState, frame: Any) -> Attributes:
    monitor = state.monitor()
    attrs: Attributes = dict(monitor.observe(frame))
    # Reads are measured in dl.data.rows; the monitor's batch size is the sample's.
    attrs.pop(semconv.DL_BATCH_SIZE, None)
    fingerprint = attrs.get(semconv.DL_DATA_SCHEMA_FINGERPRINT)
    if isinstance(fingerprint, str):
        changed = _schema_changed(key, fingerprint)
        if changed is not None:
            attrs[semconv.DL_QUALITY_SCHEMA_MISMATCH] = changed or bool(
                attrs.get(semconv.DL_QUALITY_SCHEMA_MISMATCH)
            )
    return attrs


class IngestInstrumentor(DlInstrumentor):
    """Traces pandas, pyarrow and ``datasets`` readers; see the module docstring."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("pandas >= 2.0",)

    def patches(self) -> Patches:
        return {
            module: {function: self._wrap_read for function in functions}
            for module, functions in _TARGETS.items()
        }

    def _wrap_read(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if _in_read.get() or not instrumentation_enabled():
            return wrapped(*args, **kwargs)
        function = wrapped.__name__
        keys: list[str | None] = [None]

        def before(call: DlCall) -> Attributes:
            if function == "load_dataset":
                locations = _dataset_locations(call)
            else:
                locations = _locations(call.args[0] if call.args else _first_kwarg(call))
            attrs = _file_attributes(locations)
            if len(locations) == 1:
                keys[0] = normalise_location(locations[0])
            state = source_state(keys[0]) if keys[0] is not None else None
            if state is not None:
                attrs.update(state.provenance())
                if state.version is not None:
                    attrs[semconv.DL_DATA_VERSION] = state.version
            return attrs

        def after(call: DlCall, result: Any) -> Attributes:
            rows, frame, version = _sample(result)
            if frame is None:
                return {}
            attrs: Attributes = {semconv.DL_DATA_ROWS: rows}
            state = source_state(keys[0]) if keys[0] is not None else None
            if version is not None and (state is None or state.version is None):
                attrs[semconv.DL_DATA_VERSION] = version
            if state is not None and keys[0] is not None and get_config().signals:
                attrs.update(_signals(keys[0], state, frame))
            return attrs

        marker = _in_read.set(True)
        try:
            return traced_call(
                wrapped,
                instance,
                args,
                kwargs,
                site=f"{_SITE}.{function}",
                name=semconv.SPAN_INGEST_PREFIX + function,
                stage=semconv.STAGE_INGEST,
                component=semconv.COMPONENT_INGEST,
                before=before,
                after=after,
                hooks=self._hooks,
                tracer=self._tracer,
            )
        finally:
            _in_read.reset(marker)


def _first_kwarg(call: DlCall) -> Any:
    for name in ("path", "filepath_or_buffer", "source"):
        if name in call.kwargs:
            return call.kwargs[name]
    return None
