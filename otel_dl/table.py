"""Rows x features: the one reading of arrays, tensors, DataFrames and mappings.

:func:`to_table` is the one place where a batch becomes a :class:`Table`; every signal
(drift, quality, provenance, the reference profile) reads its input through it, so all of
them flatten the same way::

    from otel_dl.table import to_table
    table = to_table(batch)      # table.rows, table.numeric (2-D float), table.categorical

:func:`to_numpy` is the array reading alone (torch tensors on any device, with grad).
The first module of the signal layer: it imports nothing else of otel-dl.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

_FLOAT32_EXACT = frozenset("?bBhHe") | {"f"}  # bool, small ints, float16, float32


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
    """A dtype as a schema names it. Fixed-width text is ``str`` (``bytes``) whatever its
    width: numpy sizes it to the batch's longest value, which says nothing of the schema,
    and every batch of texts of another length looked like a schema change."""
    if dtype.kind == "U":
        return "str"
    if dtype.kind == "S":
        return "bytes"
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
        if getattr(value, "is_cpu", False) and not value.requires_grad:
            # The usual batch: a CPU tensor numpy reads as is (~4x faster than the checks
            # below). It refuses bfloat16 and a conjugate view; complex goes below too.
            try:
                array = value.numpy()
            except (RuntimeError, TypeError):
                pass
            else:
                if array.dtype.kind != "c":
                    return array
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


def categorical_values(values: Iterable[Any]) -> np.ndarray:
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


def is_frame(data: Any) -> bool:
    """Whether ``data`` is a pandas DataFrame (read by its column names and dtypes)."""
    return type(data).__module__.startswith("pandas") and hasattr(data, "columns")


def _column_values(series: Any) -> np.ndarray:
    """A DataFrame column as a 1-D array: text and categories as Python objects."""
    dtype = str(series.dtype)
    if dtype == "object":  # its objects already: a copy of them, without astype's cost
        return series.to_numpy(dtype=object, copy=True)
    if dtype == "category":
        # What astype(object) gives, each value's category, from the codes: about 10 µs
        # for a row instead of 65 (a missing value, NaN or NaT by the categories' type, is
        # left to astype).
        array = series.array
        codes = np.asarray(array.codes)
        if not (codes < 0).any():
            values: np.ndarray = array.categories.to_numpy(dtype=object)[codes]
            return values
        return series.astype(object).to_numpy()
    if dtype in ("string", "str") or dtype.startswith("string"):
        return series.astype(object).to_numpy()
    return series.to_numpy()


def _column_dtype(dtype: Any) -> str:
    """A DataFrame column's dtype as a schema names it (numpy's or pandas' own)."""
    return _dtype_name(dtype) if isinstance(dtype, np.dtype) else str(dtype)


