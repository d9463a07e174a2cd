"""Adversarial inputs to every instrumented entry point and every signal function.

Entry points (real libraries, in this process, instrumented by ``otel_dl.instrument()``):
DataLoader iteration (the default collate of odd samples), ``nn.Module`` forward of
models otel-dl traces, ONNX Runtime ``InferenceSession.run``, scikit-learn
``predict``/``predict_proba``/``decision_function``/``transform``, a transformers
text-classification pipeline built here from a config and a local tokenizer, Feast
``get_online_features`` on a real repository over SQLite, and the pandas, pyarrow and
``datasets`` readers on local files. Each input is run twice: inside OpenTelemetry's
``suppress_instrumentation()``, where every otel-dl wrapper calls straight through (the
uninstrumented call), and instrumented. The result must be the same value, or the
exception the same type with the same message.

Signal functions: everything public in ``drift``, ``confidence``, ``calibration``,
``quality``, ``provenance``, ``monitor`` and ``reference``, which the instrumentors call
on user data. Each may raise only what its docstring documents, and the functions that
never raise on data must not.

Inputs: empty, 0-d, 1-D to 4-D and ragged; NaN, +-Inf, huge, tiny and subnormal values;
int, bool, float16, bfloat16, complex, object and string dtypes; dicts, nested tuples,
DataFrames and sparse tensors and matrices; tensors that require grad and tensors on the
meta device. Hypothesis is derandomised, so a run is reproducible; its too_slow health
check is off because every example makes real library calls, twice.

Every call made is counted, and the internal errors otel-dl's guard swallowed (counted
in ``otel_dl.internal.errors``) are reported by site.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Set before transformers, huggingface_hub and datasets read them: nothing may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from opentelemetry.instrumentation.utils import suppress_instrumentation

import otel_dl
from otel_dl import (
    calibration,
    confidence,
    drift,
    monitor,
    provenance,
    quality,
    reference,
    stats,
)
from otel_dl._config import resolve_config
from otel_dl.table import Table, to_table
from tests.reliability.findings import record, scale
from tests.support import (
    EXPORTER,
    TINY_WORDS,
    feast_driver_repo,
    tiny_bert_classifier,
    tiny_tokenizer,
)

SECTION = "sdk-adversarial"


def _settings(fast: int, full: int) -> Any:
    return settings(
        max_examples=int(scale(fast, full)),
        deadline=None,
        derandomize=True,
        database=None,
        # Each example makes real library calls (ONNX, Feast, a transformer), twice.
        suppress_health_check=[HealthCheck.too_slow],
    )


# --- Counting and comparing --------------------------------------------------------------


@dataclass
class Tally:
    """What one entry point or function was given and what came of it."""

    name: str
    inputs: int = 0
    returned: int = 0
    raised: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text[:600])


TALLIES: dict[str, Tally] = {}


def _tally(name: str) -> Tally:
    return TALLIES.setdefault(name, Tally(name))


_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None

    def describe(self) -> str:
        if self.error is None:
            return f"returned {_short(self.value)}"
        return f"raised {type(self.error).__name__}: {_message(self.error)[:200]}"


def _message(error: BaseException) -> str:
    return _ADDRESS.sub("0x…", str(error))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:160] + "…"


def _run(call: Callable[[], Any]) -> Outcome:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Outcome(value=call())
    except Exception as error:
        return Outcome(error=error)


def _same(a: Any, b: Any) -> bool:
    """Deep equality that treats NaN as equal to NaN and compares tensors and frames."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if (a.dtype, a.shape, a.device, a.layout, a.requires_grad) != (
            b.dtype,
            b.shape,
            b.device,
            b.layout,
            b.requires_grad,
        ):
            return False
        if a.device.type == "meta":
            return True
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        return bool(torch.equal(a.detach(), b.detach())) or bool(
            torch.allclose(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)
        )
    if isinstance(a, np.ndarray):
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return False
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        if a.dtype.kind == "O":
            return all(_same(x, y) for x, y in zip(a.ravel(), b.ravel(), strict=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, pd.DataFrame | pd.Series):
        return bool(a.equals(b)) and list(a.dtypes if a.ndim == 2 else [a.dtype]) == list(
            b.dtypes if b.ndim == 2 else [b.dtype]
        )
    if isinstance(a, torch.nn.Module):
        return _same(dict(a.state_dict()), dict(b.state_dict()))
    if hasattr(a, "toarray") and hasattr(a, "nnz"):  # scipy sparse matrices
        return a.shape == b.shape and _same(a.toarray(), b.toarray())
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "equals") and callable(a.equals):  # pyarrow tables
        return bool(a.equals(b))
    return bool(a == b)


