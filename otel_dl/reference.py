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

:func:`to_table` is the one place where arrays, tensors, DataFrames and mappings become
rows x features; every signal uses it, so all of them flatten the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

FORMAT_NAME = "otel-dl-reference"
FORMAT_VERSION = 1
GRID_POINTS = 100
"""Quantile atoms per numeric feature, at probabilities (k + 0.5) / GRID_POINTS."""

_FLOAT32_EXACT = frozenset("?bBhHe") | {"f"}  # bool, small ints, float16, float32


class ReferenceFileError(ValueError):
    """A reference file that cannot be read: the message names the file and what is wrong."""


# --- Rows x features ---------------------------------------------------------------------


@dataclass
class Table:
    """A batch as rows x features: numeric values in one 2-D float array, others by name.

    ``numeric`` is float32 when every input column fits float32 exactly, else float64; it
    keeps NaN and +-Inf (quality counts them, drift skips them). ``categorical`` maps a
    feature name to an object array of strings, with ``None`` for a missing value.
    """

    rows: int
    names: tuple[str, ...]
    numeric: np.ndarray
    numeric_names: tuple[str, ...]
    categorical: dict[str, np.ndarray] = field(default_factory=dict)
    schema: tuple[Any, ...] = ()

    @property
    def schema_fingerprint(self) -> str:
        return _schema_digest(self.schema)


@lru_cache(maxsize=256)
def _schema_digest(schema: tuple[Any, ...]) -> str:
    text = json.dumps(schema, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype)  # numpy builds this string in Python on every call


@lru_cache(maxsize=64)
def _index_names(count: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(count))


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view of arrays, torch tensors (any device, with grad) and nested lists."""
    if isinstance(value, np.ndarray):
        return value
    module = type(value).__module__
    if module.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach()
        if tensor.device.type == "meta":
            raise TypeError("a tensor on the meta device holds no values")
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.is_complex():
            tensor = tensor.real
        if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            tensor = tensor.float()
        return tensor.numpy()
    if module.startswith("pandas"):
        return value.to_numpy()
    try:
        return np.asarray(value)
    except RuntimeError as exc:  # torch refusing a nested tensor (grad, meta, sparse)
        raise TypeError(f"no array reading of {type(value).__name__}: {exc}") from exc


def _as_rows(array: np.ndarray) -> np.ndarray:
    """0-d -> one row, one feature; 1-D -> rows x 1; 2-D as is; N-D -> rows x prod(rest)."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    if array.ndim == 2:
        return array
    return array.reshape(array.shape[0], math.prod(array.shape[1:]))


def _numeric_dtype(array: np.ndarray) -> np.ndarray | None:
    """The array as float32/float64, or None when its values are not numbers."""
    kind = array.dtype.kind
    if kind == "f" and array.dtype.itemsize in (4, 8):
        return array
    if array.dtype.char in _FLOAT32_EXACT:
        return array.astype(np.float32)
    if kind in "iuf":
        return array.astype(np.float64)
    if kind == "c":
        return array.real.astype(np.float64)
    if kind == "O":
        try:
            return array.astype(np.float64)
        except (TypeError, ValueError):
            return None
    return None


def _categorical_values(values: Iterable[Any]) -> np.ndarray:
    """Category labels as strings, ``None`` for missing (None, NaN, pandas NA/NaT)."""
    items = list(values)
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        missing = (
            item is None
            or (isinstance(item, float) and math.isnan(item))
            or type(item).__name__ in ("NAType", "NaTType")
        )
        out[i] = None if missing else str(item)
    return out


def _columns_of(data: Any) -> list[tuple[str, np.ndarray, str, tuple[int, ...]]]:
    """(name, 1-D column, dtype name, trailing shape) for DataFrames and mappings."""
    columns: list[tuple[str, np.ndarray, str, tuple[int, ...]]] = []
    if type(data).__module__.startswith("pandas") and hasattr(data, "columns"):
        for name in data.columns:
            series = data[name]
            dtype = str(series.dtype)
            if dtype in ("object", "category", "string", "str") or dtype.startswith("string"):
                values = series.astype(object).to_numpy()
            else:
                values = series.to_numpy()
            columns.append((str(name), values, dtype, ()))
        return columns
    for name, value in data.items():
        array = to_numpy(value)
        trailing = tuple(int(d) for d in array.shape[1:])
        rows = _as_rows(array)
        if rows.shape[1] == 1 and array.ndim <= 1:
            columns.append((str(name), rows[:, 0], str(array.dtype), trailing))
        else:
            for j in range(rows.shape[1]):
                columns.append((f"{name}.{j}", rows[:, j], str(array.dtype), trailing))
    return columns


