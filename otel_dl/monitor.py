"""FeatureMonitor: the one object an instrumentor keeps per data source or model.

It turns each batch into span attributes named by :mod:`otel_dl.semconv`::

    monitor = FeatureMonitor(Reference.load("reference.json"))   # or FeatureMonitor()
    span.set_attributes(monitor.observe(batch))
    span.set_attributes(confidence_attributes(outputs, threshold=0.5))

Every batch gets ``dl.batch.size``, ``dl.quality.nan_fraction`` and the data and schema
fingerprints. With a reference it also gets ``dl.quality.out_of_range_fraction``,
``dl.quality.schema_mismatch`` and, every ``drift_every``-th batch, the drift of the
last ``drift_window_rows`` rows (``dl.drift.score``/``method``/``feature``/``status``),
once that window holds at least ``drift_min_rows`` rows.
Without a reference the monitor keeps the first ``baseline_rows`` rows, fits one from
them (auto-baseline) and reports drift once ``drift_min_rows`` more rows are in.

Batches larger than ``drift_max_rows`` feed drift with a deterministic subsample (evenly
spaced rows), and batches with more than ``drift_max_features`` numeric features (an
image flattens to thousands) profile and score an evenly spaced subset of them; quality
and fingerprints still cover every value. Nothing here raises on data: whatever cannot be
computed is left out.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from otel_dl import semconv
from otel_dl._config import Config, get_config
from otel_dl.confidence import Summary, summarize, summarize_each, to_scores
from otel_dl.drift import DriftTracker
from otel_dl.provenance import data_fingerprint, data_fingerprints
from otel_dl.quality import (
    batch_quality,
    nan_excess,
    nan_excess_each,
    quality_each,
    range_excess,
)
from otel_dl.reference import Reference
from otel_dl.table import Table, is_frame, to_numpy, to_table

AttributeValue = str | bool | int | float


def to_features(batch: Any) -> tuple[np.ndarray, list[str]]:
    """A batch as a 2-D float array (rows x numeric features) and the feature names.

    0-d is one row of one feature, 1-D one feature of many rows, 2-D rows x columns, and
    3-D+ keeps the first axis as rows and flattens the rest (C order). DataFrame and
    mapping columns that are not numeric are left out (they are categorical features).
    """
    table = to_table(batch)
    return table.numeric, list(table.numeric_names)


@lru_cache(maxsize=64)
def _spaced(rows: int, limit: int) -> np.ndarray:
    return (np.arange(limit) * rows) // limit


def _subsample(table: Table, limit: int) -> Table:
    if table.rows <= limit:
        return table
    rows = _spaced(table.rows, limit)
    return Table(
        limit,
        table.names,
        table.numeric[rows],
        table.numeric_names,
        {k: v[rows] for k, v in table.categorical.items()},
        table.schema,
    )


def _narrow(table: Table, limit: int) -> Table:
    """At most ``limit`` numeric features, evenly spaced: an image batch has thousands of
    pixel features, and drift on every one costs far more than it tells."""
    count = len(table.numeric_names)
    if count <= limit:
        return table
    columns, numeric_names, names = _narrowed_names(table.names, table.numeric_names, limit)
    return Table(
        table.rows,
        names,
        # take(): a C-ordered copy, three times faster than [:, columns] on an image batch
        np.take(table.numeric, columns, axis=1),
        numeric_names,
        table.categorical,
        table.schema,
    )


_narrow_cache: dict[tuple[int, int, int], tuple[Any, ...]] = {}


def _narrowed_names(
    names: tuple[str, ...], numeric_names: tuple[str, ...], limit: int
) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """The kept columns and names, cached: batches of one width share their name tuples."""
    key = (id(names), id(numeric_names), limit)
    cached = _narrow_cache.get(key)
    if cached is not None and cached[0] is names and cached[1] is numeric_names:
        return cached[2], cached[3], cached[4]
    count = len(numeric_names)
    columns = (np.arange(limit) * count) // limit
    kept = tuple(numeric_names[i] for i in columns)
    if len(names) == count:
        kept_names = kept
    else:
        keep = set(kept)
        numeric = set(numeric_names)
        kept_names = tuple(n for n in names if n in keep or n not in numeric)
    if len(_narrow_cache) > 64:
        _narrow_cache.clear()
    _narrow_cache[key] = (names, numeric_names, columns, kept, kept_names)
    return columns, kept, kept_names


def _rows_of(table: Table, start: int, end: int) -> Table:
    """Rows ``start`` up to ``end`` of ``table`` (the table itself when that is all)."""
    if start == 0 and end == table.rows:
        return table
    return Table(
        end - start,
        table.names,
        table.numeric[start:end],
        table.numeric_names,
        {k: v[start:end] for k, v in table.categorical.items()},
        table.schema,
    )


def _concat(tables: list[Table]) -> Table:
    first = tables[0]
    return Table(
        sum(t.rows for t in tables),
        first.names,
        np.concatenate([t.numeric for t in tables], axis=0),
        first.numeric_names,
        {k: np.concatenate([t.categorical[k] for t in tables]) for k in first.categorical},
        first.schema,
    )


MIN_BINNED_ROWS = 128
"""Rows the monitor queues at least before binning them into the drift window."""

BURST_MAX_VALUES = 1 << 16
"""A call's inputs of at most this many feature values (256 KiB in float32), and its
scores of at most this many values, may have their signals computed later, in a burst
with other calls of the same source (see :meth:`FeatureMonitor.profile_burst`): a
request of a few rows as well as a batch of 256 rows of 32 features."""

BURST_COPY_MAX_BYTES = 1 << 20
"""A call's numeric input that the burst cannot profile with other calls' in one pass
(an image batch, a table wider than ``drift_max_features``) may wait for the burst as a
copy of at most this many bytes, to be profiled there by :meth:`FeatureMonitor.observe`:
in float32, 64 RGB images of 32x32 pixels, or 256 rows of 1,024 features."""


class Later(dict[str, Any]):
    """What a signal extractor returns for a call whose signals wait for a burst: the
    attributes known now, plus private copies of the inputs and/or the scores that
    :meth:`FeatureMonitor.profile_burst` turns into the rest.

    ``source`` is another call's :class:`Later` whose inputs are this call's inputs (the
    same tensor, unchanged: a DataLoader batch passed on to a model): this call takes that
    profile once its burst has made it (:meth:`when_profiled`), and profiles nothing
    itself. ``profile`` is what a burst found for ``inputs`` (None until then)."""

    __slots__ = (
        "_batch",
        "_waiters",
        "inputs",
        "kind",
        "monitor",
        "predictions",
        "profile",
        "scores",
        "source",
    )

    def __init__(
        self,
        monitor: FeatureMonitor,
        inputs: np.ndarray | Table | None = None,
        scores: np.ndarray | None = None,
        predictions: int | None = None,
        source: Later | None = None,
        kind: str = "auto",
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.inputs = inputs
        self.scores = scores
        self.kind = kind  # how ``scores`` read, as summarize's ``kind``
        # Rows of the whole output (``scores`` may hold a sample of them).
        if predictions is None and scores is not None:
            predictions = len(scores)
        self.predictions = predictions
        self.source = source
        self.profile: dict[str, AttributeValue] | None = None
        self._waiters: list[Callable[[Mapping[str, Any]], None]] | None = None
        # (id, weak reference, token) of the batch ``inputs`` copies, for :func:`share`.
        self._batch: tuple[int, weakref.ref[Any], Any] | None = None

    @property
    def parked_values(self) -> int:
        """Input and score values this call's burst will read."""
        inputs, scores = self.inputs, self.scores
        count = 0 if scores is None else scores.size
        if inputs is not None:
            count += inputs.numeric.size if isinstance(inputs, Table) else inputs.size
        return count

    def merge(self, other: Later) -> None:
        """Take ``other``'s inputs or scores where this has none (one call, one monitor)."""
        self.update(other)
        if self.inputs is None:
            self.inputs = other.inputs
        if self.scores is None:
            self.scores, self.predictions, self.kind = other.scores, other.predictions, other.kind
        if self.source is None:
            self.source = other.source

    def profiled(self, attributes: dict[str, AttributeValue]) -> None:
        """Record what a burst found for ``inputs``, and hand it to the calls waiting."""
        with _handoff:
            self.profile = attributes
            waiters, self._waiters = self._waiters, None
            self.inputs = None  # the copy has served
            _handoff.notify_all()
        for waiter in waiters or ():
            waiter(attributes)

    def when_profiled(self, waiter: Callable[[Mapping[str, Any]], None]) -> None:
        """``waiter(profile)`` once :meth:`profiled` is (now, when it already was)."""
        with _handoff:
            profile = self.profile
            if profile is None:
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append(waiter)
                return
        waiter(profile)

    def resolved(self, timeout: float = 1.0) -> dict[str, AttributeValue]:
        """The profile now: its burst is profiled at once when it is still parked (and
        waited for, ``timeout`` seconds at most, when another thread is profiling it);
        empty when it could not be had."""
        if self.profile is None and _flush_parked is not None:
            _flush_parked(self.monitor)
        with _handoff:
            _handoff.wait_for(lambda: self.profile is not None, timeout)
            return dict(self.profile or {})


