"""Confidence: how sure a model was, summarised over one call's predictions.

::

    from otel_dl import confidence
    summary = confidence.summarize(model_outputs, threshold=0.5)
    summary["mean"], summary["low_fraction"], summary["count"]

``outputs`` may be a numpy array, a torch tensor (CPU or CUDA, with or without grad), a
nested list, an ONNX Runtime ``run()`` result (a list of outputs: the last floating-point
one is used, since sklearn-onnx puts labels first and probabilities last; a ZipMap list of
``{class: probability}`` dicts is read in key order) or sklearn ``predict_proba`` output.

Rows are predictions and columns classes: 0-d is one prediction, 1-D is one prediction per
value (a single column), N-D keeps the last axis as classes and flattens the rest into rows.
With ``kind="auto"`` the values are probabilities when all lie in [0, 1] and each row sums
to 1 within 1e-3 (or there is a single column in [0, 1]); otherwise they are logits and go
through a stable softmax (a sigmoid for a single column). A single column p means the
classes [1 - p, p]. Rows holding NaN or +-Inf are left out of every statistic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from otel_dl.table import to_numpy

KINDS = ("auto", "probabilities", "logits")
ROW_SUM_TOLERANCE = 1e-3
_CLASS_MAJOR_MAX = 64
"""Up to this many classes summarize works on a classes x rows copy: a reduction along
a short row costs numpy one inner-loop call per row, one along a long row only one."""


class Summary(dict[str, float]):
    """``count`` always; ``mean``, ``min``, ``margin_mean``, ``entropy_mean`` and
    ``low_fraction`` when at least one prediction is finite, else ``reason`` says why."""

    def __init__(self, count: int, reason: str | None = None) -> None:
        super().__init__(count=count)
        self.reason = reason


def to_scores(outputs: Any) -> np.ndarray:
    """Model outputs as a 2-D float array, rows = predictions, columns = classes."""
    if isinstance(outputs, (list, tuple)) and outputs:
        first = outputs[0]
        if isinstance(first, Mapping):
            keys = sorted(first)
            if len(keys) < 2:
                return np.array([[row[k] for k in keys] for row in outputs], dtype=np.float64)
            # One C-level read per row (itemgetter) into one flat array: about half the
            # cost of a Python loop over 256 rows of 10 classes (ONNX ZipMap outputs).
            values = chain.from_iterable(map(itemgetter(*keys), outputs))
            flat = np.fromiter(values, dtype=np.float64, count=len(outputs) * len(keys))
            return flat.reshape(len(outputs), len(keys))
        if _is_array(first) and not _same_shape_rows(outputs):
            return _rows(_last_float_output(outputs))
    return _rows(to_numpy(outputs))


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def _same_shape_rows(outputs: Sequence[Any]) -> bool:
    """A list of equal 1-D arrays is rows of one output, not several outputs."""
    shapes = {tuple(getattr(o, "shape", ())) for o in outputs}
    return len(shapes) == 1 and len(next(iter(shapes))) <= 1 and len(outputs) > 1


def _last_float_output(outputs: Sequence[Any]) -> np.ndarray:
    arrays = [to_numpy(o) for o in outputs]
    floats = [a for a in arrays if a.dtype.kind == "f"]
    return floats[-1] if floats else arrays[-1]


def _rows(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "fiub":
        array = array.astype(np.float64)
    elif array.dtype.kind != "f" or array.dtype.itemsize < 4:
        array = array.astype(np.float32 if array.dtype.itemsize <= 2 else np.float64)
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array.reshape(-1, array.shape[-1])


def looks_like_probabilities(scores: np.ndarray) -> bool:
    """Whether 2-D ``scores`` read as probabilities: every value in [0, 1] and each row
    summing to 1 within :data:`ROW_SUM_TOLERANCE` (or a single column in [0, 1])."""
    # For large inputs the first row settles most logit cases without a full pass.
    parts = (scores[:1], scores) if scores.size > 4096 else (scores,)
    for part in parts:
        if not (
            np.minimum.reduce(part, axis=None) >= 0 and np.maximum.reduce(part, axis=None) <= 1
        ):
            return False
        if scores.shape[1] > 1 and not (
            np.abs(np.add.reduce(part, axis=1) - 1).max() <= ROW_SUM_TOLERANCE
        ):
            return False
    return True


def _from_probabilities(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, margin, entropy) per row of class probabilities."""
    top_two = np.partition(p, p.shape[1] - 2, axis=1)
    first = top_two[:, -1]
    # 0 * ln(0 + tiny) is exactly 0, and p + tiny == p for every p above ~1e-30.
    entropy = -np.einsum("ij,ij->i", p, np.log(p + np.finfo(p.dtype).tiny))
    return first, first - top_two[:, -2], entropy


