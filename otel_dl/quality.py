"""Data quality: missing values, values outside the reference range, schema changes.

Pure functions over one batch (anything :func:`otel_dl.table.to_table` reads, or a
:class:`~otel_dl.table.Table`)::

    quality.nan_fraction(batch)                 # share of NaN/Inf (or missing) values
    quality.nan_excess(ref, table, nan)         # the part of it the reference does not explain
    quality.range_excess(ref, table, outside)   # out of range beyond what chance explains
    quality.out_of_range_fraction(ref, batch)   # share outside the reference [min, max]
    quality.schema_mismatch(ref, batch)         # column names, dtypes or shape changed
    quality.batch_quality(ref, table)           # both, sharing one finiteness pass

A value that cannot be computed is ``None`` (an empty batch has no NaN fraction), never a
made-up number.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from otel_dl import semconv
from otel_dl.reference import Reference
from otel_dl.table import Table, to_table


def _table(data: Any, reference: Reference | None = None) -> Table:
    if isinstance(data, Table):
        return data
    return reference.read(data) if reference is not None else to_table(data)


def nan_fraction(data: Any) -> float | None:
    """Share of NaN/+-Inf numeric values and missing categorical values; None if empty."""
    table = _table(data)
    numeric = table.numeric
    total = numeric.size + table.rows * len(table.categorical)
    if total == 0:
        return None
    bad = numeric.size - np.count_nonzero(np.isfinite(numeric)) if numeric.size else 0
    return float((bad + _missing_categories(table)) / total)


#: Binomial standard deviations a feature's missing count may lie above its reference
#: share's before the rest counts as excess (:func:`allowed_count`).
EXCESS_SIGMAS = 4.0


def allowed_count(shares: np.ndarray, rows: int) -> np.ndarray:
    """Values per feature (missing, or out of range) that a batch of ``rows`` rows may
    hold before any is excess, given the share ``p`` of such values in a batch drawn like
    the reference: none when ``p`` is 0, else ``floor(n*p + 4*sqrt(n*p*(1-p)) + 1)``
    (``n`` = ``rows``): what such a batch holds but about once in ten thousand batches,
    the ``+ 1`` covering small batches."""
    spread = np.sqrt(rows * shares * (1.0 - shares))
    allowed = np.floor(rows * shares + EXCESS_SIGMAS * spread + 1.0)
    return np.where(shares > 0, allowed, 0.0)


def nan_excess(reference: Reference, table: Table, nan: float | None) -> float | None:
    """The share of ``table``'s values that are missing (NaN/Inf, or ``None`` in a
    categorical feature) beyond what ``reference`` explains: per feature, the missing
    count above :func:`allowed_count`, summed over the features and divided by the
    values ``nan`` (``nan_fraction(table)``) counts. ``nan`` itself when no feature was
    ever missing in the reference; 0 for a batch missing values only where, and about as
    often as, the reference was."""
    if not nan:
        return nan
    names = (*table.numeric_names, *table.categorical)
    shares = reference.missing_shares(names)
    if not shares.any():
        return nan
    numeric = table.numeric
    counts = np.empty(len(names), dtype=np.float64)
    width = len(table.numeric_names)
    counts[:width] = table.rows - np.count_nonzero(np.isfinite(numeric), axis=0)
    for j, values in enumerate(table.categorical.values(), start=width):
        counts[j] = np.count_nonzero(np.equal(values, None))  # type: ignore[call-overload]
    excess = np.maximum(counts - allowed_count(shares, table.rows), 0.0).sum()
    return float(excess / (table.rows * len(names)))


def unexplained(attrs: Mapping[str, Any], excess: str) -> Any:
    """The share a span is judged by (signal-aware sampling, the guard): its ``excess``
    attribute (``dl.quality.nan_excess_fraction`` or
    ``dl.quality.out_of_range_excess_fraction``) when it carries it (its source has a
    reference), else the whole share (:data:`semconv.EXCESS_OF`)."""
    value = attrs.get(excess)
    return attrs.get(semconv.EXCESS_OF[excess]) if value is None else value


def nan_excess_each(
    reference: Reference, names: tuple[str, ...], values: np.ndarray, starts: Any, nan: list[float]
) -> list[float]:
    """:func:`nan_excess` of several batches stacked as :func:`quality_each` takes them
    (numeric features ``names``), given their ``nan`` fractions: only a batch with
    missing values is counted again."""
    shares = reference.missing_shares(names)
    if not shares.any():
        return nan
    bounds = [*starts, len(values)]
    out = []
    for share, start, stop in zip(nan, bounds, bounds[1:], strict=False):
        if not share:
            out.append(share)
            continue
        part = values[start:stop]
        counts = part.shape[0] - np.count_nonzero(np.isfinite(part), axis=0)
        excess = np.maximum(counts - allowed_count(shares, part.shape[0]), 0.0).sum()
        out.append(float(excess / part.size))
    return out


def _missing_categories(table: Table) -> int:
    """Missing values (``None``) over the categorical columns of ``table``."""
    missing = 0
    for values in table.categorical.values():
        missing += int(np.count_nonzero(np.equal(values, None)))  # type: ignore[call-overload]
    return missing


def out_of_range_fraction(reference: Reference, data: Any) -> float | None:
    """Share of finite values, in numeric features the reference has seen finite values
    of, that lie outside the reference's [min, max]; None when there is no such value."""
    values, lo, hi, _ = _ranged(reference, _table(data, reference))
    return _outside(values, lo, hi)


