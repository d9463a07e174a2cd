"""Reference profiles: what "normal" data looks like, fitted once and saved as JSON.

A :class:`Reference` is the baseline that drift, range checks and schema checks compare
live batches against. Fit it on training or validation data, save it next to the model,
and load it where the model serves::

    ref = Reference.fit(train_df, bins=10, categorical=["country"])
    ref.save("reference.json")
    ref = Reference.load("reference.json")

Per numeric feature it keeps the bin edges (reference quantiles at 1/bins ... (bins-1)/bins,
duplicates collapsed), the bin shares, min, max, mean, standard deviation and a grid of
:data:`GRID_POINTS` quantile atoms from which ks and wasserstein are estimated without raw
data (with a stored error bound, see ``docs/signals.md``). Per categorical feature it keeps
the share of each category. The file is plain JSON with a format name and version; a file
that cannot be used raises :class:`ReferenceFileError` naming the file and the problem.

Batches are read with :func:`otel_dl.table.to_table`; the counting kernels live in
:mod:`otel_dl.stats`. Imports run one way: table -> stats -> reference -> drift -> monitor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from otel_dl.stats import bin_counts, ceil_to_float32, ks_statistics, wasserstein_distances
from otel_dl.table import Table, categorical_values, to_table

FORMAT_NAME = "otel-dl-reference"
FORMAT_VERSION = 1
GRID_POINTS = 100
"""Quantile atoms per numeric feature, at probabilities (k + 0.5) / GRID_POINTS."""


class ReferenceFileError(ValueError):
    """A reference file that cannot be read: the message names the file and what is wrong."""


# --- The profile -------------------------------------------------------------------------


@dataclass
class _Numeric:
    names: list[str]
    count: np.ndarray  # finite values per feature
    nonfinite: np.ndarray
    minimum: np.ndarray  # NaN where a feature has no finite value
    maximum: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    edges: np.ndarray  # (bins - 1, F), sorted, padded with +inf
    shares: np.ndarray  # (bins, F)
    grid: np.ndarray  # (GRID_POINTS, F) quantile atoms, NaN where no finite value
    ks_bound: np.ndarray
    wasserstein_bound: np.ndarray


@dataclass
class _Categorical:
    count: int
    missing: int
    categories: list[str]
    shares: np.ndarray


class Reference:
    """A fitted reference profile. Build with :meth:`fit`, persist with :meth:`save`."""

    def __init__(
        self,
        *,
        bins: int,
        rows: int,
        names: tuple[str, ...],
        numeric: _Numeric,
        categorical: dict[str, _Categorical],
        schema: tuple[Any, ...],
        schema_fingerprint: str,
        array_names: tuple[str, ...] | None = None,
    ) -> None:
        self.bins = bins
        self.array_names = array_names
        self.rows = rows
        self.names = names
        self.schema = schema
        self.schema_fingerprint = schema_fingerprint
        self._numeric = numeric
        self._categorical = categorical
        self._index = {name: i for i, name in enumerate(numeric.names)}
        self._numeric_names = tuple(numeric.names)
        self._edges32: np.ndarray | None = None
        self._ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._missing: dict[tuple[str, ...], np.ndarray] = {}
        self._category_index = {
            name: {c: i for i, c in enumerate(cat.categories)} for name, cat in categorical.items()
        }

    # Read-only views used by drift and quality.
    @property
    def numeric_names(self) -> tuple[str, ...]:
        return self._numeric_names

    @property
    def categorical_names(self) -> tuple[str, ...]:
        return tuple(self._categorical)

    @property
    def numeric(self) -> _Numeric:
        return self._numeric

    @property
    def categorical(self) -> dict[str, _Categorical]:
        return self._categorical

    def read(self, data: Any) -> Table:
        """``data`` as a table in this profile's terms: array columns get the fitted
        ``feature_names`` and features profiled as categorical are read as categories."""
        table = to_table(data)
        names = self.array_names
        if names and table.schema[0] == "array" and len(table.names) == len(names):
            table = _renamed(table, list(names))
        if not self._categorical:
            return table
        forced = set(self._categorical).intersection(table.numeric_names)
        return _with_forced_categorical(table, forced) if forced else table

    def column_index(self, names: Iterable[str]) -> np.ndarray:
        """Positions in this profile of ``names`` (-1 where the profile lacks the feature)."""
        return np.array([self._index.get(n, -1) for n in names], dtype=np.intp)

    def category_codes(self, name: str, values: np.ndarray) -> np.ndarray:
        """Code per value: the category's index, len(categories) when unseen, -1 if missing."""
        index = self._category_index[name]
        unseen = len(index)
        uniques, inverse = np.unique(values.astype(str), return_inverse=True)
        lookup = np.array([index.get(u, unseen) for u in uniques], dtype=np.intp)
        codes = lookup[inverse.reshape(-1)] if len(uniques) else np.empty(0, dtype=np.intp)
        missing = np.array([v is None for v in values], dtype=bool)
        codes[missing] = -1
        return codes

    def edges_for(self, dtype: np.dtype) -> np.ndarray:
        """Bin edges in ``dtype``, rounded up for float32 so comparisons stay exact."""
        if dtype == np.float32:
            if self._edges32 is None:
                self._edges32 = ceil_to_float32(self._numeric.edges)
            return self._edges32
        return self._numeric.edges

    def range_for(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) with ``x < lo or x >= hi`` exactly when x lies outside [min, max]."""
        key = np.dtype(dtype).str
        if key not in self._ranges:
            lo = self._numeric.minimum
            with np.errstate(over="ignore"):  # a maximum of float64 max gives inf: right
                hi = np.nextafter(self._numeric.maximum, np.inf)
            if key == np.dtype(np.float32).str:
                lo, hi = ceil_to_float32(lo), ceil_to_float32(hi)
            self._ranges[key] = (lo, hi)
        return self._ranges[key]

    def missing_shares(self, names: tuple[str, ...]) -> np.ndarray:
        """Per feature of ``names``, the share of its reference values that were missing
        (NaN/Inf, or ``None`` for a categorical feature); 0 for a feature the profile lacks."""
        shares = self._missing.get(names)
        if shares is None:
            numeric = self._numeric
            seen = numeric.count + numeric.nonfinite
            by_name = {
                name: float(numeric.nonfinite[i] / seen[i]) if seen[i] else 0.0
                for name, i in self._index.items()
            }
            for name, cat in self._categorical.items():
                total = cat.count + cat.missing
                by_name[name] = cat.missing / total if total else 0.0
            shares = np.array([by_name.get(n, 0.0) for n in names], dtype=np.float64)
            if len(self._missing) < 16:
                self._missing[names] = shares
        return shares

    def __repr__(self) -> str:
        return (
            f"Reference(rows={self.rows}, numeric={len(self._numeric.names)}, "
            f"categorical={len(self._categorical)}, bins={self.bins})"
        )

    # --- fitting -------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        data: Any,
        bins: int = 10,
        feature_names: Iterable[str] | None = None,
        categorical: Iterable[str] | None = None,
    ) -> Reference:
        """Profile ``data`` (2-D array, tensor, DataFrame or mapping name -> 1-D array).

        ``feature_names`` renames the columns of array and tensor input (in order);
        ``categorical`` lists features to profile as categories even if numeric.
        """
        if int(bins) < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        bins = int(bins)
        table = to_table(data)
        array_names = None
        if feature_names is not None:
            if table.schema[0] != "array":
                raise ValueError(
                    "feature_names applies to arrays and tensors; DataFrames and mappings "
                    "already name their columns"
                )
            array_names = tuple(str(n) for n in feature_names)
            table = _renamed(table, list(array_names))
        if categorical:
            forced = set(categorical)
            unknown = forced - set(table.names)
            if unknown:
                raise ValueError(f"categorical features not in the data: {sorted(unknown)}")
            table = _with_forced_categorical(table, forced)
        numeric = _fit_numeric(table.numeric.astype(np.float64), list(table.numeric_names), bins)
        cats = {name: _fit_categorical(values) for name, values in table.categorical.items()}
        return cls(
            bins=bins,
            rows=table.rows,
            names=table.names,
            numeric=numeric,
            categorical=cats,
            schema=table.schema,
            schema_fingerprint=table.schema_fingerprint,
            array_names=array_names,
        )

    # --- persistence ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes."""
        num = self._numeric
        features: list[dict[str, Any]] = []
        for name in self.names:
            if name in self._categorical:
                cat = self._categorical[name]
                features.append(
                    {
                        "name": name,
                        "kind": "categorical",
                        "count": cat.count,
                        "missing": cat.missing,
                        "categories": cat.categories,
                        "shares": [float(s) for s in cat.shares],
                    }
                )
                continue
            j = self._index[name]
            edges = num.edges[:, j]
            real = int(np.isfinite(edges).sum())
            features.append(
                {
                    "name": name,
                    "kind": "numeric",
                    "count": int(num.count[j]),
                    "nonfinite": int(num.nonfinite[j]),
                    "min": _json_float(num.minimum[j]),
                    "max": _json_float(num.maximum[j]),
                    "mean": _json_float(num.mean[j]),
                    "std": _json_float(num.std[j]),
                    "edges": [float(e) for e in edges[:real]],
                    "shares": [float(s) for s in num.shares[: real + 1, j]],
                    "grid": [_json_float(g) for g in num.grid[:, j]],
                    "ks_bound": _json_float(num.ks_bound[j]),
                    "wasserstein_bound": _json_float(num.wasserstein_bound[j]),
                }
            )
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "bins": self.bins,
            "grid_points": GRID_POINTS,
            "rows": self.rows,
            "array_names": list(self.array_names) if self.array_names else None,
            "schema": {"fingerprint": self.schema_fingerprint, "description": self.schema},
            "features": features,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as indented JSON (atomically: a temp file, then a rename)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        target = os.fspath(path)
        temp = f"{target}.tmp-{os.getpid()}"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Reference:
        """Read a file written by :meth:`save`; raises :class:`ReferenceFileError`."""
        where = os.fspath(path)
        try:
            with open(where, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ReferenceFileError(f"cannot read reference file {where}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ReferenceFileError(
                f"reference file {where} is not UTF-8 text (corrupt?): {exc}"
            ) from exc
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReferenceFileError(
                f"reference file {where} is not valid JSON (truncated or corrupt): {exc}"
            ) from exc
        try:
            return cls.from_dict(document)
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ReferenceFileError(f"reference file {where} is not usable: {detail}") from exc

    @classmethod
    def from_dict(cls, document: Any) -> Reference:
        """Rebuild from :meth:`to_dict` output; raises ValueError/KeyError/TypeError."""
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
            raise ValueError(f"not an otel-dl reference (expected format {FORMAT_NAME!r})")
        version = document.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"format version {version!r} is not supported (this otel-dl reads version "
                f"{FORMAT_VERSION}); refit and save the reference with this version"
            )
        bins = int(document["bins"])
        if bins < 1 or int(document["grid_points"]) != GRID_POINTS:
            raise ValueError(f"bins must be >= 1 and grid_points must be {GRID_POINTS}")
        features = document["features"]
        if not isinstance(features, list):
            raise TypeError("features must be a list")
        names: list[str] = []
        numeric_rows: list[dict[str, Any]] = []
        cats: dict[str, _Categorical] = {}
        for feature in features:
            name = str(feature["name"])
            names.append(name)
            if feature["kind"] == "categorical":
                shares = np.asarray(feature["shares"], dtype=np.float64)
                categories = [str(c) for c in feature["categories"]]
                if len(shares) != len(categories):
                    raise ValueError(f"feature {name!r}: shares and categories differ in length")
                cats[name] = _Categorical(
                    int(feature["count"]), int(feature["missing"]), categories, shares
                )
            elif feature["kind"] == "numeric":
                numeric_rows.append(feature)
            else:
                raise ValueError(f"feature {name!r}: unknown kind {feature['kind']!r}")
        if len(set(names)) != len(names):
            raise ValueError("feature names are not unique")
        numeric = _numeric_from_rows(numeric_rows, bins)
        schema = _as_tuple(document["schema"]["description"])
        array_names = document.get("array_names")
        return cls(
            bins=bins,
            rows=int(document["rows"]),
            names=tuple(names),
            numeric=numeric,
            categorical=cats,
            schema=schema,
            schema_fingerprint=str(document["schema"]["fingerprint"]),
            array_names=tuple(str(n) for n in array_names) if array_names else None,
        )


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _numeric_from_rows(rows: list[dict[str, Any]], bins: int) -> _Numeric:
    count = len(rows)
    edges = np.full((bins - 1, count), np.inf)
    shares = np.zeros((bins, count))
    grid = np.full((GRID_POINTS, count), np.nan)
    for j, row in enumerate(rows):
        e = np.asarray(row["edges"], dtype=np.float64)
        s = np.asarray(row["shares"], dtype=np.float64)
        if len(e) > bins - 1 or len(s) != len(e) + 1 or np.any(np.diff(e) <= 0):
            raise ValueError(
                f"feature {row['name']!r}: edges must be increasing, at most bins-1 of them, "
                "with one more share than edges"
            )
        edges[: len(e), j] = e
        shares[: len(s), j] = s
        g = np.array([_float_or_nan(v) for v in row["grid"]], dtype=np.float64)
        if len(g) != GRID_POINTS:
            raise ValueError(f"feature {row['name']!r}: grid must have {GRID_POINTS} points")
        grid[:, j] = g

    def column(key: str) -> np.ndarray:
        return np.array([_float_or_nan(row[key]) for row in rows], dtype=np.float64)

    return _Numeric(
        names=[str(row["name"]) for row in rows],
        count=np.array([int(row["count"]) for row in rows], dtype=np.int64),
        nonfinite=np.array([int(row["nonfinite"]) for row in rows], dtype=np.int64),
        minimum=column("min"),
        maximum=column("max"),
        mean=column("mean"),
        std=column("std"),
        edges=edges,
        shares=shares,
        grid=grid,
        ks_bound=column("ks_bound"),
        wasserstein_bound=column("wasserstein_bound"),
    )