def to_table(data: Any) -> Table:
    """Turn a batch into a :class:`Table`.

    Arrays and tensors: 0-d is one row of one feature, 1-D is one feature of many rows,
    2-D is rows x columns named ``"0"``, ``"1"``, ...; 3-D and higher keep the first axis
    as rows and flatten the rest in C order into features named by flat index. DataFrames
    and mappings of name -> array give one feature per column (a mapping value with more
    than one dimension becomes ``name.0``, ``name.1``, ... by the same rule). Columns whose
    values are not numbers are categorical.

    Raises ``ValueError`` or ``TypeError`` when ``data`` has no tabular reading at all
    (for example a mapping whose columns differ in length). A Table comes back as is.
    """
    if isinstance(data, Table):
        return data
    if isinstance(data, Mapping) or (
        type(data).__module__.startswith("pandas") and hasattr(data, "columns")
    ):
        return _table_from_columns(_columns_of(data))
    array = to_numpy(data)
    trailing = tuple(int(d) for d in array.shape[1:])
    rows = _as_rows(array)
    numeric = _numeric_dtype(rows)
    names = _index_names(rows.shape[1])
    if numeric is not None:
        return Table(
            rows.shape[0], names, numeric, names, {}, ("array", _dtype_name(array.dtype), trailing)
        )
    no_shape: tuple[int, ...] = ()
    columns = [(names[j], rows[:, j], str(array.dtype), no_shape) for j in range(rows.shape[1])]
    return _table_from_columns(columns, ("array", str(array.dtype), trailing))


def _table_from_columns(
    columns: list[tuple[str, np.ndarray, str, tuple[int, ...]]],
    schema: tuple[Any, ...] | None = None,
) -> Table:
    lengths = {len(column) for _, column, _, _ in columns}
    if len(lengths) > 1:
        raise ValueError(f"columns differ in length: {sorted(lengths)}")
    rows = lengths.pop() if lengths else 0
    numeric_cols: list[np.ndarray] = []
    numeric_names: list[str] = []
    categorical: dict[str, np.ndarray] = {}
    for name, column, _, _ in columns:
        values = _numeric_dtype(np.asarray(column))
        if values is None:
            categorical[name] = _categorical_values(column)
        else:
            numeric_cols.append(values)
            numeric_names.append(name)
    dtype = (
        np.float32
        if all(c.dtype == np.float32 for c in numeric_cols) and numeric_cols
        else np.float64
    )
    numeric = (
        np.stack(numeric_cols, axis=1).astype(dtype, copy=False)
        if numeric_cols
        else np.empty((rows, 0), dtype=np.float64)
    )
    if schema is None:
        schema = ("columns", tuple((name, dtype_, trail) for name, _, dtype_, trail in columns))
    return Table(
        rows,
        tuple(name for name, _, _, _ in columns),
        numeric,
        tuple(numeric_names),
        categorical,
        schema,
    )


# --- Counting against per-feature thresholds ---------------------------------------------


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
            categorical[name] = _categorical_values(_category_strings(table.numeric[:, j]))
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
    from otel_dl.drift import ks_statistics, wasserstein_distances

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
            edges[:, has] = _unique_padded(quantiles)
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


def _unique_padded(quantiles: np.ndarray) -> np.ndarray:
    """Collapse equal edges within each column (sorted), moving +inf padding to the end."""
    out = np.sort(quantiles, axis=0)
    duplicate = np.zeros_like(out, dtype=bool)
    duplicate[1:] = out[1:] == out[:-1]
    out[duplicate] = np.inf
    return np.sort(out, axis=0)


def _fit_categorical(values: np.ndarray) -> _Categorical:
    present = np.array([v is not None for v in values], dtype=bool)
    kept = values[present].astype(str)
    categories, counts = np.unique(kept, return_counts=True)
    total = int(present.sum())
    shares = counts / total if total else np.zeros(0)
    return _Categorical(total, int(len(values) - total), [str(c) for c in categories], shares)
