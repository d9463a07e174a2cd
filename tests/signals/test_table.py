"""DataFrames as tables: one conversion of the numeric columns, the same table as reading
them column by column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_dl import table
from otel_dl.table import to_table

# The column-by-column reading (one pandas Series per column): the oracle.
_by_column = table._columns_of


def _column(kind: str, rows: int, rng: np.random.Generator) -> object:
    if kind == "text":
        return pd.Series(rng.choice(["a", "b", None], rows), dtype=object)
    if kind == "category":
        return pd.Categorical(rng.choice(["u", "v"], rows))
    if kind == "category with missing":
        return pd.Categorical(rng.choice(["u", "v", None], rows))
    if kind == "int category":
        return pd.Categorical(rng.integers(0, 3, rows))
    if kind == "interval category":
        return pd.cut(rng.normal(size=rows), [-9, -1, 0, 1, 9])
    if kind == "string":
        return pd.array(rng.choice(["p", "q"], rows), dtype="string")
    if kind == "date":
        return pd.date_range("2024-01-01", periods=rows)
    if kind == "numbers as objects":
        return pd.Series(rng.normal(size=rows), dtype=object)
    if kind == "nullable int":
        return pd.array(rng.integers(0, 3, rows), dtype="Int64")
    if kind == "bool":
        return rng.random(rows) > 0.5
    values = rng.normal(size=rows) * 1e3
    values[rng.random(rows) < 0.1] = np.nan
    return (
        values.astype(kind)
        if kind.startswith("float")
        else rng.integers(-99, 99, rows).astype(kind)
    )


_KINDS = [
    "float64", "float32", "float16", "int8", "int64", "uint8", "bool",
    "text", "category", "string", "date", "numbers as objects", "nullable int",
    "category with missing", "int category", "interval category",
]  # fmt: skip


def _assert_same(got: table.Table, want: table.Table) -> None:
    assert (got.rows, got.names, got.numeric_names, got.schema) == (
        want.rows,
        want.names,
        want.numeric_names,
        want.schema,
    )
    assert got.numeric.dtype == want.numeric.dtype
    np.testing.assert_array_equal(got.numeric, want.numeric)
    assert got.numeric.flags.c_contiguous
    assert got.categorical.keys() == want.categorical.keys()
    for name, values in want.categorical.items():
        assert list(got.categorical[name]) == list(values)


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(_KINDS), min_size=1, max_size=6),
    rows=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_a_frame_reads_as_column_by_column(kinds: list[str], rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f"{kind} {i}": _column(kind, rows, rng) for i, kind in enumerate(kinds)})
    _assert_same(to_table(frame), table._table_from_columns(_by_column(frame)))
    assert table._dtypes(frame) == tuple(frame.dtypes.tolist())
    for name, column in frame.items():  # a category's values as astype(object) gives them
        got, want = table._column_values(column), column.astype(object).to_numpy()
        if isinstance(column.dtype, pd.CategoricalDtype):
            assert [type(v) for v in got] == [type(v) for v in want], name
            assert pd.isna(got).tolist() == pd.isna(want).tolist(), name
            assert got[~pd.isna(got)].tolist() == want[~pd.isna(want)].tolist(), name


def test_a_wide_numeric_frame_is_one_float_block_of_its_own() -> None:
    frame = pd.DataFrame(
        {"a": np.arange(3, dtype=np.int8), "b": np.array([0.5, 1.5, np.inf], np.float32)}
    )
    got = to_table(frame)
    assert got.numeric_names == ("a", "b") and got.numeric.dtype == np.float32
    np.testing.assert_array_equal(got.numeric, [[0, 0.5], [1, 1.5], [2, np.inf]])
    assert got.schema == ("columns", (("a", "int8", ()), ("b", "float32", ())))
    frame.iloc[0, 1] = 99.0  # the table keeps the values it read
    assert got.numeric[0, 1] == 0.5
    sliced = pd.DataFrame(np.arange(12.0).reshape(3, 4)).iloc[1:, 1:3]  # a view of a block
    np.testing.assert_array_equal(to_table(sliced).numeric, [[5.0, 6.0], [9.0, 10.0]])


def test_repeated_column_names_are_refused_with_the_fix() -> None:
    frame = pd.DataFrame(np.zeros((2, 3)), columns=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"column names repeat \(a\): give each column its own"):
        to_table(frame)


def test_texts_of_other_lengths_are_one_schema() -> None:
    """numpy sizes a text dtype to the longest value ("<U3", "<U11"): not a schema change."""
    short, long = np.array(["a b", "c"]), np.array(["a much longer", "text"])
    assert short.dtype != long.dtype
    assert to_table(short).schema_fingerprint == to_table(long).schema_fingerprint
    assert to_table({"t": short}).schema_fingerprint == to_table({"t": long}).schema_fingerprint
    assert to_table(short.astype(bytes)).schema[1] == "bytes"
