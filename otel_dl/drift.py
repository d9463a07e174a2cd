"""Drift: how far current data lies from a reference, per feature, under one method.

Two ways in. :func:`score` is the pure function: a reference (raw data or a
:class:`~otel_dl.reference.Reference`) and current data in, feature name -> score out::

    from otel_dl import drift
    scores = drift.score(train, batch, method="ks")        # exact, equals scipy's ks_2samp
    scores = drift.score(ref_profile, batch, method="psi")

:class:`DriftTracker` is the streaming form the instrumentors use: it holds a reference
and the last ``window_rows`` rows, and each :meth:`DriftTracker.update` returns the
window's worst feature, its score and its ``ok`` / ``warn`` / ``alert`` status.

Methods (definitions in ``docs/signals.md``): ``psi`` and ``js`` over the reference's
quantile bins, ``ks`` and ``wasserstein`` (divided by the reference standard deviation)
exactly from raw data or from the profile's quantile atoms. Categorical features always
use bins per category; under ks or wasserstein they are scored with js, and the result's
``methods`` says so. A feature that cannot be scored is absent, with the reason in
``reasons``. Numeric features are processed as whole arrays, never column by column.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from otel_dl import semconv
from otel_dl.reference import Reference
from otel_dl.stats import (
    bin_counts,
    js_from_shares,
    ks_statistics,
    psi_from_shares,
    wasserstein_distances,
)
from otel_dl.table import Table, to_table

METHODS = semconv.DRIFT_METHODS
STD_FLOOR = 1e-3
"""wasserstein divides by max(reference std, STD_FLOOR)."""
# A categorical feature with more distinct reference values than both of these (a count,
# and a share of its reference rows) is free text or an identifier: it gets no drift score.
DISTINCT_MIN = 50
DISTINCT_SHARE = 0.5
DEFAULT_THRESHOLDS: Mapping[str, tuple[float, float]] = {
    "psi": (0.1, 0.25),
    "js": (0.1, 0.2),
    "ks": (0.1, 0.2),
    "wasserstein": (0.1, 0.2),
}
"""(warn, alert) per method."""


class DriftScores(dict[str, float]):
    """Feature name -> score, plus ``methods`` (the method each score used) and
    ``reasons`` (feature name -> why it has no score)."""

    def __init__(self) -> None:
        super().__init__()
        self.methods: dict[str, str] = {}
        self.reasons: dict[str, str] = {}


class DriftResult(NamedTuple):
    """The worst feature of a window; ``feature``/``score``/``status`` are None with a
    ``reason`` when no feature could be scored."""

    feature: str | None
    score: float | None
    status: str | None
    method: str
    reason: str | None
    scores: DriftScores


def drift_status(
    value: float, method: str, warn: float | None = None, alert: float | None = None
) -> str:
    """``alert`` at or above the alert threshold, ``warn`` at or above warn, else ``ok``."""
    default_warn, default_alert = DEFAULT_THRESHOLDS[method]
    if value >= (default_alert if alert is None else alert):
        return "alert"
    if value >= (default_warn if warn is None else warn):
        return "warn"
    return "ok"


# --- Scoring a table against a profile ------------------------------------------------------


@dataclass
class _Aligned:
    """Current numeric values in the profile's feature order (NaN where absent)."""

    values: np.ndarray
    present: np.ndarray  # bool per profile feature


def _align(reference: Reference, table: Table) -> _Aligned:
    names = reference.numeric_names
    if table.numeric_names == names:
        return _Aligned(table.numeric, np.ones(len(names), dtype=bool))
    position = {name: j for j, name in enumerate(table.numeric_names)}
    columns = np.array([position.get(name, -1) for name in names], dtype=np.intp)
    present = columns >= 0
    values = np.full((table.rows, len(names)), np.nan, dtype=table.numeric.dtype)
    values[:, present] = table.numeric[:, columns[present]]
    return _Aligned(values, present)


def _category_counts(reference: Reference, name: str, table: Table) -> np.ndarray | None:
    """Counts per reference category plus the unseen bucket, or None if the column is absent."""
    values = table.categorical.get(name)
    if values is None:
        return None
    codes = reference.category_codes(name, values)
    size = len(reference.categorical[name].categories) + 1
    return np.bincount(codes[codes >= 0], minlength=size)


