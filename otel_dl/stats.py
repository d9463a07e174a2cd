"""Column-wise statistics over 2-D arrays (rows x features): the numeric kernels that the
reference profile and drift share.

- counting against per-feature thresholds: :func:`ceil_to_float32`,
  :func:`count_at_least`, :func:`bin_counts`;
- two-sample distances: :func:`psi_from_shares`, :func:`js_from_shares`,
  :func:`ks_statistics` (scipy's ``ks_2samp``), :func:`wasserstein_distances` (scipy's
  ``wasserstein_distance``);
- what sampling alone gives those distances between two samples of one law:
  :func:`chi2_exceeded` (psi and js), :func:`kolmogorov_exceeded` (ks),
  :func:`bridge_area_mean` (wasserstein).

Pure functions of arrays; imports nothing of otel-dl.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

FLOOR = 1e-4
"""psi floors each bin share at this value (no renormalisation)."""


def ceil_to_float32(thresholds: np.ndarray) -> np.ndarray:
    """Smallest float32 >= each float64 threshold, so ``x32 >= t32`` iff ``x32 >= t64``."""
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, still exact
        rounded = thresholds.astype(np.float32)
    low = rounded.astype(np.float64) < thresholds
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


def count_at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """counts[k, f] = number of rows r with values[r, f] >= thresholds[k, f] (NaN never counts).

    One broadcast comparison and a pairwise (tree) sum over rows: a plain ``.sum(axis=1)``
    over a boolean cube is several times slower, and a per-feature ``np.histogram`` loop
    slower still. Counts stay exact: the tree adds bytes, widening before they can overflow.
    """
    compared = (values[None, :, :] >= thresholds[:, None, :]).view(np.uint8)
    total = np.zeros((thresholds.shape[0], values.shape[1]), dtype=np.int64)
    level = 0
    while compared.shape[1] > 1:
        rows = compared.shape[1]
        if rows % 2:
            total += compared[:, rows - 1]
        if level == 7:
            compared = compared.astype(np.uint16)
        half = rows // 2
        compared = compared[:, :half] + compared[:, half : 2 * half]
        level += 1
    if compared.shape[1] == 1:
        total += compared[:, 0]
    return total


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per-feature counts of finite values in bins [e_{i-1}, e_i), outer bins open.

    ``edges`` is (K, F), each column sorted and padded with +inf; the result is (K + 1, F).
    """
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, np.nan)
    total = finite.sum(axis=0)
    if edges.shape[0] == 0:
        return total[None, :].astype(np.int64)
    at_least = count_at_least(values, edges)
    counts = np.empty((edges.shape[0] + 1, values.shape[1]), dtype=np.int64)
    counts[0] = total - at_least[0]
    counts[1:-1] = at_least[:-1] - at_least[1:]
    counts[-1] = at_least[-1]
    return counts


# --- The statistics, column-wise over 2-D arrays ------------------------------------------