def _renamed(table: Table, names: list[str]) -> Table:
    """The same table with positional names replaced; the schema stays that of the source."""
    if len(names) != len(table.names) or len(set(names)) != len(names):
        raise ValueError(f"feature_names must be {len(table.names)} unique names, got {len(names)}")
    mapping = dict(zip(table.names, names, strict=True))
    return Table(
        table.rows,
        tuple(names),
        table.numeric,
        tuple(mapping[n] for n in table.numeric_names),
        {mapping[k]: v for k, v in table.categorical.items()},
        table.schema,
    )


def _with_forced_categorical(table: Table, forced: set[str]) -> Table:
    keep = [j for j, n in enumerate(table.numeric_names) if n not in forced]
    categorical = dict(table.categorical)
    for j, name in enumerate(table.numeric_names):
        if name in forced:
            categorical[name] = categorical_values(_category_strings(table.numeric[:, j]))
    return Table(
        table.rows,
        table.names,
        table.numeric[:, keep],
        tuple(table.numeric_names[j] for j in keep),
        categorical,
        table.schema,
    )


def _category_strings(values: np.ndarray) -> list[Any]:
    """Numeric category codes as strings: integral values print without a fraction."""
    out: list[Any] = []
    for v in values.tolist():
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(None if isinstance(v, float) and math.isnan(v) else str(v))
    return out