def _ranged(
    reference: Reference, table: Table
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, lo, hi, finite reference values) of ``table``'s numeric features that the
    reference has a range for."""
    values = table.numeric
    columns: Any = slice(None)
    if table.numeric_names != reference.numeric_names:
        index = reference.column_index(table.numeric_names)
        values, columns = values[:, index >= 0], index[index >= 0]
    lo, hi = reference.range_for(values.dtype)
    lo, hi, seen = lo[columns], hi[columns], reference.numeric.count[columns]
    known = np.isfinite(lo)  # a feature with no finite reference value has no range
    if not known.all():
        values, lo, hi, seen = values[:, known], lo[known], hi[known], seen[known]
    return values, lo, hi, seen


def range_excess(reference: Reference, table: Table, outside: float | None) -> float | None:
    """The share of ``table``'s values outside the reference range beyond what chance
    explains: a value drawn like the reference's ``N`` finite values of a feature lies
    outside their [min, max] with probability ``2/(N+1)`` (for a continuous feature;
    less where values repeat). Per feature, the count outside above
    :func:`allowed_count` at that share, summed and divided by the finite values that
    ``outside`` (``out_of_range_fraction``) divides by; ``outside`` itself when 0 or None.
    """
    if not outside:
        return outside
    values, lo, hi, seen = _ranged(reference, table)
    return _range_excess(values, lo, hi, seen)


def _range_excess(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, seen: np.ndarray) -> float:
    outside = values < lo
    outside |= values >= hi
    finite = np.isfinite(values)
    if not finite.all():
        # -Inf < lo and +Inf >= hi are not values in range terms (nan_fraction counts them).
        outside &= finite
    count = int(np.count_nonzero(outside))
    finite_count = int(np.count_nonzero(finite))
    # One batch of what quality_each counts for many (its share only says "some").
    excess = _excess_each(outside, [0, len(values)], seen, [1.0], [finite_count], [count])
    return float(excess[0] or 0.0)


def _range_allowed(rows: int, seen: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`allowed_count` of values outside the range, for features of ``seen`` finite
    reference values each, and the least of them: the same for every batch of a source's
    size, so kept."""
    key = (rows, seen.tobytes())
    found = _ALLOWED.get(key)
    if found is None:
        allowed = allowed_count(2.0 / (seen + 1.0), rows)
        found = (allowed, float(allowed.min()) if allowed.size else 0.0)
        if len(_ALLOWED) >= 256:
            _ALLOWED.clear()
        _ALLOWED[key] = found
    return found


_ALLOWED: dict[tuple[int, bytes], tuple[np.ndarray, float]] = {}