def psi_from_shares(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Σ (c - r) ln(c / r) down axis 0, each share floored at :data:`FLOOR`."""
    r = np.maximum(reference, FLOOR)
    c = np.maximum(current, FLOOR)
    return ((c - r) * np.log(c / r)).sum(axis=0)


def js_from_shares(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance, base 2, down axis 0 (scipy's ``jensenshannon``)."""
    p = reference / reference.sum(axis=0)
    q = current / current.sum(axis=0)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(p > 0, p * np.log(p / m), 0.0)
        right = np.where(q > 0, q * np.log(q / m), 0.0)
    divergence = (left + right).sum(axis=0) / 2
    return np.sqrt(np.maximum(divergence, 0.0) / np.log(2.0))


def _sorted_finite(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns sorted with NaN/Inf moved to the end as +inf, and finite counts."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return np.sort(np.where(finite, values, np.inf), axis=0), finite.sum(axis=0)


def _column_keys(values: np.ndarray) -> np.ndarray:
    """Complex keys (column + i*value) in column-major order.

    numpy orders complex numbers by real part, then imaginary part, so one sorted key
    array serves a searchsorted for every column at once.
    """
    keys = np.empty(values.shape[::-1], dtype=np.complex128)
    keys.real = np.arange(values.shape[1])[:, None]
    keys.imag = values.T
    return keys.ravel()


def _ecdf(sorted_values: np.ndarray, counts: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Share of each column's finite values <= the points of the same column."""
    rows = sorted_values.shape[0]
    found = np.searchsorted(_column_keys(sorted_values), _column_keys(points), side="right")
    found = found.reshape(points.shape[1], points.shape[0]).T
    below = found - np.arange(points.shape[1]) * rows
    with np.errstate(divide="ignore", invalid="ignore"):
        return below / counts


def ks_statistics(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Two-sample Kolmogorov-Smirnov statistic per column (scipy ``ks_2samp``), NaN/Inf
    skipped; NaN for a column where either side has no finite value."""
    ref, ref_n = _sorted_finite(reference)
    cur, cur_n = _sorted_finite(current)
    points = np.concatenate([ref, cur], axis=0)
    gap = np.abs(_ecdf(ref, ref_n, points) - _ecdf(cur, cur_n, points))
    gap[~np.isfinite(points)] = 0.0
    out = gap.max(axis=0) if len(points) else np.zeros(points.shape[1])
    out[(ref_n == 0) | (cur_n == 0)] = np.nan
    return out


def wasserstein_distances(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Wasserstein-1 distance per column (scipy ``wasserstein_distance``), NaN/Inf skipped;
    NaN for a column where either side has no finite value."""
    ref, ref_n = _sorted_finite(reference)
    cur, cur_n = _sorted_finite(current)
    merged = np.sort(np.concatenate([ref, cur], axis=0), axis=0)
    with np.errstate(invalid="ignore"):
        deltas = np.diff(merged, axis=0)
    deltas[~np.isfinite(merged[1:])] = 0.0
    points = merged[:-1]
    gap = np.abs(_ecdf(ref, ref_n, points) - _ecdf(cur, cur_n, points))
    gap[deltas == 0] = 0.0
    out = (gap * deltas).sum(axis=0)
    out[(ref_n == 0) | (cur_n == 0)] = np.nan
    return out


# --- What sampling alone gives: the statistics' tails between two samples of one law ------


def chi2_exceeded(p: float, df: np.ndarray) -> np.ndarray:
    """The value a chi-square variable with ``df`` degrees of freedom exceeds with
    probability ``p``, per entry of ``df`` (at least 1): exact for 1 and 2 degrees, the
    Wilson-Hilferty approximation above (within 4 % of the exact value, and above it,
    for 3 to 100 degrees and p down to 1e-6)."""
    df = np.maximum(np.asarray(df, dtype=np.float64), 1.0)
    normal = NormalDist()
    a = 2.0 / (9.0 * df)
    wilson = df * np.maximum(1.0 - a + normal.inv_cdf(1.0 - p) * np.sqrt(a), 0.0) ** 3
    one = normal.inv_cdf(1.0 - p / 2.0) ** 2
    return np.where(df == 1.0, one, np.where(df == 2.0, -2.0 * math.log(p), wilson))


def kolmogorov_exceeded(p: float) -> float:
    """The value sqrt(n m / (n + m)) times the two-sample KS statistic exceeds with
    probability at most ``p`` (the asymptotic Kolmogorov tail, 2 exp(-2 t^2); smaller
    samples and ties only make it less likely)."""
    return math.sqrt(-math.log(p / 2.0) / 2.0)


def bridge_area_mean(grid: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per column, the mean of the integral of |B(F(x))| dx divided by ``scale``, for B a
    Brownian bridge and F the law whose quantiles at the levels (i + 0.5) / len(grid) are
    the grid's rows: sqrt(n m / (n + m)) times the Wasserstein-1 distance between two
    samples of n and m values of that law tends to that integral. Its tail above the
    mean is at most a normal one with the law's standard deviation (divided by
    ``scale``): no linear functional of the bridge varies more (Borell-TIS). NaN for a
    column with a NaN quantile."""
    points = grid.shape[0]
    levels = np.arange(1, points) / points  # the CDF value between consecutive quantiles
    steps = np.diff(grid, axis=0) / scale
    return np.sqrt(2.0 / np.pi) * (steps * np.sqrt(levels * (1.0 - levels))[:, None]).sum(axis=0)