def _score_categorical(
    reference: Reference, counts: Mapping[str, np.ndarray | None], method: str, out: DriftScores
) -> None:
    used = method if method in ("psi", "js") else "js"
    for name, cat in reference.categorical.items():
        current = counts.get(name)
        if current is None:
            out.reasons[name] = "feature not in the current data"
            continue
        total = current.sum()
        if cat.count == 0:
            out.reasons[name] = "reference has no values for this feature"
            continue
        if total == 0:
            out.reasons[name] = "no values in the current data"
            continue
        if len(cat.categories) > max(DISTINCT_MIN, DISTINCT_SHARE * cat.count):
            # Every new text or id is unseen: its share says nothing of drift.
            out.reasons[name] = (
                f"{len(cat.categories)} distinct values in {cat.count} reference rows: free "
                "text or an identifier, not a category, so no drift score"
            )
            continue
        r = np.append(cat.shares, 0.0)[:, None]
        c = (current / total)[:, None]
        value = psi_from_shares(r, c) if used == "psi" else js_from_shares(r, c)
        out[name] = float(value[0])
        out.methods[name] = used


def _finish_numeric(
    reference: Reference,
    values: np.ndarray,
    present: np.ndarray,
    current_count: np.ndarray,
    method: str,
    out: DriftScores,
) -> None:
    """Copy computed numeric scores into ``out``; say why the others are missing."""
    ref_count = reference.numeric.count
    names = reference.numeric_names
    valid = present & (ref_count > 0) & (current_count > 0) & np.isfinite(values)
    if valid.all():
        out.update(zip(names, values.tolist(), strict=True))
        out.methods.update(dict.fromkeys(names, method))
        return
    for j in np.flatnonzero(~valid).tolist():
        if not present[j]:
            reason = "feature not in the current data"
        elif ref_count[j] == 0:
            reason = "reference has no finite values for this feature"
        elif current_count[j] == 0:
            reason = "no finite values in the current data"
        else:
            reason = "score is not a finite number"
        out.reasons[names[j]] = reason
    kept = np.flatnonzero(valid).tolist()
    out.update((names[j], float(values[j])) for j in kept)
    out.methods.update((names[j], method) for j in kept)