def _from_logits(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, margin, entropy) per row of logits, from one shifted exp pass.

    With d = z - max(z), e = exp(d) and S = Σe: confidence = 1/S, the runner-up's
    probability is max(e without the top)/S and entropy = ln S - Σ(e·d)/S, so the
    probability matrix itself is never built.
    """
    rows = np.arange(len(z))
    top = z.argmax(axis=1)
    d = z - z[rows, top][:, None]
    e = np.exp(d)
    total = e.sum(axis=1)
    weighted = np.einsum("ij,ij->i", e, d)
    masked = ~np.isfinite(weighted)
    if masked.any():
        # A -inf logit (a masked class) has e = 0 and contributes 0, not 0 * -inf.
        weighted[masked] = np.where(e[masked] > 0, e[masked] * d[masked], 0.0).sum(axis=1)
    e[rows, top] = -1.0
    second = e.max(axis=1)
    return 1 / total, (1 - second) / total, np.log(total) - weighted / total


def _binary(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = 1 - p
    confidence = np.maximum(p, q)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(q > 0, q * np.log(q), 0.0))
    return confidence, np.abs(p - q), entropy


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive number never overflows.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def to_probabilities(outputs: Any, kind: str = "auto") -> np.ndarray:
    """Class probabilities (rows x classes) under the same reading as :func:`summarize`;
    a single column p becomes the two columns [1 - p, p]."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    scores = to_scores(outputs)
    if scores.size == 0:
        return scores.reshape(scores.shape[0], max(scores.shape[1], 2) if scores.ndim == 2 else 2)
    if kind == "auto":
        with np.errstate(invalid="ignore"):
            kind = "probabilities" if looks_like_probabilities(scores) else "logits"
    with np.errstate(invalid="ignore", over="ignore"):
        if scores.shape[1] == 1:
            p = scores[:, 0] if kind == "probabilities" else _sigmoid(scores[:, 0])
            return np.stack([1 - p, p], axis=1)
        if kind == "probabilities":
            return scores
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def _class_major(scores: np.ndarray, threshold: float, kind: str) -> Summary | None:
    """:func:`summarize` for a few classes, from a classes x rows copy; None when some row
    is not a finite number (the row-major path then drops exactly those rows)."""
    # A copy always: for a single row, scores.T is already contiguous and would be a view
    # of the caller's outputs, which the margin below overwrites.
    t = np.array(scores.T, order="C")
    rows = t.shape[1]
    if kind == "auto":
        low, high = np.minimum.reduce(t, axis=None), np.maximum.reduce(t, axis=None)
        probabilities = bool(
            low >= 0
            and high <= 1
            and np.abs(np.add.reduce(t, axis=0) - 1).max() <= ROW_SUM_TOLERANCE
        )
        kind = "probabilities" if probabilities else "logits"
    top = scores.argmax(axis=1)
    columns = np.arange(rows)
    # conf, margin, entropy: computed in the scores' dtype as the row path does, stored in
    # float64 (exactly), so one reduction sums all three in float64.
    stats = np.empty((3, rows))
    if kind == "probabilities":
        # As in _from_probabilities: 0 * ln(0 + tiny) is exactly 0.
        np.negative(np.add.reduce(t * np.log(t + np.finfo(t.dtype).tiny), axis=0), out=stats[2])
        conf = t[top, columns]
        t[top, columns] = -np.inf  # one instance of the top: a tie leaves margin 0
        np.subtract(conf, np.maximum.reduce(t, axis=0), out=stats[1])
    else:
        # As in _from_logits, with the same shifted exp pass.
        d = t - t[top, columns]
        e = np.exp(d)
        total = np.add.reduce(e, axis=0)
        weighted = np.add.reduce(e * d, axis=0)
        e[top, columns] = -1.0
        conf = 1 / total
        np.divide(1 - np.maximum.reduce(e, axis=0), total, out=stats[1])
        np.subtract(np.log(total), weighted / total, out=stats[2])
    stats[0] = conf
    mean, margin, entropy = np.add.reduce(stats, axis=1).tolist()
    # A NaN/Inf row (or a masked -inf logit, whose 0 * -inf the row path handles) makes
    # a sum non-finite; finite sums mean every row counts.
    if not (math.isfinite(mean) and math.isfinite(margin) and math.isfinite(entropy)):
        return None
    summary = Summary(rows)
    summary["mean"] = mean / rows
    summary["min"] = float(np.minimum.reduce(conf))
    summary["margin_mean"] = margin / rows
    summary["entropy_mean"] = entropy / rows
    summary["low_fraction"] = np.count_nonzero(conf < threshold) / rows
    return summary