def _snapshot(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:
        return _UNCOPYABLE


_UNCOPYABLE = object()


def _unchanged(before: Any, value: Any) -> bool:
    """Whether ``value`` still equals its snapshot ``before`` (True when none was taken)."""
    return before is _UNCOPYABLE or _same(before, _snapshot(value))


def _compare(name: str, call: Callable[[], Any], shown: Any, view: Callable[[Any], Any]) -> None:
    """Run ``call`` uninstrumented, then instrumented: the outcomes must be the same, and
    the instrumented call must leave the inputs (``shown``) as the uninstrumented one did."""
    tally = _tally(name)
    with suppress_instrumentation():
        bare = _run(lambda: view(call()))
    before = _snapshot(shown)
    traced = _run(lambda: view(call()))
    tally.inputs += 1
    if bare.error is None:
        tally.returned += 1
    else:
        tally.raised += 1
    if tally.inputs % 200 == 0:
        EXPORTER.clear()
    differs = (bare.error is None) != (traced.error is None)
    if bare.error is not None and traced.error is not None:
        differs = type(bare.error) is not type(traced.error) or _message(bare.error) != _message(
            traced.error
        )
    elif not differs:
        differs = not _same(bare.value, traced.value)
    if differs:
        tally.problem(
            f"{name} {_short(shown)}: uninstrumented {bare.describe()}, instrumented "
            f"{traced.describe()}"
        )
    if not _unchanged(before, shown):
        tally.problem(f"{name} {_short(shown)}: the instrumented call changed its input")


def _identity(value: Any) -> Any:
    return value


# --- Strategies ------------------------------------------------------------------------

ODD_FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-300,
    5e-324,
    -5e-324,
    1e300,
    -1.7976931348623157e308,
    65504.0,
    1e-7,
    math.nan,
    math.inf,
    -math.inf,
]
floats = st.one_of(st.sampled_from(ODD_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
finite_floats = st.one_of(
    st.sampled_from([f for f in ODD_FLOATS if math.isfinite(f)]),
    st.floats(-1e6, 1e6),
    st.floats(allow_nan=False, allow_infinity=False),
)


def features(dtype: str = "float32") -> Any:
    """Batches the models accept: (rows, FEATURES) floats, finite or not."""
    return st.one_of(
        *[
            numeric_arrays(
                dtype=dtype, shape=st.sampled_from([(0, FEATURES), (1, FEATURES), (6, FEATURES)])
            ),
            numeric_arrays(
                dtype=dtype,
                shape=st.sampled_from([(1, FEATURES), (6, FEATURES), (40, FEATURES)]),
                finite=True,
            ),
        ]
    )


NUMERIC_DTYPES = ["float16", "float32", "float64", "int8", "int64", "uint8", "bool", "complex64"]
shapes = st.one_of(
    st.just(()),
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    st.sampled_from([(0,), (0, 4), (4, 0), (3, 4), (1, 4), (2, 3, 4)]),
)


@st.composite
def numeric_arrays(
    draw: Any, dtype: str | None = None, shape: Any = None, finite: bool = False
) -> np.ndarray:
    """Arrays whose values come from a small pool of odd floats (so NaN, Inf, huge and
    tiny values show up together), or any values for integer and bool dtypes."""
    dtype = dtype or draw(st.sampled_from(NUMERIC_DTYPES))
    shape = draw(shape if shape is not None else shapes)
    if np.dtype(dtype).kind in "fc":
        pool_values = finite_floats if finite else floats
        with np.errstate(over="ignore"):
            values = draw(st.lists(pool_values, min_size=1, max_size=8))
            pool = np.array(values, dtype=np.float64).astype(dtype)
        count = int(np.prod(shape)) if shape else 1
        picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=count, max_size=count))
        return pool[np.array(picks, dtype=np.intp)].reshape(shape)
    return draw(hnp.arrays(dtype, shape))


@st.composite
def other_arrays(draw: Any) -> np.ndarray:
    """Object and string arrays, the dtypes that hold no numbers (or only some)."""
    shape = draw(st.sampled_from([(), (0,), (3,), (2, 2), (3, 1)]))
    count = int(np.prod(shape)) if shape else 1
    if draw(st.booleans()):
        items = draw(
            st.lists(
                st.one_of(st.none(), floats, st.integers(-(2**70), 2**70), st.text(max_size=3)),
                min_size=count,
                max_size=count,
            )
        )
        out = np.empty(count, dtype=object)
        for i, item in enumerate(items):
            out[i] = item
        return out.reshape(shape)
    return np.array(
        draw(st.lists(st.text(max_size=3), min_size=count, max_size=count)), dtype="<U3"
    ).reshape(shape)


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    kind = draw(
        st.sampled_from(["plain", "plain", "grad", "meta", "sparse", "bfloat16", "strided"])
    )
    if kind == "meta":
        shape = draw(shapes)
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]))
        return torch.empty(shape, dtype=dtype, device="meta")
    array = draw(numeric_arrays())
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if kind == "grad" and tensor.is_floating_point():
        return tensor.clone().requires_grad_(True)
    if kind == "sparse" and tensor.dim() >= 1 and tensor.dtype != torch.float16:
        return tensor.to_sparse()
    if kind == "bfloat16" and not tensor.is_complex():
        return tensor.to(torch.bfloat16)
    if kind == "strided" and tensor.dim() >= 2:
        return tensor.transpose(0, 1)
    return tensor


ragged = st.lists(st.lists(floats, max_size=4), max_size=4)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), floats, st.text(max_size=4)
)


@st.composite
def frames(draw: Any) -> pd.DataFrame:
    rows = draw(st.integers(0, 6))
    columns: dict[str, Any] = {}
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["float", "int", "bool", "text", "mixed", "category"]))
        name = draw(st.sampled_from([f"c{i}", f"é{i}", f"{i}", f"col {i}"]))
        if kind == "float":
            values: Any = draw(st.lists(floats, min_size=rows, max_size=rows))
        elif kind == "int":
            values = draw(st.lists(st.integers(-(2**62), 2**62), min_size=rows, max_size=rows))
        elif kind == "bool":
            values = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
        elif kind == "text":
            values = draw(
                st.lists(st.one_of(st.none(), st.text(max_size=4)), min_size=rows, max_size=rows)
            )
        elif kind == "category":
            values = pd.Categorical(
                draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=rows, max_size=rows))
            )
        else:
            values = pd.Series(
                draw(
                    st.lists(
                        st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=2), floats),
                        min_size=rows,
                        max_size=rows,
                    )
                ),
                dtype=object,
            )
        columns[name] = values
    return pd.DataFrame(columns, index=range(rows)) if columns else pd.DataFrame(index=range(rows))


@st.composite
def probabilities(draw: Any) -> Any:
    """Rows of class probabilities, as a classifier returns them (a single row included)."""
    rows = draw(st.integers(1, 3))
    classes = draw(st.integers(1, 5))
    logits = np.array(
        draw(st.lists(st.floats(-30, 30), min_size=rows * classes, max_size=rows * classes))
    ).reshape(rows, classes)
    shares = np.exp(logits - logits.max(axis=1, keepdims=True))
    shares = (shares / shares.sum(axis=1, keepdims=True)).astype(
        draw(st.sampled_from(["float32", "float64"]))
    )
    return torch.from_numpy(shares) if draw(st.booleans()) else shares