def _binned_scores(reference: Reference, counts: np.ndarray, method: str) -> np.ndarray:
    ref_shares = reference.numeric.shares
    if method == "psi":
        # A feature with no finite value gets shares of 0 here and no score later; the
        # floor keeps the logarithm finite, so no error state needs silencing.
        return psi_from_shares(ref_shares, counts / np.maximum(counts.sum(axis=0), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return js_from_shares(ref_shares, counts / counts.sum(axis=0))


def _profile_scores(reference: Reference, values: np.ndarray, method: str) -> np.ndarray:
    grid = reference.numeric.grid
    if method == "ks":
        return ks_statistics(grid, values)
    return wasserstein_distances(grid, values) / np.maximum(reference.numeric.std, STD_FLOOR)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown drift method {method!r}; use one of {', '.join(METHODS)}")


def score(reference: Any, current: Any, method: str = "psi", bins: int = 10) -> DriftScores:
    """Drift score per feature of ``current`` against ``reference``.

    ``reference`` is raw data (fitted here with ``bins``) or a :class:`Reference` (whose
    own bins are used). ks and wasserstein are exact from raw reference data and use the
    profile's quantile atoms from a :class:`Reference`. Features are matched by name;
    unmatched or unscorable features are absent, with the cause in ``.reasons``.
    Raises ``ValueError`` for an unknown method, and ``ValueError`` or ``TypeError`` (as
    :func:`~otel_dl.table.to_table` does) for data with no tabular reading.
    """
    _check_method(method)
    raw = None if isinstance(reference, Reference) else to_table(reference)
    profile = reference if isinstance(reference, Reference) else Reference.fit(reference, bins)
    table = profile.read(current)
    out = DriftScores()
    aligned = _align(profile, table)
    finite_count = np.isfinite(aligned.values).sum(axis=0)
    if method in ("psi", "js"):
        counts = bin_counts(aligned.values, profile.edges_for(aligned.values.dtype))
        values = _binned_scores(profile, counts, method)
    elif raw is not None:
        ref_values = raw.numeric if raw.numeric_names == profile.numeric_names else None
        if ref_values is None:
            ref_values = _align(profile, raw).values
        values = ks_statistics(ref_values, aligned.values)
        if method == "wasserstein":
            values = wasserstein_distances(ref_values, aligned.values) / np.maximum(
                profile.numeric.std, STD_FLOOR
            )
    else:
        values = _profile_scores(profile, aligned.values, method)
    _finish_numeric(profile, values, aligned.present, finite_count, method, out)
    counts_by_name = {
        name: _category_counts(profile, name, table) for name in profile.categorical_names
    }
    _score_categorical(profile, counts_by_name, method, out)
    for name in table.names:
        if name not in profile.numeric_names and name not in profile.categorical:
            out.reasons[name] = "feature not in the reference"
        elif name in profile.categorical and name in table.numeric_names:
            out.reasons[name] = "numeric in the current data, categorical in the reference"
        elif name in profile.numeric_names and name in table.categorical:
            out.reasons[name] = "categorical in the current data, numeric in the reference"
            out.pop(name, None)
    return out


def worst(scores: DriftScores) -> tuple[str, float] | None:
    """The highest-scoring feature (first in order on ties), or None when none scored."""
    if not scores:
        return None
    name = max(scores, key=scores.__getitem__)
    return name, scores[name]


# --- Streaming ---------------------------------------------------------------------------

_CUBE_ELEMENTS = 1 << 17
"""Threshold values materialised per row block (512 KiB in float32): comparing against
a full (thresholds, rows, features) array runs numpy's contiguous loop, several times
faster than broadcasting a row of thresholds over an inner loop as short as one row."""


class _Binner:
    """The slot of every value against one profile's thresholds, in one float dtype.

    Thresholds per feature, in order: the lowest finite number, the range's lo, the bin
    edges, the range's hi, +inf. The slot of a value is how many of them it reaches, so
    one comparison cube summed over the thresholds gives, per value::

        0        NaN or -inf
        1        finite, below the reference minimum (drift bin 0)
        2 + b    finite, in range, drift bin b (b = 0 .. k, k the feature's real edges)
        k + 3    finite, above the reference maximum (drift bin k, the last real one)
        K + 4    +inf (K = edges including the +inf padding of collapsed ones)

    That ordering needs lo <= every edge below +inf <= hi and no NaN threshold, which
    every fitted profile satisfies. When a loaded file breaks it (``fused`` is False),
    lo and hi become -max and +inf, non-finite values are sent to slot 0 explicitly,
    and the out-of-range share has to be computed on its own.
    """

    def __init__(self, reference: Reference, dtype: np.dtype) -> None:
        edges = reference.edges_for(dtype)
        lo, hi = reference.range_for(dtype)
        lo = np.where(np.isnan(lo), np.inf, lo).astype(dtype)  # no range: never "inside"
        hi = np.where(np.isnan(hi), np.inf, hi).astype(dtype)
        bins, features = edges.shape
        real = np.where(edges < np.inf, edges, lo)  # padding never breaks the order
        self.fused = bool(
            not np.isnan(edges).any()
            and np.all(real >= lo)
            and np.all(np.where(edges < np.inf, edges, hi) <= hi)
            and np.all(lo <= hi)
        )
        if not self.fused:
            lo = np.full(features, np.finfo(dtype).min, dtype=dtype)
            hi = np.full(features, np.inf, dtype=dtype)
        self.known = np.isfinite(reference.range_for(dtype)[0])
        self.slots = bins + 5
        thresholds = np.concatenate(
            [
                np.full((1, features), np.finfo(dtype).min, dtype=dtype),
                lo[None],
                edges.astype(dtype, copy=False),
                hi[None],
                np.full((1, features), np.inf, dtype=dtype),
            ]
        )
        self._block = max(1, _CUBE_ELEMENTS // max(1, thresholds.size))
        self._cube = np.ascontiguousarray(
            np.broadcast_to(thresholds[:, None, :], (len(thresholds), self._block, features))
        )
        self._slot_dtype = np.uint8 if self.slots <= 256 else np.uint16

    def slot(self, values: np.ndarray) -> np.ndarray:
        """(rows, features) slot per value; see the class docstring."""
        values = np.ascontiguousarray(values)  # row blocks of an F-order array are slow
        rows, features = values.shape
        out = np.empty((rows, features), dtype=self._slot_dtype)
        step = self._block
        for start in range(0, rows, step):
            part = values[start : start + step]
            reached = np.greater_equal(part[None], self._cube[:, : len(part)])
            # A uint8 accumulator (out=) keeps numpy on its fast loop; slots fit in it.
            np.add.reduce(
                reached.view(np.uint8), axis=0, dtype=out.dtype, out=out[start : start + step]
            )
        if not self.fused:
            out[~np.isfinite(values)] = 0
        return out


@dataclass
class _Chunk:
    rows: int
    values: np.ndarray | None  # ks/wasserstein only
    slots: np.ndarray | None  # psi/js only: _Binner.slot of each value
    counts: np.ndarray | None  # psi/js only: _Binner.count of the slots
    codes: dict[str, np.ndarray]


class DriftTracker:
    """Drift of the last ``window_rows`` rows against a reference, updated batch by batch.

    psi and js keep per-bin counts of the window and one byte per value (its bin), so an
    update costs time proportional to the batch, and rows leaving the window are
    uncounted from their stored bins. ks and wasserstein compare the whole window's
    values with the profile's quantile atoms at each update (cost grows with the window;
    sample with ``drift_every`` and ``drift_max_rows`` in the monitor). Thread-safe.
    """

    def __init__(
        self,
        reference: Reference,
        method: str = "psi",
        window_rows: int = 10_000,
        warn: float | None = None,
        alert: float | None = None,
    ) -> None:
        _check_method(method)
        if window_rows < 1:
            raise ValueError(f"window_rows must be at least 1, got {window_rows}")
        self.reference = reference
        self.method = method
        self.window_rows = int(window_rows)
        self.warn = warn
        self.alert = alert
        self._lock = threading.Lock()
        self._chunks: deque[_Chunk] = deque()
        self._rows = 0
        self._binned = method in ("psi", "js")
        self._binners: dict[np.dtype, _Binner] = {}
        edges = reference.numeric.edges
        features = len(reference.numeric_names)
        self._bins = edges.shape[0] + 1
        # The last real bin per feature, the bin of finite values above the range. It is
        # the same in float32 and float64: an edge that is +inf only in float32 lies
        # above float32's largest value, so no float32 value is ever above that range.
        self._top = (edges < np.inf).sum(axis=0)
        self._above = self._top + 3  # the slot of finite values above the range
        self._columns = np.arange(features)
        slots = self._bins + 4
        keys = features * slots
        key_dtype = np.uint16 if keys <= 1 << 16 else np.uint32 if keys <= 1 << 32 else np.intp
        self._offsets = (np.arange(features) * slots).astype(key_dtype)
        self._counts = np.zeros((features, slots), dtype=np.int64)
        self._cat_counts = {
            name: np.zeros(len(cat.categories) + 1, dtype=np.int64)
            for name, cat in reference.categorical.items()
        }
        self._present = np.zeros(features, dtype=bool)
        self._cat_present: set[str] = set()

    @property
    def rows(self) -> int:
        """Rows now in the window."""
        return self._rows

    def _binner(self, dtype: np.dtype) -> _Binner:
        binner = self._binners.get(dtype)
        if binner is None:
            binner = self._binners[dtype] = _Binner(self.reference, dtype)
        return binner

    def _chunk(self, values: np.ndarray, codes: dict[str, np.ndarray]) -> _Chunk:
        if not self._binned:
            # The window outlives this call: a copy, never a view of the caller's buffer,
            # which the caller may refill with the next batch.
            return _Chunk(len(values), np.array(values), None, None, codes)
        slots = self._binner(values.dtype).slot(values)
        return _Chunk(len(values), None, slots, self._count(slots), codes)

    def _count(self, slots: np.ndarray) -> np.ndarray:
        """(features, slots) count of each slot: one bincount over all features."""
        keys = np.add(slots, self._offsets, dtype=self._offsets.dtype)
        counts = np.bincount(keys.ravel(), minlength=self._counts.size)
        return counts.reshape(self._counts.shape)

    def _part(self, chunk: _Chunk, part: slice, counts: np.ndarray | None = None) -> _Chunk:
        """Rows ``part`` of a chunk; psi/js slot counts are ``counts`` or counted here."""
        slots = None if chunk.slots is None else chunk.slots[part]
        if slots is not None and counts is None:
            counts = self._count(slots)
        return _Chunk(
            len(range(chunk.rows)[part]),
            None if chunk.values is None else chunk.values[part],
            slots,
            counts,
            {k: v[part] for k, v in chunk.codes.items()},
        )

    def _add(self, chunk: _Chunk, sign: int) -> None:
        if chunk.counts is not None:
            if sign > 0:
                self._counts += chunk.counts
            else:
                self._counts -= chunk.counts
        for name, codes in chunk.codes.items():
            counts = np.bincount(codes[codes >= 0], minlength=len(self._cat_counts[name]))
            self._cat_counts[name] += sign * counts
        self._rows += sign * chunk.rows

    def update(self, batch: Any) -> DriftResult:
        """Add ``batch`` (anything :func:`~otel_dl.table.to_table` reads, or a Table)
        to the window and return the window's worst feature."""
        table = batch if isinstance(batch, Table) else self.reference.read(batch)
        aligned = _align(self.reference, table)
        codes = {
            name: self.reference.category_codes(name, values)
            for name, values in table.categorical.items()
            if name in self._cat_counts
        }
        chunk = self._chunk(aligned.values, codes)
        with self._lock:
            self._present |= aligned.present
            self._cat_present.update(codes)
            self._chunks.append(chunk)
            self._add(chunk, +1)
            self._evict()
            return self._result()

    def _evict(self) -> None:
        while self._rows - self._chunks[0].rows >= self.window_rows:
            self._add(self._chunks.popleft(), -1)
        excess = self._rows - self.window_rows
        if excess <= 0:
            return
        oldest = self._chunks.popleft()
        gone, kept = slice(None, excess), slice(excess, None)
        # Count whichever part of the chunk is smaller; the other is the difference.
        if oldest.counts is None or excess <= oldest.rows // 2:
            removed = self._part(oldest, gone)
            self._add(removed, -1)
            rest = None if oldest.counts is None else oldest.counts - removed.counts
            self._chunks.appendleft(self._part(oldest, kept, rest))
        else:
            remaining = self._part(oldest, kept)
            self._add(oldest, -1)
            self._add(remaining, +1)
            self._chunks.appendleft(remaining)

    def _bin_counts(self) -> np.ndarray:
        """(bins, features) counts of the window's finite values, from its slot counts."""
        slots = self._counts
        counts = slots[:, 2:-1].T.copy()  # bins 0 .. K, then the slot above the range
        counts[0] += slots[:, 1]
        top, above, columns = self._top, self._top + 1, self._columns
        counts[top, columns] += counts[above, columns]
        counts[above, columns] = 0
        return counts[:-1]

    def _result(self) -> DriftResult:
        method = self.method
        out = DriftScores()
        if self._binned:
            counts = self._bin_counts()
            values = _binned_scores(self.reference, counts, method)
            finite_count = counts.sum(axis=0)
        else:
            window = np.concatenate([c.values for c in self._chunks], axis=0)
            values = _profile_scores(self.reference, window, method)
            finite_count = np.isfinite(window).sum(axis=0)
        _finish_numeric(self.reference, values, self._present, finite_count, method, out)
        cat_counts = {
            name: counts if name in self._cat_present else None
            for name, counts in self._cat_counts.items()
        }
        _score_categorical(self.reference, cat_counts, method, out)
        top = worst(out)
        if top is None:
            reason = "no feature could be scored: " + (
                "; ".join(f"{k}: {v}" for k, v in list(out.reasons.items())[:3])
                or "the reference has no features"
            )
            return DriftResult(None, None, None, method, reason, out)
        name, value = top
        used = out.methods[name]
        return DriftResult(
            name, value, drift_status(value, used, self.warn, self.alert), used, None, out
        )