_SMALL_ROWS = 64
"""Up to this many rows a finite output takes :func:`_small`: numpy's cost there is per
call, not per value, so fewer calls beat the copies that make long reductions fast."""


_TINY_VALUES = 64
"""Up to this many values (one request's scores) plain Python beats any numpy call."""


def _tiny(scores: np.ndarray, threshold: float, kind: str) -> Summary | None:
    """:func:`summarize` of a handful of finite values, in plain Python; None when a value
    is not finite."""
    rows = scores.tolist()
    stats = [0.0, math.inf, 0.0, 0.0, 0]  # sum conf, min conf, sum margin, sum entropy, low
    if kind == "auto":
        flat = [v for row in rows for v in row]
        if not all(math.isfinite(v) for v in flat):
            return None
        probabilities = min(flat) >= 0 and max(flat) <= 1
        if probabilities:
            probabilities = all(abs(math.fsum(row) - 1) <= ROW_SUM_TOLERANCE for row in rows)
        kind = "probabilities" if probabilities else "logits"
    tiny = float(np.finfo(scores.dtype).tiny)
    for row in rows:
        if kind == "probabilities":
            p = row
        else:
            top = max(row)
            e = [math.exp(v - top) for v in row]
            total = math.fsum(e)
            p = [v / total for v in e]
        first, second = sorted(p)[-2:][::-1]
        stats[0] += first
        stats[1] = min(stats[1], first)
        stats[2] += first - second
        stats[3] -= math.fsum(v * math.log(v + tiny) for v in p)
        stats[4] += first < threshold
    if not all(math.isfinite(v) for v in stats[:4]):
        return None
    n = len(rows)
    summary = Summary(n)
    summary["mean"] = stats[0] / n
    summary["min"] = stats[1]
    summary["margin_mean"] = stats[2] / n
    summary["entropy_mean"] = stats[3] / n
    summary["low_fraction"] = stats[4] / n
    return summary


def _small(scores: np.ndarray, threshold: float, kind: str) -> Summary | None:
    """:func:`summarize` of a few finite rows of two or more classes in about fifteen numpy
    calls; None when a value is not finite (the general path then drops those rows)."""
    low, high = np.minimum.reduce(scores, axis=None), np.maximum.reduce(scores, axis=None)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    rows, classes = scores.shape
    if kind == "auto":
        probabilities = bool(
            low >= 0
            and high <= 1
            and np.abs(np.add.reduce(scores, axis=1) - 1).max() <= ROW_SUM_TOLERANCE
        )
        kind = "probabilities" if probabilities else "logits"
    top_two = np.partition(scores, classes - 2, axis=1)[:, -2:]
    if kind == "probabilities":
        conf = top_two[:, 1]
        margin = conf - top_two[:, 0]
        # As in _from_probabilities: 0 * ln(0 + tiny) is exactly 0.
        log = np.log(scores + np.finfo(scores.dtype).tiny)
        entropy = -np.einsum("ij,ij->i", scores, log)
    else:
        # As in _from_logits: one shifted exp pass (exp of values <= 0 cannot overflow).
        d = scores - top_two[:, 1:]
        e = np.exp(d)
        total = np.add.reduce(e, axis=1)
        conf = 1 / total
        margin = (1 - np.exp(top_two[:, 0] - top_two[:, 1])) / total
        entropy = np.log(total) - np.einsum("ij,ij->i", e, d) / total
    summary = Summary(rows)
    summary["mean"] = float(np.add.reduce(conf, dtype=np.float64) / rows)
    summary["min"] = float(np.minimum.reduce(conf))
    summary["margin_mean"] = float(np.add.reduce(margin, dtype=np.float64) / rows)
    summary["entropy_mean"] = float(np.add.reduce(entropy, dtype=np.float64) / rows)
    summary["low_fraction"] = np.count_nonzero(conf < threshold) / rows
    return summary