leaves = st.one_of(numeric_arrays(), other_arrays(), tensors(), ragged, scalars, frames())
values = st.one_of(
    leaves,
    st.dictionaries(
        st.sampled_from(["x", "y", "ids", "é", "0"]),
        st.one_of(numeric_arrays(), tensors(), ragged),
        max_size=3,
    ),
    st.tuples(st.one_of(tensors(), numeric_arrays()), st.one_of(tensors(), scalars)),
    st.tuples(st.tuples(tensors(), tensors()), scalars),
)


# --- Shared fixtures ------------------------------------------------------------------

FEATURES = 4
CLASSES = 3
REFERENCE_SAMPLE = np.random.default_rng(0).normal(size=(500, FEATURES))
REFERENCE = reference.Reference.fit(REFERENCE_SAMPLE)


@pytest.fixture(scope="module", autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    before = otel_dl.internal_error_counts()
    h = otel_dl.instrument()
    yield h
    h.shutdown()
    _summary(before)


def _summary(before: dict[str, int]) -> None:
    """One table for the whole module: every entry point and function, and the guard."""
    after = otel_dl.internal_error_counts()
    swallowed = {
        site: n - before.get(site, 0) for site, n in after.items() if n > before.get(site, 0)
    }
    rows = [["entry point or function", "inputs", "returned", "raised", "did not hold"]]
    for tally in TALLIES.values():
        rows.append(
            [
                tally.name,
                f"{tally.inputs:,}",
                f"{tally.returned:,}",
                f"{tally.raised:,}",
                str(len(tally.problems)),
            ]
        )
    total = sum(t.inputs for t in TALLIES.values())
    entries = [t for n, t in TALLIES.items() if n.startswith(ENTRY_PREFIXES)]
    to_entries = sum(t.inputs for t in entries)
    problems = sum(len(t.problems) for t in TALLIES.values())
    record(
        SECTION,
        tried=[
            f"{total:,} inputs in all: {to_entries:,} to {len(entries)} instrumented entry "
            "points (each run uninstrumented, then instrumented) and "
            f"{total - to_entries:,} to {len(TALLIES) - len(entries)} signal functions."
        ],
        held=[]
        if problems
        else [
            f"0 exceptions escaped from instrumentation and 0 results changed in {to_entries:,} "
            "calls of instrumented entry points; every signal function raised only what it "
            "documents."
        ],
        did_not_hold=[
            f"{problems} input(s) gave a different result or exception, or an undocumented "
            "error; the findings above list them."
        ]
        if problems
        else [],
        table=rows,
        notes=[
            "Internal errors swallowed and counted by the guard (otel_dl.internal.errors), by "
            "site: "
            + (", ".join(f"{site} {n:,}" for site, n in sorted(swallowed.items())) or "none")
            + "."
        ],
    )


def _swallowed(before: dict[str, int]) -> dict[str, int]:
    """Internal errors the guard swallowed since ``before``, by site."""
    after = otel_dl.internal_error_counts()
    return {site: n - before.get(site, 0) for site, n in after.items() if n > before.get(site, 0)}


def _report(names: list[str], what: str, errors_before: dict[str, int] | None = None) -> None:
    """Record the figures of one test (before it asserts) and assert what must hold.

    Entry points give ``errors_before``: the internal errors the guard had counted when
    the test began. Any it swallowed during the test is reported and does not hold: it
    is not an escape, but it is an otel-dl bug, and its span lost signals or more.
    """
    tallies = [_tally(n) for n in names]
    inputs = sum(t.inputs for t in tallies)
    problems = [p for t in tallies for p in t.problems]
    returned, raised = sum(t.returned for t in tallies), sum(t.raised for t in tallies)
    swallowed = _swallowed(errors_before) if errors_before is not None else {}
    if errors_before is None:
        held = (
            f"All {inputs:,} calls returned ({returned:,}) or raised an error their docstring "
            f"documents ({raised:,}), left their inputs unchanged, and returned no NaN, "
            "infinite or out-of-range number."
        )
    else:
        held = (
            f"All {inputs:,} inputs gave the instrumented call the same outcome as the "
            f"uninstrumented one ({returned:,} the same value, {raised:,} the same exception "
            "type and message) and left the inputs unchanged; the guard swallowed no internal "
            "error."
        )
    if swallowed:
        problems.append(
            "The guard swallowed internal errors: "
            + ", ".join(f"{site} {n:,}" for site, n in sorted(swallowed.items()))
            + "."
        )
    record(
        SECTION,
        tried=[
            f"{inputs:,} adversarial inputs to {what} ("
            + ", ".join(f"{t.name} {t.inputs:,}" for t in tallies)
            + ")."
        ],
        held=[] if problems else [held],
        did_not_hold=problems[:10],
    )
    assert inputs > 0
    assert not problems, problems[:5]


ENTRY_PREFIXES = (
    "DataLoader",
    "nn.Module",
    "InferenceSession",
    "sklearn",
    "transformers",
    "Feast",
    "pandas",
    "pyarrow",
    "datasets",
)


# --- DataLoader ------------------------------------------------------------------------


class Items:
    """A map-style dataset over the given items, whatever they are."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


@st.composite
def uniform_tensors(draw: Any) -> list[torch.Tensor]:
    """Samples of one dtype and shape, which the default collate can stack."""
    dtype = draw(st.sampled_from(NUMERIC_DTYPES))
    shape = draw(shapes)
    arrays = draw(st.lists(numeric_arrays(dtype=dtype, shape=st.just(shape)), max_size=6))
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@st.composite
def loader_cases(draw: Any) -> tuple[list[Any], int | None, list[Any] | None, bool]:
    item = draw(
        st.sampled_from(
            [
                tensors(),
                numeric_arrays(),
                other_arrays(),
                st.dictionaries(st.sampled_from(["x", "y", "ids"]), tensors(), max_size=3),
                st.tuples(tensors(), st.integers(0, 3)),
                st.tuples(st.tuples(tensors(), numeric_arrays()), scalars),
                scalars,
                ragged,
                frames(),
            ]
        )
    )
    items = draw(st.one_of(uniform_tensors(), st.lists(item, max_size=6)))
    batch_size = draw(st.sampled_from([None, 1, 2, 3]))
    features = draw(st.sampled_from([None, None, [0], [1, 0], ["x"], ["x", "y"], [9]]))
    return items, batch_size, features, draw(st.booleans())


def test_dataloader_collates_odd_samples_unchanged() -> None:
    errors_before = otel_dl.internal_error_counts()
    from torch.utils.data import DataLoader

    @_settings(60, 1_500)
    @given(loader_cases())
    def run(case: tuple[list[Any], int | None, list[Any] | None, bool]) -> None:
        items, batch_size, features, with_reference = case

        def iterate() -> list[Any]:
            loader = DataLoader(Items(items), batch_size=batch_size)
            if features is not None or with_reference:
                otel_dl.watch(
                    loader, features=features, reference=REFERENCE if with_reference else None
                )
            return list(loader)

        _compare("DataLoader iteration", iterate, case, _identity)

    run()
    _report(
        ["DataLoader iteration"], "DataLoader iteration with the default collate", errors_before
    )


# --- nn.Module -------------------------------------------------------------------------


class Echo(torch.nn.Module):
    """Returns its input: odd outputs reach the confidence and prediction-count code."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


class Scorer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, CLASSES)

    def forward(self, x: Any) -> Any:
        return self.linear(x)


