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
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from otel_dl import semconv
from otel_dl._config import Config
from otel_dl.reference import Reference
from otel_dl.stats import (
    bin_counts,
    bridge_area_mean,
    chi2_exceeded,
    js_from_shares,
    kolmogorov_exceeded,
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
DEFAULT_THRESHOLDS: Mapping[str, tuple[float, float]] = semconv.DRIFT_THRESHOLDS
"""(warn, alert) per method."""
FALSE_ALARM_RATE = Config.drift_false_alarm_rate
"""The default of the ``drift_false_alarm_rate`` option: how often sampling alone may
take a window's status past ``ok``. A feature's score counts toward the status only above
the score that two samples of one law, as large as the window and the reference, exceed
with probability FALSE_ALARM_RATE divided by the number of features scored
(:class:`DriftTracker`; docs/signals.md)."""


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


drift_status = semconv.drift_status


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
) -> np.ndarray:
    """Copy computed numeric scores into ``out``; say why the others are missing. Returns
    which features have a score."""
    ref_count = reference.numeric.count
    names = reference.numeric_names
    valid = present & (ref_count > 0) & (current_count > 0) & np.isfinite(values)
    if valid.all():
        out.update(zip(names, values.tolist(), strict=True))
        out.methods.update(dict.fromkeys(names, method))
        return valid
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
    return valid


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


def _binned_chance(method: str, chi2: np.ndarray, spread: np.ndarray | float) -> np.ndarray:
    """psi or js that sampling alone exceeds, given the chi-square point of the bins and
    1/n + 1/N: psi is about chi2 x spread, and js the square root of that over 8 ln 2."""
    if method == "psi":
        return chi2 * spread
    return np.sqrt(chi2 * spread / (8.0 * np.log(2.0)))


