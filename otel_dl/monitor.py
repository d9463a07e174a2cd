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
import threading
from typing import Any

import numpy as np

from otel_dl import semconv
from otel_dl._config import Config, get_config
from otel_dl.confidence import summarize
from otel_dl.drift import DriftTracker
from otel_dl.provenance import data_fingerprint
from otel_dl.quality import _missing_categories, nan_fraction, out_of_range_fraction
from otel_dl.reference import Reference, Table, to_table

AttributeValue = str | bool | int | float


def to_features(batch: Any) -> tuple[np.ndarray, list[str]]:
    """A batch as a 2-D float array (rows x numeric features) and the feature names.

    0-d is one row of one feature, 1-D one feature of many rows, 2-D rows x columns, and
    3-D+ keeps the first axis as rows and flattens the rest (C order). DataFrame and
    mapping columns that are not numeric are left out (they are categorical features).
    """
    table = to_table(batch)
    return table.numeric, list(table.numeric_names)


def _subsample(table: Table, limit: int) -> Table:
    if table.rows <= limit:
        return table
    rows = (np.arange(limit) * table.rows) // limit
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
        table.numeric[:, columns],
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


class FeatureMonitor:
    """Quality, provenance and drift attributes for each batch of one source. Thread-safe."""

    def __init__(
        self,
        reference: Reference | None = None,
        *,
        config: Config | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config or get_config()
        self.name = name
        self._lock = threading.Lock()
        self._batches = 0
        self._baseline: list[Table] = []
        self._baseline_rows = 0
        self._reference: Reference | None = None
        self._tracker: DriftTracker | None = None
        self._feature_count: int | None = None
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

    def _use(self, reference: Reference) -> None:
        config = self.config
        self._reference = reference
        self._tracker = DriftTracker(
            reference,
            method=config.drift_method,
            window_rows=config.drift_window_rows,
            warn=config.drift_warn,
            alert=config.drift_alert,
        )

    def _collect(self, table: Table) -> None:
        """Keep rows for the auto-baseline; fit once ``baseline_rows`` are in."""
        if self._baseline and table.schema != self._baseline[0].schema:
            return  # rows of another shape cannot join the same profile
        need = self.config.baseline_rows - self._baseline_rows
        part = table if table.rows <= need else _slice(table, need)
        self._baseline.append(part)
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
        with self._lock:
            reference = self._reference
            self._batches += 1
            drift_now = self._batches % self.config.drift_every == 0
        full = reference.read(batch) if reference is not None else to_table(batch)
        out[semconv.DL_BATCH_SIZE] = full.rows
        self._feature_count = len(full.names)
        out[semconv.DL_DATA_SCHEMA_FINGERPRINT] = full.schema_fingerprint
        fingerprint = data_fingerprint(full)
        if fingerprint is not None:
            out[semconv.DL_DATA_FINGERPRINT] = fingerprint
        table = _narrow(full, self.config.drift_max_features)
        if table is not full:
            # Quality counts every value; only the reference and drift use the subset.
            _set(out, semconv.DL_QUALITY_NAN_FRACTION, nan_fraction(full))
        if reference is None:
            if table is full:
                _set(out, semconv.DL_QUALITY_NAN_FRACTION, nan_fraction(table))
            if table.rows:
                with self._lock:
                    if self._reference is None:
                        self._collect(table)
            return
        out[semconv.DL_QUALITY_SCHEMA_MISMATCH] = (
            table.schema_fingerprint != reference.schema_fingerprint
        )
        tracker = self._tracker
        if not drift_now or tracker is None or table.rows == 0:
            self._quality(reference, table, out, nan=table is full)
            return
        limit = self.config.drift_max_rows
        result, counted = tracker._update(_subsample(table, limit))
        # A batch fed to drift whole has had every value binned against thresholds that
        # include the reference range: its quality counts come from those bins for free.
        if counted is None or table.rows > limit or table is not full:
            self._quality(reference, table, out, nan=table is full)
        else:
            missing = counted.nonfinite + _missing_categories(table)
            _set(out, semconv.DL_QUALITY_NAN_FRACTION, _share(missing, _values(table)))
            if counted.outside is None:
                _set(
                    out,
                    semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION,
                    out_of_range_fraction(reference, table),
                )
            else:
                share = _share(counted.outside, counted.finite_known)
                _set(out, semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION, share)
        # A window of a few dozen rows scores high on noise alone (psi's expected value
        # grows like bins/rows): report drift only once the window is large enough.
        if tracker.rows < self.config.drift_min_rows:
            return
        if result.score is not None and result.feature is not None and result.status:
            out[semconv.DL_DRIFT_SCORE] = result.score
            out[semconv.DL_DRIFT_METHOD] = result.method
            out[semconv.DL_DRIFT_FEATURE] = result.feature
            out[semconv.DL_DRIFT_STATUS] = result.status

    @staticmethod
    def _quality(
        reference: Reference, table: Table, out: dict[str, AttributeValue], nan: bool = True
    ) -> None:
        if nan:
            _set(out, semconv.DL_QUALITY_NAN_FRACTION, nan_fraction(table))
        outside = out_of_range_fraction(reference, table)
        _set(out, semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION, outside)


def _set(out: dict[str, AttributeValue], key: str, value: float | None) -> None:
    if value is not None:
        out[key] = value


def _values(table: Table) -> int:
    return table.numeric.size + table.rows * len(table.categorical)


def _share(part: int, total: int) -> float | None:
    return float(part / total) if total else None


def _slice(table: Table, rows: int) -> Table:
    return Table(
        rows,
        table.names,
        table.numeric[:rows],
        table.numeric_names,
        {k: v[:rows] for k, v in table.categorical.items()},
        table.schema,
    )


def confidence_attributes(outputs: Any, threshold: float = 0.5) -> dict[str, AttributeValue]:
    """``dl.confidence.*`` and ``dl.prediction.count`` for one call; never raises on data."""
    try:
        summary = summarize(outputs, threshold=threshold)
    except (TypeError, ValueError, IndexError, OverflowError, MemoryError):
        return {}
    keys = {
        "mean": semconv.DL_CONFIDENCE_MEAN,
        "min": semconv.DL_CONFIDENCE_MIN,
        "margin_mean": semconv.DL_CONFIDENCE_MARGIN_MEAN,
        "entropy_mean": semconv.DL_CONFIDENCE_ENTROPY_MEAN,
        "low_fraction": semconv.DL_CONFIDENCE_LOW_FRACTION,
    }
    out: dict[str, AttributeValue] = {semconv.DL_PREDICTION_COUNT: int(summary["count"])}
    out.update({keys[k]: float(v) for k, v in summary.items() if k in keys})
    return out
