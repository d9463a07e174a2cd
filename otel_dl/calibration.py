"""Calibration: does a model's confidence match how often it is right?

Labels usually arrive after the prediction (a click, a chargeback, a human review), so
:class:`CalibrationTracker` keeps each prediction's confidence and predicted class under
its id until its label comes, then folds the pair into 15 equal-width confidence bins::

    tracker = CalibrationTracker()
    tracker.record(["req-1", "req-2"], probabilities)   # at inference time
    tracker.feedback("req-1", label=3)                   # whenever the label arrives
    tracker.ece()                                         # None until a label arrived

ECE = Σ_b (n_b / n) · |acc(b) - conf(b)| over bins [k/15, (k+1)/15), with confidence
exactly 1 in a bin of its own, which equals torchmetrics' multiclass calibration error
(``n_bins=15``, ``norm="l1"``). Pending predictions are bounded: past ``max_pending``
the oldest are dropped (and counted in :attr:`CalibrationTracker.dropped`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from otel_dl.confidence import to_probabilities

N_BINS = 15


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins)


def expected_calibration_error(
    probabilities: Any, labels: Any, n_bins: int = N_BINS
) -> float | None:
    """ECE of predictions (probabilities or logits, read as in ``confidence.summarize``)
    against integer labels; None when no row is a finite prediction."""
    p = to_probabilities(probabilities)
    y = np.asarray(labels).reshape(-1)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions but {len(y)} labels")
    finite = np.isfinite(p).all(axis=1)
    if not finite.any():
        return None
    p, y = p[finite], y[finite]
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    index = _bin_index(confidence, n_bins)
    size = n_bins + 1
    gap = np.bincount(index, correct, size) - np.bincount(index, confidence, size)
    return float(np.abs(gap).sum() / len(p))


class CalibrationTracker:
    """Predictions now, labels later, ECE on demand. Thread-safe; memory bounded by
    ``max_pending`` unlabelled predictions plus a fixed set of bin sums."""

    def __init__(self, n_bins: int = N_BINS, max_pending: int = 100_000) -> None:
        if n_bins < 1 or max_pending < 1:
            raise ValueError("n_bins and max_pending must be at least 1")
        self.n_bins = n_bins
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        self._count = np.zeros(n_bins + 1, dtype=np.int64)
        self._correct = np.zeros(n_bins + 1)
        self._confidence = np.zeros(n_bins + 1)
        self.dropped = 0

    def record(self, prediction_ids: Hashable | Sequence[Hashable], outputs: Any) -> None:
        """Remember predictions (one id per row of ``outputs``) until their labels arrive."""
        ids = (
            list(prediction_ids)
            if isinstance(prediction_ids, (list, tuple, np.ndarray))
            else [prediction_ids]
        )
        p = to_probabilities(outputs)
        if len(p) != len(ids):
            raise ValueError(f"{len(ids)} prediction ids but {len(p)} predictions")
        confidence = p.max(axis=1).tolist()
        predicted = p.argmax(axis=1).tolist()
        with self._lock:
            for key, conf, cls in zip(ids, confidence, predicted, strict=True):
                self._pending[key] = (conf, cls)
                self._pending.move_to_end(key)
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self.dropped += 1

    def feedback(self, prediction_id: Hashable, label: int) -> bool:
        """Fold the label into the bins; False when the id is unknown or was dropped."""
        with self._lock:
            entry = self._pending.pop(prediction_id, None)
            if entry is None:
                return False
            conf, predicted = entry
            if conf != conf:  # a NaN prediction has no bin
                return False
            index = int(_bin_index(np.array([conf]), self.n_bins)[0])
            self._count[index] += 1
            self._correct[index] += float(predicted == int(label))
            self._confidence[index] += conf
            return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def labelled(self) -> int:
        return int(self._count.sum())

    def ece(self) -> float | None:
        """ECE over every labelled prediction so far; None before the first label."""
        with self._lock:
            total = self._count.sum()
            if total == 0:
                return None
            return float(np.abs(self._correct - self._confidence).sum() / total)