class Total(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        return x.sum(dim=-1)


class SparseBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.eye(3).to_sparse())


# Objects provenance.model_fingerprint is given: a module, its meta-device twin, one with a
# sparse buffer, and one that cannot be pickled.
ODD_MODELS = [Echo(), Scorer().to("meta"), SparseBuffer(), lambda: 1]


@pytest.fixture(scope="module")
def models(handle: otel_dl.Instrumentation) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    scorer = otel_dl.watch(Scorer(), name="scorer", version="1", reference=REFERENCE).eval()
    on_meta = otel_dl.watch(Scorer().to("meta"), name="scorer-on-meta").eval()
    classifier = torch.nn.Sequential(Scorer(), torch.nn.Softmax(dim=-1))
    classifier.eval()  # eval() on the outermost module: traced, its submodules not
    echo = Echo()
    echo.eval()
    total = Total()
    total.eval()
    return {
        "scorer": scorer,
        "scorer on meta": on_meta,
        "classifier": classifier,
        "echo": echo,
        "total": total,
    }


def test_model_forward_on_odd_tensors_unchanged(models: dict[str, torch.nn.Module]) -> None:
    errors_before = otel_dl.internal_error_counts()

    @_settings(80, 2_000)
    @given(
        st.sampled_from(sorted(models)),
        st.one_of(
            features().map(torch.from_numpy),
            features().map(lambda a: torch.from_numpy(a).requires_grad_(True)),
            features("float64").map(torch.from_numpy),
            st.just(torch.empty(2, FEATURES, device="meta")),
            tensors(),
            values,
        ),
        st.sampled_from(["grad", "no_grad", "inference_mode"]),
    )
    # Found here before: a model on the meta device made no span; a single row of class
    # probabilities came back with its top probability overwritten.
    @example("scorer on meta", torch.empty(2, FEATURES, device="meta"), "grad")
    @example("classifier", torch.ones(1, FEATURES), "no_grad")
    def run(name: str, x: Any, mode: str) -> None:
        model = models[name]

        def forward() -> Any:
            if mode == "no_grad":
                with torch.no_grad():
                    return model(x)
            if mode == "inference_mode":
                with torch.inference_mode():
                    return model(x)
            return model(x)

        _compare("nn.Module forward", forward, (name, mode, x), _identity)

    run()
    _report(
        ["nn.Module forward"],
        "traced torch models (watched, eval(), on the meta device)",
        errors_before,
    )


# --- ONNX Runtime --------------------------------------------------------------------


def _onnx_models() -> dict[str, bytes]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b")
    classifier = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
            helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES]),
        ],
        initializer=[weights, bias],
    )
    identity = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])],
    )
    out = {}
    for graph in (classifier, identity):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        out[graph.name] = model.SerializeToString()
    return out


@pytest.fixture(scope="module")
def sessions(
    handle: otel_dl.Instrumentation, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    import onnxruntime as ort

    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for name, blob in _onnx_models().items():
        path = root / f"{name}.onnx"
        path.write_bytes(blob)
        out[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out["classifier from bytes"] = ort.InferenceSession(
        _onnx_models()["classifier"], providers=["CPUExecutionProvider"]
    )
    otel_dl.watch(out["classifier"], name="classifier", reference=REFERENCE)
    return out


@st.composite
def onnx_feeds(draw: Any) -> tuple[Any, Any]:
    x = draw(
        st.one_of(
            features(),
            features(),
            numeric_arrays(dtype="float32", shape=st.sampled_from([(3, 2), (FEATURES,), ()])),
            numeric_arrays(),
            other_arrays(),
            tensors(),
            ragged,
            scalars,
        )
    )
    feed = draw(
        st.sampled_from(
            [
                {"x": x},
                {"x": x},
                {"x": x},
                {"x": x, "extra": x},
                {"X": x},
                {},
                [x],
                None,
            ]
        )
    )
    outputs = draw(
        st.sampled_from(
            [None, None, None, ["probs"], ["label"], ["label", "probs"], ["y"], ["nope"], []]
        )
    )
    return outputs, feed


def test_onnx_session_run_on_odd_feeds_unchanged(sessions: dict[str, Any]) -> None:
    errors_before = otel_dl.internal_error_counts()

    @_settings(80, 2_000)
    @given(st.sampled_from(sorted(sessions)), onnx_feeds())
    def run(name: str, case: tuple[Any, Any]) -> None:
        session = sessions[name]
        output_names, feed = case
        _compare(
            "InferenceSession.run", lambda: session.run(output_names, feed), (name, case), _identity
        )

    run()
    _report(
        ["InferenceSession.run"],
        "ONNX Runtime sessions (from a file, watched, and from bytes)",
        errors_before,
    )


# --- scikit-learn --------------------------------------------------------------------


@pytest.fixture(scope="module")
def estimators(handle: otel_dl.Instrumentation) -> dict[str, Any]:
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = make_classification(
        n_samples=120,
        n_features=FEATURES,
        n_informative=3,
        n_redundant=0,
        n_classes=CLASSES,
        random_state=0,
    )
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(FEATURES)])
    return {
        "LogisticRegression": LogisticRegression(max_iter=300).fit(X, y),
        "Pipeline": Pipeline(
            [("scale", StandardScaler()), ("model", LogisticRegression(max_iter=300))]
        ).fit(X, y),
        "RandomForest (n_jobs=2)": RandomForestClassifier(
            n_estimators=4, n_jobs=2, random_state=0
        ).fit(X, y),
        "StandardScaler (named columns)": StandardScaler().fit(frame),
        "watched LogisticRegression": otel_dl.watch(
            LogisticRegression(max_iter=300).fit(X, y),
            name="lr",
            reference=REFERENCE,
            features=[0, 2],
        ),
    }