def summarize(outputs: Any, threshold: float = 0.5, kind: str = "auto") -> Summary:
    """Confidence statistics of one call's predictions; see the module docstring.

    Never raises on data: unreadable or empty outputs give ``count`` 0 (or the rows seen)
    and a ``reason`` instead of the other keys. Raises ``ValueError`` for an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    try:
        scores = to_scores(outputs)
    except (TypeError, ValueError) as exc:
        return Summary(0, f"outputs are not numeric predictions: {exc}")
    count = scores.shape[0]
    if count == 0 or scores.shape[1] == 0:
        return Summary(count, "no predictions")
    if count <= _SMALL_ROWS and scores.shape[1] > 1:
        fast = _tiny if scores.size <= _TINY_VALUES else _small
        small = fast(scores, threshold, kind)
        if small is not None:
            return small
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if 1 < scores.shape[1] <= _CLASS_MAJOR_MAX:
            summary = _class_major(scores, threshold, kind)
            if summary is not None:
                return summary
        if kind == "auto":
            kind = "probabilities" if looks_like_probabilities(scores) else "logits"
        if scores.shape[1] == 1:
            column = scores[:, 0]
            conf, margin, entropy = _binary(column if kind == "probabilities" else _sigmoid(column))
        elif kind == "probabilities":
            conf, margin, entropy = _from_probabilities(scores)
        else:
            conf, margin, entropy = _from_logits(scores)
        # A NaN input makes the confidence or the entropy NaN, so one check covers the row.
        valid = np.isfinite(conf + entropy)
    if not valid.all():
        conf, margin, entropy = conf[valid], margin[valid], entropy[valid]
        if not len(conf):
            return Summary(count, "no prediction is a finite number")
    n = len(conf)
    summary = Summary(count)
    summary["mean"] = float(np.add.reduce(conf, dtype=np.float64) / n)
    summary["min"] = float(np.minimum.reduce(conf))
    summary["margin_mean"] = float(np.add.reduce(margin, dtype=np.float64) / n)
    summary["entropy_mean"] = float(np.add.reduce(entropy, dtype=np.float64) / n)
    summary["low_fraction"] = float(np.count_nonzero(conf < threshold) / n)
    return summary


def summarize_each(
    scores: np.ndarray, starts: Sequence[int], threshold: float = 0.5, kind: str = "auto"
) -> list[Summary]:
    """:func:`summarize` of several calls at once: ``scores`` stacks the rows of each
    call (two or more classes), call ``i`` being rows ``starts[i]`` up to the next start.

    With ``kind="auto"`` each call is read on its own (probabilities or logits, as
    :func:`summarize` reads it); ``probabilities`` or ``logits`` reads every call so. The
    row statistics of all of them come from one vectorised pass per kind, so many small
    calls cost about what one batch of their rows does. Figures agree with
    :func:`summarize` to float rounding (the per-call paths sum in other orders).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    rows = scores.shape[0]
    bounds = np.asarray([*starts, rows], dtype=np.intp)
    counts = np.diff(bounds)
    first = bounds[:-1]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if kind != "auto":
            probability_rows = np.full(rows, kind == "probabilities")
        else:
            # A call reads as probabilities when each of its rows does (NaN: as logits).
            row_probabilities = (
                (np.minimum.reduce(scores, axis=1) >= 0)
                & (np.maximum.reduce(scores, axis=1) <= 1)
                & (np.abs(np.add.reduce(scores, axis=1) - 1) <= ROW_SUM_TOLERANCE)
            )
            call_probabilities = np.logical_and.reduceat(row_probabilities, first)
            probability_rows = np.repeat(call_probabilities, counts)
        conf = np.empty(rows, dtype=np.float64)
        margin = np.empty(rows, dtype=np.float64)
        entropy = np.empty(rows, dtype=np.float64)
        for kind_rows, compute in (
            (probability_rows, _from_probabilities),
            (~probability_rows, _from_logits),
        ):
            if kind_rows.all():
                conf[:], margin[:], entropy[:] = compute(scores)
            elif kind_rows.any():
                c, m, e = compute(scores[kind_rows])
                conf[kind_rows], margin[kind_rows], entropy[kind_rows] = c, m, e
        valid = np.isfinite(conf + entropy)
        valid_counts = np.add.reduceat(valid.astype(np.intp), first)
        conf_valid = np.where(valid, conf, 0.0)
        sums = np.add.reduceat(
            np.stack([conf_valid, np.where(valid, margin, 0.0), np.where(valid, entropy, 0.0)]),
            first,
            axis=1,
        )
        lowest = np.minimum.reduceat(np.where(valid, conf, np.inf), first)
        low = np.add.reduceat((valid & (conf < threshold)).astype(np.intp), first)
        # Per call, as Python floats in one pass each (a call with no finite prediction
        # divides by zero here and is reported below without them).
        means, margins, entropies = (sums / valid_counts).tolist()
        lows = (low / valid_counts).tolist()
    mins = lowest.tolist()
    out: list[Summary] = []
    for i, (count, n) in enumerate(zip(counts.tolist(), valid_counts.tolist(), strict=True)):
        if n == 0:
            out.append(Summary(count, "no prediction is a finite number"))
            continue
        summary = Summary(count)
        summary["mean"] = means[i]
        summary["min"] = mins[i]
        summary["margin_mean"] = margins[i]
        summary["entropy_mean"] = entropies[i]
        summary["low_fraction"] = lows[i]
        out.append(summary)
    return out