def _outside(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float | None:
    finite = np.count_nonzero(np.isfinite(values)) if values.size else 0
    if finite == 0:
        return None
    # -Inf < lo and +Inf >= hi each count once here, but they are not values in range
    # terms (nan_fraction counts them), so take them out.
    outside = np.count_nonzero((values < lo) | (values >= hi))
    outside -= np.count_nonzero(np.isinf(values)) if finite != values.size else 0
    return float(outside / finite)


def batch_quality(
    reference: Reference | None, full: Table, table: Table | None = None
) -> tuple[float | None, float | None]:
    """(``nan_fraction(full)``, ``out_of_range_fraction(reference, table)``), sharing one
    finiteness pass: when every value is finite (the usual batch) neither fraction needs
    a per-value finiteness count. ``table`` is the part of ``full`` whose range is judged
    (default: all of it)."""
    table = full if table is None else table
    numeric = full.numeric
    total = numeric.size + full.rows * len(full.categorical)
    missing = _missing_categories(full) if full.categorical else 0
    finite = True
    if numeric.size:
        finite = bool(np.isfinite(numeric).all())
        if not finite:
            missing += numeric.size - np.count_nonzero(np.isfinite(numeric))
    nan = float(missing / total) if total else None
    if reference is None:
        return nan, None
    if (
        not finite
        or table is not full
        or not numeric.size
        or full.numeric_names != reference.numeric_names
    ):
        return nan, out_of_range_fraction(reference, table)
    lo, hi = reference.range_for(numeric.dtype)
    known = np.isfinite(lo)  # a feature with no finite reference value has no range
    if not known.all():
        return nan, out_of_range_fraction(reference, table)
    outside = np.count_nonzero(numeric < lo) + np.count_nonzero(numeric >= hi)
    return nan, float(outside / numeric.size)


def schema_fingerprint(data: Any) -> str:
    """Hex digest of the column names, dtypes and trailing shape of ``data``."""
    return _table(data).schema_fingerprint


def schema_mismatch(reference: Reference, data: Any) -> bool:
    """True when ``data``'s schema fingerprint differs from the reference's."""
    return _table(data).schema_fingerprint != reference.schema_fingerprint


def quality_each(
    reference: Reference, values: np.ndarray, starts: Any
) -> tuple[list[float], list[float | None], list[float | None]]:
    """(nan fractions, out-of-range fractions, out-of-range excess fractions) of several
    batches at once, as :func:`batch_quality` and :func:`range_excess` give them one by
    one: ``values`` stacks the rows of batches read with ``reference.read`` (numeric
    features, named as the reference names them), batch ``i`` being rows ``starts[i]`` up
    to the next start.

    One pass per test over all the rows; each batch's counts are then ``count_nonzero``
    of its rows (a popcount: numpy's per-row counts and ``reduceat`` cost 4x more), and a
    batch with values out of range has them counted per feature from the same pass."""
    rows, features = values.shape
    bounds = [*starts, rows]
    parts = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    sizes = [(part.stop - part.start) * features for part in parts]
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if all_finite or not features:
        nan = [0.0] * len(parts)
    else:
        counts = [np.count_nonzero(finite[part]) for part in parts]
        nan = [float((size - count) / size) for size, count in zip(sizes, counts, strict=True)]
    lo, hi = reference.range_for(values.dtype)
    known = np.isfinite(lo)
    if not known.all():
        values, lo, hi, finite = values[:, known], lo[known], hi[known], finite[:, known]
        sizes = [(part.stop - part.start) * values.shape[1] for part in parts]
    outside = values < lo
    outside |= values >= hi
    out = [np.count_nonzero(outside[part]) for part in parts]
    finite_counts = sizes
    if not all_finite:
        finite_counts = [np.count_nonzero(finite[part]) for part in parts]
        # -Inf < lo and +Inf >= hi each count once above, but they are not values in
        # range terms (nan_fraction counts them): take them out.
        infinite = np.isinf(values)
        out = [o - np.count_nonzero(infinite[part]) for o, part in zip(out, parts, strict=True)]
    fractions: list[float | None] = [
        float(o / f) if f else None for o, f in zip(out, finite_counts, strict=True)
    ]
    if not all_finite:
        outside &= finite
    seen = reference.numeric.count if known.all() else reference.numeric.count[known]
    return nan, fractions, _excess_each(outside, bounds, seen, fractions, finite_counts, out)


def _excess_each(
    outside: np.ndarray,
    bounds: list[int],
    seen: np.ndarray,
    fractions: list[float | None],
    finite: list[int],
    counts: list[Any],
) -> list[float | None]:
    """The excess share of each batch's finite values outside the range (``outside``, a
    stacked mask, batch ``i`` being rows ``bounds[i]`` up to ``bounds[i + 1]``, with
    ``counts[i]`` values outside of its ``finite[i]``; ``fractions[i]`` falsy: none, and
    that is its excess), its features having ``seen`` reference values. Per feature, from
    one pass over where the (few) values outside are: numpy's per-column count of a
    (256, 32) mask costs about 20 µs. A batch with no more values outside than any
    feature's allowance has no excess, uncounted."""
    excess: list[float | None] = [0.0 if share else share for share in fractions]
    allowances: dict[int, tuple[np.ndarray, float]] = {}
    counted = []
    for i, count in enumerate(counts):
        if fractions[i]:
            rows = bounds[i + 1] - bounds[i]
            allowance = allowances.get(rows)
            if allowance is None:
                allowance = allowances[rows] = _range_allowed(rows, seen)
            if count > allowance[1]:
                counted.append(i)
    if not counted:
        return excess
    width = outside.shape[1]
    where = np.flatnonzero(outside)  # row * width + feature, in row order
    batch = np.searchsorted(np.asarray(bounds[1:]) * width, where, side="right")
    per_feature = np.bincount(batch * width + where % width, minlength=len(counts) * width)
    per_feature = per_feature.reshape(-1, width)[counted]
    if len(allowances) == 1:  # batches of one size: one allowance for all
        allowed = next(iter(allowances.values()))[0]
    else:
        allowed = np.stack([allowances[bounds[i + 1] - bounds[i]][0] for i in counted])
    over = np.maximum(per_feature - allowed, 0.0).sum(axis=1)
    for i, value in zip(counted, over.tolist(), strict=True):
        excess[i] = float(value / finite[i])
    return excess