METHODS = ("predict", "predict_proba", "decision_function", "transform")


@st.composite
def sklearn_inputs(draw: Any) -> Any:
    import scipy.sparse

    rows = draw(st.sampled_from([0, 1, 3]))
    kind = draw(
        st.sampled_from(["features", "features", "array", "frame", "sparse", "list", "any"])
    )
    if kind == "features":
        return draw(features(draw(st.sampled_from(["float64", "float32"]))))
    if kind == "array":
        dtype = draw(st.sampled_from(["float64", "float32", "float16", "int64", "bool", "object"]))
        if dtype == "object":
            return draw(other_arrays())
        return draw(
            numeric_arrays(
                dtype=dtype, shape=st.sampled_from([(rows, FEATURES), (rows, 2), (FEATURES,), ()])
            )
        )
    if kind == "frame":
        array = draw(numeric_arrays(dtype="float64", shape=st.just((rows, FEATURES)), finite=True))
        names = draw(
            st.sampled_from(
                [[f"f{i}" for i in range(FEATURES)], ["a", "b", "c", "d"], list(range(FEATURES))]
            )
        )
        return pd.DataFrame(array, columns=names)
    if kind == "sparse":
        array = draw(
            numeric_arrays(dtype="float64", shape=st.sampled_from([(rows, FEATURES), (rows, 3)]))
        )
        return scipy.sparse.csr_matrix(np.nan_to_num(array))
    if kind == "list":
        return draw(ragged)
    return draw(values)


def test_sklearn_predict_and_transform_on_odd_inputs_unchanged(estimators: dict[str, Any]) -> None:
    errors_before = otel_dl.internal_error_counts()
    calls = [(n, m) for n in sorted(estimators) for m in METHODS if hasattr(estimators[n], m)]

    @_settings(80, 2_000)
    @given(st.sampled_from(calls), sklearn_inputs())
    # Found here before: the watched columns are positions, the frame's are names.
    @example(("watched LogisticRegression", "predict_proba"), pd.DataFrame(np.zeros((1, 4))))
    @example(
        ("watched LogisticRegression", "predict"),
        pd.DataFrame(np.zeros((2, 4)), columns=["a", "b", "c", "d"]),
    )
    def run(chosen: tuple[str, str], X: Any) -> None:
        name, method = chosen
        call = getattr(estimators[name], method)
        _compare(f"sklearn {method}", lambda: call(X), (name, X), _identity)

    run()
    _report(
        [f"sklearn {m}" for m in METHODS],
        "fitted scikit-learn estimators and a Pipeline",
        errors_before,
    )


# --- transformers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def classify(handle: otel_dl.Instrumentation) -> Any:
    from transformers import pipeline

    model = tiny_bert_classifier(CLASSES)
    return pipeline("text-classification", model=model, tokenizer=tiny_tokenizer())


sentences = st.lists(
    st.sampled_from([*TINY_WORDS[4:], "unknown", "é", "[SEP]", ""]), max_size=40
).map(" ".join)
texts = st.one_of(sentences, st.text(max_size=30))


@st.composite
def pipeline_calls(draw: Any) -> tuple[Any, dict[str, Any]]:
    inputs = draw(
        st.one_of(
            texts,
            st.lists(texts, max_size=4),
            st.fixed_dictionaries({"text": texts, "text_pair": texts}),
            st.lists(st.fixed_dictionaries({"text": texts}), max_size=2),
            scalars,
            st.lists(st.one_of(texts, scalars), min_size=1, max_size=3),
        )
    )
    kwargs: dict[str, Any] = {}
    if draw(st.booleans()):
        kwargs["top_k"] = draw(st.sampled_from([None, 0, 1, CLASSES, 10]))
    if draw(st.booleans()):
        kwargs["function_to_apply"] = draw(st.sampled_from(["softmax", "sigmoid", "none", "bogus"]))
    if draw(st.booleans()):
        kwargs["truncation"] = True
    return inputs, kwargs


def test_transformers_pipeline_on_odd_inputs_unchanged(classify: Any) -> None:
    errors_before = otel_dl.internal_error_counts()

    @_settings(30, 600)
    @given(pipeline_calls())
    def run(case: tuple[Any, dict[str, Any]]) -> None:
        inputs, kwargs = case
        _compare("transformers pipeline", lambda: classify(inputs, **kwargs), case, _identity)

    run()
    _report(
        ["transformers pipeline"], "a text-classification pipeline built locally", errors_before
    )


# --- Feast ---------------------------------------------------------------------------

DRIVERS = 40
FEAST_FEATURES = ["driver_stats:conv_rate", "driver_stats:trips", "driver_stats:city"]