# Set by otel_dl._burst: profile the calls a monitor has parked, now.
_flush_parked: Callable[[FeatureMonitor], None] | None = None
# Set by otel_dl._burst: whether a monitor has parked calls whose inputs wait for a burst.
_parks_inputs: Callable[[FeatureMonitor], bool] | None = None
_handoff = threading.Condition(threading.Lock())


def combine(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of ``parts`` in one dict, a :class:`Later` when any part is one."""
    later: Later | None = None
    out: dict[str, Any] = {}
    for part in parts:
        out.update(part)
        if isinstance(part, Later):
            if later is None:
                later = part
            else:
                later.merge(part)
    if later is None:
        return out
    later.update(out)
    return later


def _float_rows(value: Any) -> np.ndarray | None:
    """A CPU numpy array or torch tensor of 2 dimensions, at least one row and column and
    float32/float64 values, as a numpy array (a view: copy what must outlive the call);
    else None."""
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != 2 or not shape[0] or not shape[1]:
        return None
    array = _cpu_array(value)
    if array is None or array.dtype.char not in "fd":  # float32, float64
        return None
    return array


def _cpu_array(value: Any) -> np.ndarray | None:
    """A numpy array as is, a CPU torch tensor as a numpy view of it; else None."""
    if isinstance(value, np.ndarray):
        return value
    # ``is_cpu`` reads a flag; ``device.type`` would build a device object first.
    if (
        not type(value).__module__.startswith("torch")
        or getattr(value, "is_cpu", False) is not True
    ):
        return None
    try:
        return to_numpy(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class FeatureMonitor:
    """Quality, provenance and drift attributes for each batch of one source. Thread-safe.

    The work per batch is bounded: the table view, the fingerprint, the quality counts
    and a copy of at most ``drift_max_rows`` evenly spaced rows. Binning those rows into
    the drift window and scoring it happen every ``drift_every``-th batch (at once for the
    first score, and for a batch that alone holds ``drift_min_rows`` rows); the batches
    between carry the latest score.
    """

    def __init__(
        self,
        reference: Reference | None = None,
        *,
        config: Config | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config or get_config()
        self.name = name
        self.given = reference  # None: the reference is learned from the first batches
        self._lock = threading.Lock()
        self._batches = 0
        self._calls = itertools.count(1)  # next() is atomic: no lock per call
        self._baseline: list[Table] = []
        self._baseline_rows = 0
        self._reference: Reference | None = None
        self._tracker: DriftTracker | None = None
        self._feature_count: int | None = None
        self._pending: list[Table] = []
        self._pending_rows = 0
        self._since_score = 0
        self._latest: dict[str, AttributeValue] = {}
        # (dtype, shape past the rows) -> the Table of such a 2-D batch's first row, or None
        # when batches of that shape are read otherwise than as the reference's numeric
        # features; batches of other shapes are never here, and are observed one by one.
        self._burst_tables: dict[tuple[np.dtype, tuple[int, ...]], Table | None] = {}
        if reference is not None:
            self._use(reference)

    @property
    def feature_count(self) -> int | None:
        """Features in the last batch observed (None before the first)."""
        return self._feature_count

    @property
    def reference(self) -> Reference | None:
        """The reference in force: given, fitted from the baseline, or None so far."""
        return self._reference

    @property
    def window_rows(self) -> int:
        """Rows in the drift window the latest score covers (0 before the first)."""
        return self._tracker.rows if self._tracker is not None else 0

    def _use(self, reference: Reference) -> None:
        config = self.config
        self._reference = reference
        self._tracker = DriftTracker(
            reference,
            method=config.drift_method,
            window_rows=config.drift_window_rows,
            warn=config.drift_warn,
            alert=config.drift_alert,
            false_alarm_rate=config.drift_false_alarm_rate or None,
        )

    def _collect(self, table: Table) -> None:
        """Keep rows for the auto-baseline; fit once ``baseline_rows`` are in."""
        if self._baseline and table.schema != self._baseline[0].schema:
            return  # rows of another shape cannot join the same profile
        need = self.config.baseline_rows - self._baseline_rows
        part = _rows_of(table, 0, min(table.rows, need))
        # A copy: the caller may refill its buffer with the next batch.
        self._baseline.append(_copy(part))
        self._baseline_rows += part.rows
        if self._baseline_rows >= self.config.baseline_rows:
            data = _concat(self._baseline)
            self._baseline = []
            self._use(Reference.fit(data, bins=self.config.drift_bins))

    def observe(self, batch: Any) -> dict[str, AttributeValue]:
        """Span attributes for one batch; never raises on data."""
        attributes: dict[str, AttributeValue] = {}
        # On a failure, keep what was computed before it.
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError, MemoryError):
            self._observe(batch, attributes)
        return attributes

    def _observe(self, batch: Any, out: dict[str, AttributeValue]) -> None:
        reference = self._reference
        full = reference.read(batch) if reference is not None else to_table(batch)
        out[semconv.DL_BATCH_SIZE] = full.rows
        self._feature_count = len(full.names)
        out[semconv.DL_DATA_SCHEMA_FINGERPRINT] = full.schema_fingerprint
        fingerprint = data_fingerprint(full)
        if fingerprint is not None:
            out[semconv.DL_DATA_FINGERPRINT] = fingerprint
        table = _narrow(full, self.config.drift_max_features)
        nan, outside = batch_quality(reference, full, table)
        _set(out, semconv.DL_QUALITY_NAN_FRACTION, nan)
        if reference is None:
            if table.rows:
                with self._lock:
                    if self._reference is None:
                        self._collect(table)
            return
        # A share of 0 has no excess, and its attribute is left out: it costs every clean
        # span an attribute, and a reader takes the share (0) in its place.
        if nan:
            _set(out, semconv.DL_QUALITY_NAN_EXCESS_FRACTION, nan_excess(reference, full, nan))
        out[semconv.DL_QUALITY_SCHEMA_MISMATCH] = (
            table.schema_fingerprint != reference.schema_fingerprint
        )
        # Quality counts every value; only the reference and drift use the subset.
        _set(out, semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION, outside)
        if outside:
            _set(
                out,
                semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION,
                range_excess(reference, table, outside),
            )
        if table.rows:
            self._feed(_copy(_subsample(table, self.config.drift_max_rows)))
        out.update(self._latest)

    def _feed(self, sample: Table) -> None:
        """Queue a batch's drift rows; bin and score the queue when it is due."""
        self._feed_calls(sample, (sample.rows,))

    def _feed_calls(self, rows: Table, counts: Sequence[int]) -> list[dict[str, AttributeValue]]:
        """Queue the drift rows of several calls, in call order (``rows`` holds them one
        call after another, ``counts[i]`` rows of call ``i``), binning and scoring the
        queue wherever a call makes it due, as feeding them one by one would; the latest
        drift attributes after each call."""
        latest: list[dict[str, AttributeValue]] = []
        with self._lock:
            tracker = self._tracker
            if tracker is None:
                return [self._latest] * len(counts)
            if self._pending and rows.schema != self._pending[0].schema:
                self._pending, self._pending_rows = [], 0  # the old shape's rows cannot join
            config = self.config
            # Every drift_every-th batch, but never for fewer than MIN_BINNED_ROWS rows (or
            # drift_max_rows, if fewer): one-row requests are binned 128 at a time, not one
            # by one; and at once for a batch that alone holds drift_min_rows rows (a file
            # read, a historical retrieval): it costs enough itself, and comes too seldom
            # to wait for.
            least = min(MIN_BINNED_ROWS, config.drift_max_rows)
            queued = end = 0  # rows of ``rows`` queued, and fed so far
            for count in counts:
                end += count
                self._pending_rows += count
                self._since_score += 1
                first = (
                    not self._latest and tracker.rows + self._pending_rows >= config.drift_min_rows
                )
                due = (
                    self._since_score >= config.drift_every and self._pending_rows >= least
                ) or count >= config.drift_min_rows
                if first or due:
                    self._pending.append(_rows_of(rows, queued, end))
                    queued = end
                    self._score(tracker)
                latest.append(self._latest)
            if queued < end:
                self._pending.append(_rows_of(rows, queued, end))
        return latest

    def _score(self, tracker: DriftTracker) -> None:
        """Bin the queued rows into the drift window and score it (under the lock)."""
        pending = _concat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows, self._since_score = [], 0, 0
        result = tracker.update(pending)
        # A window of a few dozen rows scores high on noise alone (psi's expected value
        # grows like bins/rows): report drift only once the window is large.
        if (
            tracker.rows >= self.config.drift_min_rows
            and result.score is not None
            and result.feature is not None
            and result.status
        ):
            self._latest = {
                semconv.DL_DRIFT_SCORE: result.score,
                semconv.DL_DRIFT_METHOD: result.method,
                semconv.DL_DRIFT_FEATURE: result.feature,
                semconv.DL_DRIFT_STATUS: result.status,
                semconv.DL_DRIFT_WINDOW_ROWS: tracker.rows,
            }

    def confidence(self, outputs: Any, kind: str = "auto") -> dict[str, AttributeValue]:
        """``dl.confidence.*`` of one call's outputs: exact when the call has at most
        ``confidence_rows`` predictions (one request) and on every ``drift_every``-th call,
        else on ``confidence_rows`` evenly spaced predictions; ``dl.confidence.rows`` says
        how many the figures cover. ``kind``: as :func:`~otel_dl.confidence.summarize`'s."""
        limit = None if self._exact_call() else self.config.confidence_rows
        return confidence_attributes(outputs, self.config.confidence_threshold, limit, kind)

    def _exact_call(self) -> bool:
        return next(self._calls) % self.config.drift_every == 0

    def confidence_later(
        self, outputs: Any, *, sample: bool = True, kind: str = "auto"
    ) -> dict[str, Any]:
        """What :meth:`confidence` gives, left for :meth:`profile_burst` when it can be: a
        :class:`Later` holding a copy of the rows the figures cover (the same rows
        :meth:`confidence` would read) of a 2-D CPU output of two or more classes. Other
        outputs, and an exact call whose output exceeds ``BURST_MAX_VALUES``, are
        summarised now. ``sample=False``: always on every prediction. A list of
        ``{class: score}`` rows (ONNX ZipMap) is read into an array, only the rows the
        figures cover. ``kind``: how the scores read, as
        :func:`~otel_dl.confidence.summarize`'s (``logits`` for a model's raw outputs,
        whatever their values)."""
        if _class_maps(outputs):
            return self._class_maps_later(outputs, sample)
        scores = _float_rows(outputs)
        if scores is None or scores.shape[1] < 2:
            return self.confidence(outputs, kind) if sample else self._exact(outputs, kind)
        rows, limit = len(scores), self.config.confidence_rows
        # Every call counts towards the drift_every-th exact one, as in confidence().
        if sample and not self._exact_call() and rows > limit:
            return Later(self, scores=scores[_spaced(rows, limit)], predictions=rows, kind=kind)
        if scores.size > BURST_MAX_VALUES:
            return self._exact(outputs, kind)
        return Later(self, scores=np.array(scores, order="C"), kind=kind)

    def _exact(self, outputs: Any, kind: str = "auto") -> dict[str, AttributeValue]:
        return confidence_attributes(outputs, self.config.confidence_threshold, kind=kind)

    def _class_maps_later(self, outputs: Sequence[Mapping[Any, Any]], sample: bool) -> Any:
        rows, limit = len(outputs), self.config.confidence_rows
        sampled = sample and not self._exact_call() and rows > limit
        try:
            scores = to_scores([outputs[i] for i in _spaced(rows, limit)] if sampled else outputs)
            if scores.shape[1] < 2 or scores.size > BURST_MAX_VALUES:
                summary = summarize(scores, threshold=self.config.confidence_threshold)
                return _confidence_out(rows, summary)
        except _UNREADABLE:
            return {}
        return Later(self, scores=scores, predictions=rows if sampled else None)

    # -- bursts of calls ----------------------------------------------------------------

    def burst_inputs(self, batch: Any) -> np.ndarray | Table | None:
        """A private copy of ``batch`` when its signals can wait for :meth:`profile_burst`
        (None before the reference exists: the baseline is learned call by call):

        - a 2-D float32/float64 numpy array or CPU tensor of at most ``BURST_MAX_VALUES``
          values, read as this monitor's reference's numeric features: profiled with the
          burst's other such calls in one vectorised pass;
        - any other numeric numpy array or CPU tensor with rows, of at most
          ``BURST_COPY_MAX_BYTES`` (an image batch, a wide table): profiled by
          :meth:`observe` in the burst, as it would have been at the call;
        - a pandas DataFrame whose columns are the reference's numeric features, in its
          order, of at most ``BURST_MAX_VALUES`` values (a tabular service's request):
          its values, read as :meth:`observe` reads them, profiled with the burst's
          other frames of the same column names and dtypes.

        None otherwise: observe such a batch now."""
        reference = self._reference
        if reference is None:
            return None
        if is_frame(batch):
            return self._burst_frame(reference, batch)
        values = self._burst_rows(reference, batch)
        if values is not None:
            return values
        return _copy_of(batch)

    def _burst_rows(self, reference: Reference, batch: Any) -> np.ndarray | None:
        """The vectorised case of :meth:`burst_inputs`, copied; else None."""
        if getattr(batch, "ndim", 0) != 2:
            return None
        features = batch.shape[1]
        if features != len(reference.numeric_names) or features > self.config.drift_max_features:
            return None
        values = _float_rows(batch)
        if values is None or values.size > BURST_MAX_VALUES:
            return None
        values = np.array(values, order="C")
        key = (values.dtype, values.shape[1:])
        if key not in self._burst_tables:
            table = reference.read(values[:1])
            fits = (
                not table.categorical
                and table.numeric_names == reference.numeric_names
                and table.numeric.dtype == values.dtype
            )
            self._burst_tables[key] = table if fits else None
        return values if self._burst_tables[key] is not None else None

    def _burst_frame(self, reference: Reference, frame: Any) -> Table | None:
        """The :meth:`burst_inputs` case of a DataFrame: the frame as ``reference.read``
        gives it (a copy of its values), when it holds the reference's numeric features
        alone, in its order; else None. A burst profiles the frames of one schema (column
        names and dtypes) together."""
        rows, features = frame.shape
        if (
            not rows
            or features != len(reference.numeric_names)
            or features > self.config.drift_max_features
            or rows * features > BURST_MAX_VALUES
        ):
            return None
        try:
            table = reference.read(frame)
        except (TypeError, ValueError):
            return None
        values = table.numeric
        if (
            table.categorical
            or table.numeric_names != reference.numeric_names
            or values.dtype.char not in "fd"
        ):
            return None
        # Reading a frame copies its values (they must not change with the frame); a
        # reading that did not is copied here.
        return table if values.base is None and values.flags.c_contiguous else _copy(table)

    def profile_burst(
        self,
        inputs: Sequence[np.ndarray | Table | None],
        scores: list[np.ndarray | None],
        predictions: list[int | None] | None = None,
        kinds: list[str] | None = None,
    ) -> list[dict[str, AttributeValue]]:
        """The attributes :meth:`observe` and :meth:`confidence` would have given each of
        several calls (``inputs[i]`` from :meth:`burst_inputs`; ``scores[i]``,
        ``predictions[i]``, the output's row count when ``scores[i]`` is a sample of it,
        and ``kinds[i]``, how the scores read, from :meth:`confidence_later`'s
        :class:`Later`; None where call ``i`` has none), computed with one vectorised
        pass per signal over the rows of all of them: arrays by layout, DataFrame
        readings by schema, scores by layout and kind (inputs that pass cannot read,
        images say, by :meth:`observe`, one by one in call order)."""
        out: list[dict[str, AttributeValue]] = [{} for _ in inputs]
        frames: dict[tuple[Any, ...], list[tuple[int, Table]]] = {}  # DataFrames, by schema
        arrays: list[np.ndarray | None] = []
        for i, given in enumerate(inputs):
            if isinstance(given, Table):
                frames.setdefault(given.schema, []).append((i, given))
                arrays.append(None)
            else:
                arrays.append(given)
        for key, calls in _groups(arrays).items():
            values = [arrays[i] for i in calls]
            table = self._burst_tables.get(key[:2])
            self._profile_inputs(table, values, [out[i] for i in calls])
        for members in frames.values():
            tables = [table for _, table in members]
            values = [table.numeric for table in tables]
            self._profile_inputs(tables[0], values, [out[i] for i, _ in members])
        for key, calls in _groups(scores, kinds).items():
            stacked, starts = _stack([scores[i] for i in calls])
            threshold = self.config.confidence_threshold
            summaries = summarize_each(stacked, starts, threshold, key[2])
            for i, summary in zip(calls, summaries, strict=True):
                count = predictions[i] if predictions is not None else None
                out[i].update(_confidence_out(count or int(summary["count"]), summary))
        return out

    def _profile_inputs(
        self,
        table: Table | None,
        values: list[Any],
        outs: list[dict[str, Any]],
    ) -> None:
        """Profile calls' rows of one layout together: ``table`` reads them as the
        reference's numeric features (a first row's, or a DataFrame's); without it each
        is observed on its own."""
        reference = self._reference
        if reference is None or table is None:
            for value, out in zip(values, outs, strict=True):
                out.update(self.observe(value))
            return
        stacked, starts = _stack(values)
        schema = table.schema_fingerprint
        fingerprints = data_fingerprints(schema, stacked, starts)
        nan, outside, beyond = quality_each(reference, stacked, starts)
        excess = nan_excess_each(reference, table.numeric_names, stacked, starts, nan)
        mismatch = schema != reference.schema_fingerprint
        self._feature_count = len(table.names)
        ends = [*starts[1:], len(stacked)]
        counts = [end - start for start, end in zip(starts, ends, strict=True)]
        # The rows observe() would feed: at most drift_max_rows of a call, evenly spaced (a
        # subsample is a copy; ``stacked`` is private to this burst already).
        limit = self.config.drift_max_rows
        rows = Table(len(stacked), table.names, stacked, table.numeric_names, {}, table.schema)
        if max(counts) > limit:
            rows = _concat(
                [_subsample(_rows_of(rows, s, e), limit) for s, e in zip(starts, ends, strict=True)]
            )
            counts = [min(count, limit) for count in counts]
        # Fed in call order, as observe() would: each span carries the drift status of the
        # window its own rows completed, never one that later calls made.
        drift = self._feed_calls(rows, counts)
        for i, out in enumerate(outs):
            out.update(drift[i])
            out[semconv.DL_BATCH_SIZE] = len(values[i])
            out[semconv.DL_DATA_SCHEMA_FINGERPRINT] = schema
            out[semconv.DL_DATA_FINGERPRINT] = fingerprints[i]
            out[semconv.DL_QUALITY_NAN_FRACTION] = nan[i]
            if nan[i]:
                out[semconv.DL_QUALITY_NAN_EXCESS_FRACTION] = excess[i]
            out[semconv.DL_QUALITY_SCHEMA_MISMATCH] = mismatch
            _set(out, semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION, outside[i])
            if outside[i]:
                _set(out, semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION, beyond[i])


def _groups(
    arrays: list[np.ndarray | None], kinds: list[str] | None = None
) -> dict[tuple[np.dtype, tuple[int, ...], str], list[int]]:
    """Positions of the arrays, by dtype, shape past the rows and ``kinds[i]`` (``auto``
    without ``kinds``); None entries left out."""
    groups: dict[tuple[np.dtype, tuple[int, ...], str], list[int]] = {}
    for i, array in enumerate(arrays):
        if array is not None:
            kind = kinds[i] if kinds is not None else "auto"
            groups.setdefault((array.dtype, array.shape[1:], kind), []).append(i)
    return groups


def _copy_of(batch: Any) -> np.ndarray | None:
    """A C-ordered copy of a numeric (bool, integer or float) numpy array or CPU tensor
    with at least one dimension and one row, of at most ``BURST_COPY_MAX_BYTES``; else
    None."""
    shape = getattr(batch, "shape", None)
    if not shape or not shape[0]:
        return None
    array = _cpu_array(batch)
    if array is None or array.dtype.kind not in "biuf" or array.nbytes > BURST_COPY_MAX_BYTES:
        return None
    return np.array(array, order="C")


def _stack(arrays: list[Any]) -> tuple[np.ndarray, list[int]]:
    """The rows of ``arrays`` in one array, and where each array's rows start."""
    starts, total = [], 0
    for array in arrays:
        starts.append(total)
        total += len(array)
    stacked = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return stacked, starts


def _set(out: dict[str, AttributeValue], key: str, value: float | None) -> None:
    if value is not None:
        out[key] = value


def confidence_attributes(
    outputs: Any, threshold: float = 0.5, max_rows: int | None = None, kind: str = "auto"
) -> dict[str, AttributeValue]:
    """``dl.confidence.*``, ``dl.confidence.rows`` and ``dl.prediction.count`` for one call;
    never raises on data. ``max_rows`` bounds the predictions the statistics are computed
    on (evenly spaced ones); ``dl.prediction.count`` always counts them all. ``kind``: as
    :func:`~otel_dl.confidence.summarize`'s, for a caller that knows it (one logit per
    row in [0, 1] looks like a probability, and ``auto`` reads it as one)."""
    try:
        if _class_maps(outputs) and max_rows is not None and len(outputs) > max_rows:
            # One {class: score} dict per prediction: read only the rows the figures cover.
            count = len(outputs)
            scores = to_scores([outputs[i] for i in _spaced(count, max_rows)])
        else:
            scores = to_scores(outputs)
            count = scores.shape[0]
            if max_rows is not None and count > max_rows:
                scores = scores[_spaced(count, max_rows)]
        summary = summarize(scores, threshold=threshold, kind=kind)
    except _UNREADABLE:
        return {}
    return _confidence_out(count, summary)


_UNREADABLE = (TypeError, ValueError, IndexError, OverflowError, MemoryError)


def _class_maps(outputs: Any) -> bool:
    """Whether ``outputs`` is a list of ``{class: score}`` rows (ONNX ZipMap)."""
    return isinstance(outputs, (list, tuple)) and bool(outputs) and isinstance(outputs[0], Mapping)


def _confidence_out(count: int, summary: Summary) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {semconv.DL_PREDICTION_COUNT: int(count)}
    if "mean" in summary:
        out[semconv.DL_CONFIDENCE_ROWS] = int(summary["count"])
    out.update({key: float(summary[k]) for k, key in _CONFIDENCE_KEYS if k in summary})
    return out


_CONFIDENCE_KEYS = (
    ("mean", semconv.DL_CONFIDENCE_MEAN),
    ("min", semconv.DL_CONFIDENCE_MIN),
    ("margin_mean", semconv.DL_CONFIDENCE_MARGIN_MEAN),
    ("entropy_mean", semconv.DL_CONFIDENCE_ENTROPY_MEAN),
    ("low_fraction", semconv.DL_CONFIDENCE_LOW_FRACTION),
)


# --- Each batch profiled once ---------------------------------------------------------------

_PROBE_VALUES = 64
_RECENT = 8
_recent_lock = threading.Lock()
# id(batch) -> (weak reference, token, monitor, its profile: the attributes, or the Later
# whose burst will make them)
_Recent = tuple[weakref.ref[Any], Any, FeatureMonitor, dict[str, Any] | Later]
_recent: OrderedDict[int, _Recent] = OrderedDict()


def _token(batch: Any) -> Any:
    """What must be unchanged for a profile of ``batch`` to stand: a torch tensor's version
    counter (every in-place torch operation bumps it) and storage address; else (arrays,
    and inference-mode tensors, which keep no version) the bytes of at most 64 evenly
    spaced values of a contiguous array; None when neither can be read.

    An inference tensor is recognised by ``is_inference()`` before its version is read:
    reading it raises, and the raise costs more than the rest of the token."""
    try:
        if getattr(batch, "is_inference", None) is not None and not batch.is_inference():
            version = batch._version
            if type(version) is int:
                return (version, batch.data_ptr())
    except RuntimeError:
        pass
    try:
        values = to_numpy(batch)
    except (TypeError, ValueError):
        return None
    if not values.flags.c_contiguous or values.dtype.kind not in "fiub":
        return None
    flat = values.reshape(-1)
    return flat[:: max(1, flat.size // _PROBE_VALUES)].tobytes()


def _remember(
    key: int,
    ref: weakref.ref[Any],
    token: Any,
    monitor: FeatureMonitor,
    profile: dict[str, Any] | Later,
) -> None:
    with _recent_lock:
        _recent[key] = (ref, token, monitor, profile)
        _recent.move_to_end(key)
        if len(_recent) > _RECENT:
            _recent.popitem(last=False)


def observe_once(
    monitor: FeatureMonitor,
    batch: Any,
    *,
    later: bool = False,
    shared: bool = False,
) -> dict[str, AttributeValue]:
    """``monitor.observe(batch)``, or the profile another monitor already made of this very
    array or tensor (the same object, unchanged since), when ``monitor`` has no reference
    of its own or the same one. A DataLoader batch passed on to a model is so profiled
    once; the same batch given to the same source again is a new observation. With
    ``later``, a batch :meth:`FeatureMonitor.burst_inputs` takes comes back as a
    :class:`Later` instead of being profiled now, and so does a batch whose other
    monitor's profile is still waiting for its burst (a Later whose ``source`` it is);
    without ``later`` that burst is profiled now. ``shared``: the batch goes on to other
    consumers (a DataLoader's), so a parked one can be offered to them (:func:`share`).

    "Unchanged" is a tensor's version counter, which in-place torch operations bump (a
    write through a numpy view of the tensor does not), or an array's probed values."""
    if not hasattr(batch, "shape"):
        return monitor.observe(batch)
    key = id(batch)
    entry = _recent.get(key)
    if (
        entry is not None
        and entry[0]() is batch
        and entry[2] is not monitor
        and (monitor.given is None or monitor.given is entry[2].given)
    ):
        token = _token(batch)
        if token is not None and entry[1] == token:
            found = entry[3]
            if not isinstance(found, Later):
                return dict(found)
            if found.profile is not None:
                return dict(found.profile)
            if later:
                return Later(monitor, source=found)
            return found.resolved()
    if later:
        inputs = monitor.burst_inputs(batch)
        if inputs is not None:
            parked = Later(monitor, inputs=inputs)
            if shared:  # a batch others may be given next: see share()
                token = _token(batch)
                if token is not None:
                    with contextlib.suppress(TypeError):
                        parked._batch = (key, weakref.ref(batch), token)
            return parked
    if _parks_inputs is not None and _flush_parked is not None and _parks_inputs(monitor):
        _flush_parked(monitor)  # the batches parked before this one feed drift first
    attributes = monitor.observe(batch)
    token = _token(batch)
    if token is not None:
        try:
            ref = weakref.ref(batch)
        except TypeError:
            return attributes
        _remember(key, ref, token, monitor, dict(attributes))
    return attributes


def profiled_elsewhere(batch: Any, monitor: FeatureMonitor) -> bool:
    """Whether a monitor other than ``monitor`` (a DataLoader's) profiled this very
    array or tensor: it is a batch that source made."""
    entry = _recent.get(id(batch))
    return entry is not None and entry[0]() is batch and entry[2] is not monitor


def share(later: Later) -> None:
    """Offer the profile ``later`` is waiting for (its call was parked for a burst) to the
    next consumer of the same batch: a model called with the DataLoader's batch follows
    it (see :func:`observe_once`) instead of profiling the batch again."""
    batch = later._batch
    if batch is not None:
        _remember(*batch, later.monitor, later)


def _reset_after_fork() -> None:
    """In a forked child: profiles the parent's bursts would make never come here."""
    global _recent_lock, _handoff
    _recent_lock = threading.Lock()
    _handoff = threading.Condition(threading.Lock())
    _recent.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _copy(table: Table) -> Table:
    """A table that owns its values (a view of the caller's batch would change with it)."""
    return Table(
        table.rows,
        table.names,
        np.array(table.numeric, order="C"),  # binning runs on rows: C order (~5x faster)
        table.numeric_names,
        dict(table.categorical),
        table.schema,
    )