def _plain_numeric(dtype: Any) -> np.dtype | None:
    """The float dtype :func:`_numeric_dtype` gives a column of numpy ``dtype`` whatever its
    values (bool, integers, float16/32/64); None for any other dtype (objects, whose
    reading depends on their values; complex; dates; pandas' own dtypes)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf":
        return None
    return _float_of(dtype)


@lru_cache(maxsize=64)
def _float_of(dtype: np.dtype) -> np.dtype | None:
    numeric = _numeric_dtype(np.empty(0, dtype))
    return None if numeric is None else numeric.dtype


@dataclass(frozen=True)
class _FrameLayout:
    names: tuple[str, ...]
    numeric_at: list[int]  # positions of the columns read in one conversion
    other_at: list[int]  # positions of the columns read one by one
    dtype: np.dtype  # of the numeric block
    schema: tuple[Any, ...]


@lru_cache(maxsize=64)
def _frame_layout(columns: tuple[Any, ...], dtypes: tuple[Any, ...]) -> _FrameLayout:
    """What reading a DataFrame of these column names and dtypes takes (the same for
    every batch of a source, so worked out once)."""
    names = tuple(str(name) for name in columns)
    targets = [_plain_numeric(dtype) for dtype in dtypes]
    numeric_at = [i for i, target in enumerate(targets) if target is not None]
    float32 = np.dtype(np.float32)
    all32 = bool(numeric_at) and all(targets[i] == float32 for i in numeric_at)
    schema = (
        "columns",
        tuple((name, _column_dtype(dt), ()) for name, dt in zip(names, dtypes, strict=True)),
    )
    return _FrameLayout(
        names,
        numeric_at,
        [i for i, target in enumerate(targets) if target is None],
        float32 if all32 else np.dtype(np.float64),
        schema,
    )


def _dtypes(data: Any) -> tuple[Any, ...]:
    """A DataFrame's column dtypes. ``DataFrame.dtypes`` builds a Series each time (about
    45 µs, on every call of a model fed DataFrames); its block manager lists them in 3 µs,
    and where that private reading is missing or fails the public one is used."""
    try:
        dtypes = tuple(data._mgr.get_dtypes())
        if len(dtypes) == len(data.columns):
            return dtypes
    except Exception:
        pass
    return tuple(data.dtypes.tolist())


def _frame_table(data: Any) -> Table | None:
    """A DataFrame read with one conversion of its numeric columns instead of one pandas
    Series per column (about 15 µs each: a 30-column frame took 0.45 ms per call): the
    :class:`Table` the column-by-column reading gives, or None where that reading is
    needed (no columns, repeated or multi-level names, a column of objects that hold
    numbers). A frame with other columns beside its numeric ones is read column by
    column from one pass of ``items()``: ``iloc`` with a list of columns cost about
    150 µs whatever the rows."""
    columns = data.columns
    if not len(columns) or columns.nlevels != 1 or not columns.is_unique:
        return None
    try:
        layout = _frame_layout(tuple(columns), _dtypes(data))
    except TypeError:  # a dtype that cannot be hashed: read column by column
        return None
    series = [column for _, column in data.items()] if layout.other_at else []
    names = layout.names
    categorical: dict[str, np.ndarray] = {}
    for i in layout.other_at:
        values = _column_values(series[i])
        if _numeric_dtype(np.asarray(values)) is not None:
            return None  # numbers in an object column: numeric, in column order
        categorical[names[i]] = categorical_values(values)
    numeric_at = layout.numeric_at
    if numeric_at and not layout.other_at:
        # A copy in C order, as the column-by-column reading stacks it: the table must not
        # change with the frame, and binning reads rows.
        numeric = np.array(data.to_numpy(dtype=layout.dtype), order="C", copy=True)
    elif numeric_at:
        numeric = np.empty((len(data), len(numeric_at)), dtype=layout.dtype)
        for j, i in enumerate(numeric_at):
            numeric[:, j] = series[i].to_numpy(dtype=layout.dtype)
    else:
        numeric = np.empty((len(data), 0), dtype=np.float64)
    return Table(
        len(data),
        names,
        numeric,
        tuple(names[i] for i in numeric_at),
        categorical,
        layout.schema,
    )


def _columns_of(data: Any) -> list[tuple[str, np.ndarray, str, tuple[int, ...]]]:
    """(name, 1-D column, dtype name, trailing shape) for DataFrames and mappings."""
    columns: list[tuple[str, np.ndarray, str, tuple[int, ...]]] = []
    if is_frame(data):
        if not data.columns.is_unique:
            repeated = sorted({str(n) for n in data.columns[data.columns.duplicated()]})
            raise ValueError(
                f"DataFrame column names repeat ({', '.join(repeated)}): give each column its "
                "own name"
            )
        for name in data.columns:
            series = data[name]
            columns.append((str(name), _column_values(series), _column_dtype(series.dtype), ()))
        return columns
    for name, value in data.items():
        array = to_numpy(value)
        trailing = tuple(int(d) for d in array.shape[1:])
        rows = _as_rows(array)
        if rows.shape[1] == 1 and array.ndim <= 1:
            columns.append((str(name), rows[:, 0], _dtype_name(array.dtype), trailing))
        else:
            for j in range(rows.shape[1]):
                columns.append((f"{name}.{j}", rows[:, j], _dtype_name(array.dtype), trailing))
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
    if is_frame(data):
        table = _frame_table(data)
        return table if table is not None else _table_from_columns(_columns_of(data))
    if isinstance(data, Mapping):
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
    columns = [
        (names[j], rows[:, j], _dtype_name(array.dtype), no_shape) for j in range(rows.shape[1])
    ]
    return _table_from_columns(columns, ("array", _dtype_name(array.dtype), trailing))


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
            categorical[name] = categorical_values(column)
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