def _fit_numeric(values: np.ndarray, names: list[str], bins: int) -> _Numeric:
    features = values.shape[1]
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    clean = np.where(finite, values, np.nan)
    has = count > 0
    edges = np.full((bins - 1, features), np.inf)
    grid = np.full((GRID_POINTS, features), np.nan)
    minimum = np.full(features, np.nan)
    maximum = np.full(features, np.nan)
    mean = np.full(features, np.nan)
    std = np.full(features, np.nan)
    if has.any():
        sub = clean[:, has]
        minimum[has] = np.nanmin(sub, axis=0)
        maximum[has] = np.nanmax(sub, axis=0)
        # Values near the float64 limit overflow the variance to inf; that inf is honest.
        with np.errstate(over="ignore", invalid="ignore"):
            mean[has] = np.nanmean(sub, axis=0)
            std[has] = np.nanstd(sub, axis=0)
        levels = np.arange(1, bins) / bins
        if bins > 1:
            quantiles = np.nanquantile(sub, levels, axis=0).reshape(bins - 1, -1)
            edges[:, has] = _edges(quantiles)
        grid_levels = (np.arange(GRID_POINTS) + 0.5) / GRID_POINTS
        grid[:, has] = np.nanquantile(sub, grid_levels, axis=0)
    counts = bin_counts(values, edges)
    shares = np.divide(counts, count, out=np.zeros(counts.shape), where=count > 0)
    ks_bound = np.full(features, np.nan)
    wasserstein_bound = np.full(features, np.nan)
    if has.any():
        # The profile replaces the reference by its grid atoms; by the triangle inequality
        # the estimate is off by at most the distance between the data and its atoms.
        ks_bound[has] = ks_statistics(clean[:, has], grid[:, has])
        scale = np.maximum(std[has], 1e-3)
        wasserstein_bound[has] = wasserstein_distances(clean[:, has], grid[:, has]) / scale
    return _Numeric(
        names=names,
        count=count.astype(np.int64),
        nonfinite=(values.shape[0] - count).astype(np.int64),
        minimum=minimum,
        maximum=maximum,
        mean=mean,
        std=std,
        edges=edges,
        shares=shares,
        grid=grid,
        ks_bound=ks_bound,
        wasserstein_bound=wasserstein_bound,
    )