class DriftTracker:
    """Drift of the last ``window_rows`` rows against a reference, updated batch by batch.

    psi and js keep per-bin counts of the window and one byte per value (its bin), so an
    update costs time proportional to the batch, and rows leaving the window are
    uncounted from their stored bins. ks and wasserstein compare the whole window's
    values with the profile's quantile atoms at each update (cost grows with the window;
    sample with ``drift_every`` and ``drift_max_rows`` in the monitor). Thread-safe.

    The status is that of the worst feature whose score is beyond chance: above the
    score that sampling alone exceeds with probability ``false_alarm_rate`` divided by
    the number of features scored, for a window and a reference of this many values of
    that feature (see :meth:`chance`). A small reference or a short window thus needs a
    larger score for ``warn``; with a large reference and a full window the thresholds
    decide alone. ``false_alarm_rate=None`` judges the scores by the thresholds only.
    The result names that feature and its score, or, when no feature is beyond
    chance, the highest-scoring one.
    """

    def __init__(
        self,
        reference: Reference,
        method: str = "psi",
        window_rows: int = 10_000,
        warn: float | None = None,
        alert: float | None = None,
        false_alarm_rate: float | None = FALSE_ALARM_RATE,
    ) -> None:
        _check_method(method)
        if window_rows < 1:
            raise ValueError(f"window_rows must be at least 1, got {window_rows}")
        if false_alarm_rate is not None and not 0.0 < false_alarm_rate < 1.0:
            raise ValueError(
                f"false_alarm_rate must lie strictly between 0 and 1 (or be None to judge "
                f"by the thresholds alone), got {false_alarm_rate!r}"
            )
        self.reference = reference
        self.method = method
        self.window_rows = int(window_rows)
        self.warn = warn
        self.alert = alert
        self.false_alarm_rate = false_alarm_rate
        self._thresholds = {
            m: (
                DEFAULT_THRESHOLDS[m][0] if warn is None else warn,
                DEFAULT_THRESHOLDS[m][1] if alert is None else alert,
            )
            for m in METHODS
        }
        self._chance_shape: dict[float, np.ndarray] = {}  # per tail probability
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

    def chance(self, p: float, rows: np.ndarray) -> np.ndarray:
        """Per numeric feature, the score that two samples of one law, of ``rows`` values
        (the window's, per feature) and of the reference's values of that feature, exceed
        with probability ``p``:

        - psi: chi2(bins - 1) x (1/n + 1/N), the bins being those the reference fills;
        - js: sqrt(chi2(bins - 1) x (1/n + 1/N) / (8 ln 2));
        - ks: sqrt(ln(2/p) / 2) x sqrt(1/n + 1/N) (Kolmogorov's tail);
        - wasserstein: (the mean of the bridge's area + z_p std / scale) x sqrt(1/n + 1/N)
          (Borell-TIS: above the true point, by about a third for normal data).

        ks and wasserstein add the profile's own approximation bound. These are the
        large-sample laws; a simulation of 2,000 feature pairs of normal samples (100 to
        1,000 reference rows, 500 to 10,000 window rows) put the first three within 8 %
        of their 99 % and 99.9 % points, mostly above."""
        numeric = self.reference.numeric
        with np.errstate(divide="ignore"):
            spread = np.sqrt(1.0 / rows + 1.0 / numeric.count)
        shape = self._chance_shape.get(p)
        if shape is None:
            shape = self._chance_shape[p] = self._shape(p)
            while len(self._chance_shape) > 8:  # a handful of feature counts, at most
                self._chance_shape.pop(next(iter(self._chance_shape)))
        if self._binned:
            return _binned_chance(self.method, shape, spread * spread)
        bound = numeric.ks_bound if self.method == "ks" else numeric.wasserstein_bound
        return shape * spread + np.nan_to_num(bound)

    def _shape(self, p: float) -> np.ndarray:
        """The part of :meth:`chance` that depends on ``p`` and the reference alone."""
        numeric = self.reference.numeric
        if self.method in ("psi", "js"):
            return chi2_exceeded(p, (numeric.shares > 0).sum(axis=0) - 1)
        if self.method == "ks":
            return np.full(len(numeric.count), kolmogorov_exceeded(p))
        scale = np.maximum(numeric.std, STD_FLOOR)
        z = NormalDist().inv_cdf(1.0 - p)
        return bridge_area_mean(numeric.grid, scale) + z * numeric.std / scale

    def _categorical_level(self, name: str, used: str, value: float, p: float | None) -> int:
        warn, alert = self._thresholds[used]
        level = int(value >= warn) + int(value >= alert)
        if level and p is not None:
            cat = self.reference.categorical[name]
            rows = int(self._cat_counts[name].sum())
            chi2 = chi2_exceeded(p, np.array([(cat.shares > 0).sum() - 1]))
            spread = 1.0 / max(rows, 1) + 1.0 / max(cat.count, 1)
            if value <= float(_binned_chance(used, chi2, spread)[0]):
                return 0
        return level

    def _unseen_by_chance(self, p: float, window: np.ndarray) -> np.ndarray:
        """Per numeric feature, whether it is constant in the reference and the window's
        values unlike that constant are no more than the share N reference rows all
        equal to it leave open with probability p: ln(1/p) / N. wasserstein divides by
        the reference std, so any such value scores far above the thresholds."""
        numeric = self.reference.numeric
        constant = (numeric.std == 0) & (numeric.count > 0)
        out = np.zeros(len(constant), dtype=bool)
        if not constant.any():
            return out
        columns = window[:, constant]
        finite = np.isfinite(columns)
        unlike = (finite & (columns != numeric.minimum[constant])).sum(axis=0)
        share = unlike / np.maximum(finite.sum(axis=0), 1)
        out[constant] = share <= np.log(1.0 / p) / numeric.count[constant]
        return out

    def _decisive(
        self,
        out: DriftScores,
        values: np.ndarray,
        valid: np.ndarray,
        rows: np.ndarray,
        window: np.ndarray | None,
    ) -> tuple[str, float, str]:
        """The feature that decides the status, its score and the status."""
        rate = self.false_alarm_rate
        p = rate / len(out) if rate is not None else None
        warn, alert = self._thresholds[self.method]
        best: tuple[int, float, str] | None = None
        if valid.any():
            with np.errstate(invalid="ignore"):
                levels = (values >= warn).astype(np.int8) + (values >= alert)
                if p is not None and levels.any():
                    levels[values <= self.chance(p, rows)] = 0
                    if self.method == "wasserstein" and window is not None:
                        levels[self._unseen_by_chance(p, window)] = 0
            levels[~valid] = -1
            top = levels.max()
            j = int(np.argmax(np.where(levels == top, values, -np.inf)))
            best = (int(top), float(values[j]), self.reference.numeric_names[j])
        for name in self.reference.categorical_names:
            if name not in out:
                continue
            value = out[name]
            level = self._categorical_level(name, out.methods[name], value, p)
            if best is None or (level, value) > best[:2]:
                best = (level, value, name)
        assert best is not None  # out holds at least one score
        return best[2], best[1], semconv.DRIFT_STATUSES[best[0]]

    def _result(self) -> DriftResult:
        method = self.method
        out = DriftScores()
        window: np.ndarray | None = None
        if self._binned:
            counts = self._bin_counts()
            values = _binned_scores(self.reference, counts, method)
            finite_count = counts.sum(axis=0)
        else:
            window = np.concatenate([c.values for c in self._chunks], axis=0)
            values = _profile_scores(self.reference, window, method)
            finite_count = np.isfinite(window).sum(axis=0)
        valid = _finish_numeric(self.reference, values, self._present, finite_count, method, out)
        cat_counts = {
            name: counts if name in self._cat_present else None
            for name, counts in self._cat_counts.items()
        }
        _score_categorical(self.reference, cat_counts, method, out)
        if not out:
            reason = "no feature could be scored: " + (
                "; ".join(f"{k}: {v}" for k, v in list(out.reasons.items())[:3])
                or "the reference has no features"
            )
            return DriftResult(None, None, None, method, reason, out)
        name, value, status = self._decisive(out, values, valid, finite_count, window)
        return DriftResult(name, value, status, out.methods[name], None, out)