@pytest.fixture(scope="module")
def store(handle: otel_dl.Instrumentation, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real Feast repository: parquet source, local provider, SQLite online store."""

    root = tmp_path_factory.mktemp("feast_repo")
    now = pd.Timestamp.now(tz="UTC").floor("s")
    rng = np.random.default_rng(0)
    conv_rate = rng.random(DRIVERS).astype("float32")
    conv_rate[:3] = [np.nan, np.inf, 3.4e38]  # odd stored values, served back as they are
    pd.DataFrame(
        {
            "driver_id": np.arange(DRIVERS, dtype=np.int64),
            "conv_rate": conv_rate,
            "trips": rng.integers(0, 50, DRIVERS),
            "city": rng.choice(["paris", "lyon", "", "é"], DRIVERS),
            "event_timestamp": [now - pd.Timedelta(hours=2)] * DRIVERS,
            "created": [now] * DRIVERS,
        }
    ).to_parquet(root / "drivers.parquet")
    repo = feast_driver_repo(root, "adversarial")
    repo.materialize(
        (now - pd.Timedelta(days=3)).to_pydatetime(), now.to_pydatetime(), ["driver_stats"]
    )
    return repo


@st.composite
def online_reads(draw: Any) -> tuple[Any, Any]:
    ids = st.one_of(
        st.integers(-5, DRIVERS + 5),
        st.sampled_from([2**63 - 1, -(2**63), 2**64]),
        st.none(),
        floats,
        st.text(max_size=3),
        st.booleans(),
    )
    key = st.sampled_from(["driver_id", "driver_id", "driver_id", "rider_id"])
    rows = draw(
        st.one_of(
            st.lists(st.dictionaries(key, ids, min_size=0, max_size=2), max_size=4),
            st.lists(st.integers(0, DRIVERS - 1), max_size=4).map(lambda v: {"driver_id": v}),
            st.lists(ids, max_size=3).map(lambda v: {"driver_id": v}),
            st.just([]),
        )
    )
    features = draw(
        st.sampled_from(
            [
                "all",
                "all",
                "service",
                ["driver_stats:conv_rate"],
                ["driver_stats:nope"],
                ["no_view:conv_rate"],
                ["malformed"],
                [],
                ["driver_stats:conv_rate", "driver_stats:conv_rate"],
            ]
        )
    )
    return features, rows


def test_feast_online_reads_on_odd_entities_unchanged(store: Any) -> None:
    errors_before = otel_dl.internal_error_counts()
    service = store.get_feature_service("driver_service")

    @_settings(12, 150)
    @given(online_reads())
    def run(case: tuple[Any, Any]) -> None:
        features, rows = case
        chosen = (
            FEAST_FEATURES if features == "all" else service if features == "service" else features
        )
        _compare(
            "Feast get_online_features",
            lambda: store.get_online_features(chosen, copy.deepcopy(rows)),
            case,
            lambda response: response.to_dict(),
        )

    run()
    _report(
        ["Feast get_online_features"],
        "Feast online reads on a real SQLite repository",
        errors_before,
    )


# --- Dataset readers -------------------------------------------------------------------


def _write_source(frame: pd.DataFrame, root: Path, kind: str, index: int) -> Path:
    """A file for the readers: the frame as parquet or CSV, or a broken or missing file."""
    path = root / f"source-{index}.{'csv' if kind == 'csv' else 'parquet'}"
    if kind == "parquet":
        try:
            frame.to_parquet(path)
        except Exception:  # a frame parquet cannot hold: a file that is not parquet
            path.write_bytes(b"PAR1 not really")
    elif kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": nothing written


def _datasets_view(result: Any) -> Any:
    if hasattr(result, "to_pandas"):
        return result.to_pandas()
    return {name: split.to_pandas() for name, split in result.items()}


def _readers(path: Path, cache: Path) -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]]:
    import datasets
    import pyarrow.parquet as pq

    builder = "csv" if path.suffix == ".csv" else "parquet"
    return {
        "pandas read_parquet": (lambda: pd.read_parquet(path), _identity),
        "pandas read_csv": (lambda: pd.read_csv(path), _identity),
        "pandas read_csv (chunks)": (
            lambda: pd.read_csv(path, chunksize=2),
            lambda reader: list(reader),
        ),
        "pyarrow read_table": (lambda: pq.read_table(path), _identity),
        "datasets load_dataset": (
            lambda: datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=str(cache)
            ),
            _datasets_view,
        ),
    }


def test_dataset_readers_on_odd_files_unchanged(tmp_path: Path) -> None:
    errors_before = otel_dl.internal_error_counts()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # it logs every unreadable file it is given
    counter = iter(range(10**9))
    cache = tmp_path / "hf-cache"
    otel_dl.watch(str(tmp_path / "source-*.parquet"), reference=REFERENCE, source="adversarial")

    @_settings(40, 1_000)
    @given(
        frames(),
        st.sampled_from(
            ["parquet", "parquet", "csv", "csv", "empty", "garbage", "directory", "missing"]
        ),
        st.sampled_from(
            [
                "pandas read_parquet",
                "pandas read_csv",
                "pandas read_csv (chunks)",
                "pyarrow read_table",
            ]
        ),
    )
    def run(frame: pd.DataFrame, kind: str, reader: str) -> None:
        index = next(counter)
        if index % 4 and kind in ("parquet", "csv"):  # mostly the reader the file was made for
            reader = {
                ("parquet", "pandas read_csv"): "pandas read_parquet",
                ("parquet", "pandas read_csv (chunks)"): "pyarrow read_table",
                ("csv", "pandas read_parquet"): "pandas read_csv",
                ("csv", "pyarrow read_table"): "pandas read_csv (chunks)",
            }.get((kind, reader), reader)
        path = _write_source(frame, tmp_path, kind, index)
        readers = _readers(path, cache)
        chosen = [reader]
        if index % 6 == 0:  # load_dataset builds a cache per file: one example in six
            chosen.append("datasets load_dataset")
        for name in chosen:
            call, view = readers[name]
            _compare(name, call, (name, kind, frame), view)

    run()
    names = [n for n in TALLIES if n.startswith(("pandas", "pyarrow", "datasets"))]
    _report(names, "the pandas, pyarrow and datasets readers on local files", errors_before)


# --- Signal functions ---------------------------------------------------------------

NO_TABLE = (ValueError, TypeError)  # table.to_table: "no tabular reading at all"


def _finite_numbers(result: Any) -> bool:
    """Every float in a mapping result is finite: nothing made up, nothing NaN."""
    if isinstance(result, dict):
        return all(not isinstance(v, float) or math.isfinite(v) for v in result.values())
    if isinstance(result, float):
        return math.isfinite(result)
    return True


def _expect(
    name: str,
    call: Callable[[], Any],
    shown: Any,
    allowed: tuple[type[BaseException], ...] = (),
    check: Callable[[Any], bool] | None = None,
) -> Outcome:
    """``call`` may raise only ``allowed`` (its documented errors), its result must pass
    ``check``, and it must leave its inputs (``shown``) as they were."""
    tally = _tally(name)
    before = _snapshot(shown)
    outcome = _run(call)
    tally.inputs += 1
    if outcome.error is None:
        tally.returned += 1
        if check is not None and not check(outcome.value):
            tally.problem(f"{name} {_short(shown)}: returned {_short(outcome.value)}")
    else:
        tally.raised += 1
        if not isinstance(outcome.error, allowed):
            tally.problem(f"{name} {_short(shown)}: undocumented {outcome.describe()}")
    if not _unchanged(before, shown):
        tally.problem(f"{name} {_short(shown)}: changed its input")
    return outcome


def _share(value: Any) -> bool:
    return value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)


data = st.one_of(
    values,
    values,
    numeric_arrays(dtype="float64", shape=st.sampled_from([(0, FEATURES), (5, FEATURES), (7, 2)])),
)


def test_reference_functions(tmp_path: Path) -> None:
    @_settings(60, 1_200)
    @given(
        data,
        data,
        st.integers(-1, 12),
        st.binary(max_size=64),
        st.sampled_from(["drop", "type", "bins", "version", "features", "edges"]),
    )
    def run(fit_on: Any, read: Any, bins: int, junk: bytes, damage: str) -> None:
        _expect("table.to_table", lambda: to_table(fit_on), fit_on, NO_TABLE)
        fitted = _expect(
            "Reference.fit",
            lambda: reference.Reference.fit(fit_on, bins=bins),
            (fit_on, bins),
            NO_TABLE,
        )
        ref = fitted.value if fitted.error is None else REFERENCE
        read_table = _expect("Reference.read", lambda: ref.read(read), read, NO_TABLE).value
        if isinstance(read_table, Table):
            names = read_table.names
            _expect("Reference.column_index", lambda: ref.column_index(names), names)
            for name, values in read_table.categorical.items():
                if name in ref.categorical:
                    _expect(
                        "Reference.category_codes",
                        lambda n=name, v=values: ref.category_codes(n, v),
                        values,
                    )
        for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
            _expect("Reference.edges_for", lambda d=dtype: ref.edges_for(d), dtype)
            _expect("Reference.range_for", lambda d=dtype: ref.range_for(d), dtype)
        path = tmp_path / "reference.json"

        def round_trip() -> bool:
            ref.save(path)
            return reference.Reference.load(path).to_dict() == ref.to_dict()

        _expect("Reference.save/load", round_trip, fit_on, (), check=bool)
        document = ref.to_dict()
        if damage == "drop":
            document.pop("schema")
        elif damage == "type":
            document["features"] = "not a list"
        elif damage == "bins":
            document["bins"] = -3
        elif damage == "version":
            document["version"] = 99
        elif damage == "features" and document["features"]:
            document["features"][0]["kind"] = "mystery"
        elif document["features"]:
            document["features"][0].setdefault("edges", []).extend([5.0, 1.0])
        _expect(
            "Reference.from_dict",
            lambda: reference.Reference.from_dict(document),
            damage,
            (ValueError, KeyError, TypeError),
        )
        path.write_bytes(junk)
        _expect(
            "Reference.load",
            lambda: reference.Reference.load(path),
            junk,
            (reference.ReferenceFileError,),
        )
        table = _run(lambda: to_table(read)).value
        if isinstance(table, Table):
            values64 = table.numeric.astype(np.float64)
            edges = np.sort(np.nan_to_num(values64[: max(bins, 0)], nan=np.inf), axis=0)
            _expect(
                "stats.bin_counts",
                lambda: stats.bin_counts(values64, edges),
                read,
                (ValueError,),
            )
            _expect(
                "stats.count_at_least",
                lambda: stats.count_at_least(values64, edges),
                read,
                (ValueError,),
            )
            _expect("stats.ceil_to_float32", lambda: stats.ceil_to_float32(values64), read)

    run()
    _report(
        [n for n in TALLIES if n.startswith(("table.", "stats.", "reference.", "Reference."))],
        "otel_dl.table, otel_dl.stats and otel_dl.reference",
    )


def test_drift_functions() -> None:
    @_settings(60, 1_200)
    @given(
        data,
        data,
        st.sampled_from(drift.METHODS),
        st.integers(1, 12),
        st.integers(1, 50),
        floats,
        features("float64"),
    )
    def run(
        ref_data: Any,
        current: Any,
        method: str,
        bins: int,
        window: int,
        value: float,
        batch: np.ndarray,
    ) -> None:
        scores = _expect(
            "drift.score",
            lambda: drift.score(ref_data, current, method=method, bins=bins),
            (ref_data, current, method),
            NO_TABLE,
            check=lambda s: all(math.isfinite(v) and v >= 0 for v in s.values()),
        )
        _expect(
            "drift.score (Reference)",
            lambda: drift.score(REFERENCE, current, method=method),
            current,
            NO_TABLE,
        )
        if scores.error is None:
            _expect("drift.worst", lambda: drift.worst(scores.value), scores.value)

        def stream() -> list[Any]:
            tracker = drift.DriftTracker(REFERENCE, method=method, window_rows=window)
            return [tracker.update(batch) for batch in (current, ref_data, current)]

        _expect(
            "drift.DriftTracker.update",
            stream,
            (current, method, window),
            NO_TABLE,
            check=lambda results: all(r.score is None or math.isfinite(r.score) for r in results),
        )

        def buffer_reused() -> bool:
            """The caller refills its buffer after update(): the window must not see it."""
            given_view, given_copy = (drift.DriftTracker(REFERENCE, method, window) for _ in "ab")
            buffer = batch.copy()
            given_view.update(buffer)
            given_copy.update(buffer.copy())
            buffer.fill(1e6)
            return given_view.update(REFERENCE_SAMPLE) == given_copy.update(REFERENCE_SAMPLE)

        _expect("drift.DriftTracker (buffer reused)", buffer_reused, batch, check=bool)
        _expect(
            "drift.drift_status",
            lambda: drift.drift_status(value, method),
            value,
            check=lambda s: s in ("ok", "warn", "alert"),
        )
        table = _run(lambda: to_table(current)).value
        if isinstance(table, Table) and table.numeric.shape[1]:
            numeric = table.numeric
            shares = np.abs(np.nan_to_num(numeric.astype(np.float64)))
            for name, function in (
                ("drift.psi_from_shares", drift.psi_from_shares),
                ("drift.js_from_shares", drift.js_from_shares),
                ("drift.ks_statistics", drift.ks_statistics),
                ("drift.wasserstein_distances", drift.wasserstein_distances),
            ):
                source = shares if "shares" in name else numeric
                _expect(name, lambda f=function, s=source: f(s, s[::-1]), current, (ValueError,))

    run()
    _report([n for n in TALLIES if n.startswith("drift.")], "otel_dl.drift")


def _confidence_calls(outputs: Any, kind: str, threshold: float, labels: list[Any]) -> None:
    _expect(
        "confidence.summarize",
        lambda: confidence.summarize(outputs, threshold=threshold, kind=kind),
        (outputs, kind),
        check=_finite_numbers,
    )
    _expect("confidence.to_scores", lambda: confidence.to_scores(outputs), outputs, NO_TABLE)
    _expect(
        "confidence.to_probabilities",
        lambda: confidence.to_probabilities(outputs, kind=kind),
        outputs,
        NO_TABLE,
    )
    _expect(
        "calibration.expected_calibration_error",
        lambda: calibration.expected_calibration_error(outputs, labels),
        (outputs, labels),
        NO_TABLE,
        check=lambda v: v is None or (math.isfinite(v) and 0 <= v <= 1),
    )

    def track() -> Any:
        tracker = calibration.CalibrationTracker(max_pending=4)
        count = len(confidence.to_scores(outputs))
        tracker.record(list(range(count)), outputs)
        for i, label in enumerate(labels):
            tracker.feedback(i, label)
        return tracker.ece()

    _expect(
        "calibration.CalibrationTracker",
        track,
        (outputs, labels),
        NO_TABLE,
        check=lambda v: v is None or (math.isfinite(v) and 0 <= v <= 1),
    )


def test_confidence_and_calibration_functions() -> None:
    @_settings(60, 1_200)
    @given(
        values,
        probabilities(),
        st.sampled_from(confidence.KINDS),
        floats,
        st.lists(st.one_of(st.integers(-2, 5), st.none(), st.text(max_size=2)), max_size=6),
    )
    def run(odd: Any, classified: Any, kind: str, threshold: float, labels: list[Any]) -> None:
        for outputs in (odd, classified):
            _confidence_calls(outputs, kind, threshold, labels)

    run()
    _report(
        [n for n in TALLIES if n.startswith(("confidence.", "calibration."))],
        "otel_dl.confidence and otel_dl.calibration",
    )


def test_quality_provenance_and_monitor_functions(tmp_path: Path) -> None:
    configs = [
        resolve_config({}),
        resolve_config({"drift_method": "ks", "drift_min_rows": 1, "baseline_rows": 3}),
        resolve_config(
            {"drift_method": "js", "drift_max_rows": 2, "drift_max_features": 1, "drift_every": 2}
        ),
    ]

    @_settings(60, 1_200)
    @given(
        values,
        values,
        st.sampled_from(range(len(configs))),
        floats,
        st.one_of(values, st.sampled_from(ODD_MODELS), st.binary(max_size=8)),
        probabilities(),
    )
    def run(
        batch: Any, other: Any, config: int, threshold: float, model: Any, classified: Any
    ) -> None:
        _expect(
            "quality.nan_fraction",
            lambda: quality.nan_fraction(batch),
            batch,
            NO_TABLE,
            check=_share,
        )
        _expect(
            "quality.out_of_range_fraction",
            lambda: quality.out_of_range_fraction(REFERENCE, batch),
            batch,
            NO_TABLE,
            check=_share,
        )
        _expect(
            "quality.schema_fingerprint", lambda: quality.schema_fingerprint(batch), batch, NO_TABLE
        )
        _expect(
            "quality.schema_mismatch",
            lambda: quality.schema_mismatch(REFERENCE, batch),
            batch,
            NO_TABLE,
        )
        _expect("provenance.data_fingerprint", lambda: provenance.data_fingerprint(batch), batch)
        _expect("provenance.model_fingerprint", lambda: provenance.model_fingerprint(model), model)
        path = tmp_path / "model.bin"
        if isinstance(model, bytes):
            path.write_bytes(model)
        _expect(
            "provenance.file_fingerprint",
            lambda: provenance.file_fingerprint(
                path if isinstance(model, bytes) else tmp_path / "missing"
            ),
            model,
        )
        _expect(
            "provenance.code_version",
            lambda: provenance.code_version(other if isinstance(other, str) else None),
            other,
        )
        _expect("monitor.to_features", lambda: monitor.to_features(batch), batch, NO_TABLE)

        def observe() -> list[dict[str, Any]]:
            watched = monitor.FeatureMonitor(
                REFERENCE if config == 0 else None, config=configs[config]
            )
            return [watched.observe(b) for b in (batch, other, batch, batch)]

        _expect(
            "monitor.FeatureMonitor.observe",
            observe,
            (batch, other),
            check=lambda rs: all(_finite_numbers(r) for r in rs),
        )
        for outputs in (batch, classified):
            _expect(
                "monitor.confidence_attributes",
                lambda o=outputs: monitor.confidence_attributes(o, threshold=threshold),
                outputs,
                check=_finite_numbers,
            )

    run()
    _report(
        [n for n in TALLIES if n.startswith(("quality.", "provenance.", "monitor."))],
        "otel_dl.quality, otel_dl.provenance and otel_dl.monitor",
    )