def _edges(quantiles: np.ndarray) -> np.ndarray:
    """Bin edges from each column's quantiles: equal quantiles collapse into one edge,
    and a value several quantiles share (a mass point: the 0 of a zero-inflated feature,
    the common value of a binary flag) gets a bin of its own, [v, v+), v+ the next float32
    above v. Without it, the values above a mass point that holds most of the data would
    share its bin, and no shift between them (5 % of ones becoming 50 %) could move a
    share. Sorted, +inf padding at the end; as many rows as ``quantiles``."""
    out = np.sort(quantiles, axis=0)
    rows = out.shape[0]
    duplicate = np.zeros_like(out, dtype=bool)
    duplicate[1:] = out[1:] == out[:-1]
    mass = np.zeros_like(out, dtype=bool)  # the first of several equal quantiles
    mass[:-1] = ~duplicate[:-1] & duplicate[1:]
    above = np.nextafter(ceil_to_float32(out).astype(np.float32), np.float32(np.inf))
    extra = np.where(mass, above.astype(np.float64), np.inf)
    merged = np.sort(np.concatenate([np.where(duplicate, np.inf, out), extra]), axis=0)
    # v+ may be the next quantile already; a group of k equal quantiles frees k - 1 rows
    # and takes one, so the distinct edges always fit in ``rows``.
    again = np.zeros_like(merged, dtype=bool)
    again[1:] = merged[1:] == merged[:-1]
    merged[again] = np.inf
    return np.sort(merged, axis=0)[:rows]


def _fit_categorical(values: np.ndarray) -> _Categorical:
    present = np.array([v is not None for v in values], dtype=bool)
    kept = values[present].astype(str)
    categories, counts = np.unique(kept, return_counts=True)
    total = int(present.sum())
    shares = counts / total if total else np.zeros(0)
    return _Categorical(total, int(len(values) - total), [str(c) for c in categories], shares)
