"""GPU calls: a span ends when the GPU has finished the call, and nothing blocks the caller.

A model call on a CUDA device returns as soon as its kernels are queued. Synchronising
there to time it would serialise the host with the GPU and remove the overlap of data
loading and compute that GPU pipelines rely on. Instead :func:`finish_when_done`:

- queues the signal reductions on the device, behind the model's own kernels: the
  confidence statistics of a 2-D output of class scores (five numbers), and for a CUDA
  input the count of NaN/Inf values and an evenly spaced row sample for drift;
- copies those few values to pinned host memory without blocking;
- records a CUDA event after them, and hands the span to a poller thread.

The poller checks the events (``Event.query()``, which never blocks) about every
millisecond; when one has completed it reads the copied values, sets the attributes and
ends the span at that moment. So a span's end is when the GPU finished the call, to
within the polling interval, and the caller never waits for it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from otel_dl import semconv
from otel_dl._guard import report_internal_error
from otel_dl._span import Attributes, DlSpan

POLL_INTERVAL_S = 0.001
# What a GPU input's row sample tells: drift, range and schema (the sample's own NaN
# share, size and fingerprint would describe the sample, not the batch).
_FROM_SAMPLE = frozenset(
    {
        semconv.DL_DRIFT_SCORE,
        semconv.DL_DRIFT_METHOD,
        semconv.DL_DRIFT_FEATURE,
        semconv.DL_DRIFT_STATUS,
        semconv.DL_DRIFT_WINDOW_ROWS,
        semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION,
        semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION,
        semconv.DL_QUALITY_SCHEMA_MISMATCH,
        semconv.DL_DATA_SCHEMA_FINGERPRINT,
    }
)
_STAT_KEYS = (
    semconv.DL_CONFIDENCE_MEAN,
    semconv.DL_CONFIDENCE_MIN,
    semconv.DL_CONFIDENCE_MARGIN_MEAN,
    semconv.DL_CONFIDENCE_ENTROPY_MEAN,
    semconv.DL_CONFIDENCE_LOW_FRACTION,
)


def confidence_stats(scores: Any, threshold: float) -> Any:
    """Device-side (mean, min, margin mean, entropy mean, low fraction) of 2-D class scores,
    read as probabilities when every value lies in [0, 1] and rows sum to 1, else logits
    (the same reading as :func:`otel_dl.confidence.summarize`). One tensor of 5 values,
    on the scores' device; nothing is copied to the host."""
    import torch

    x = scores.detach().float()
    is_probability = (x.amin() >= 0) & (x.amax() <= 1) & ((x.sum(dim=1) - 1).abs().amax() <= 1e-3)
    p = torch.where(is_probability, x, torch.softmax(x, dim=1))
    top = p.topk(2, dim=1).values
    confidence = top[:, 0]
    entropy = -(p * torch.log(p + torch.finfo(p.dtype).tiny)).sum(dim=1)
    return torch.stack(
        [
            confidence.mean(),
            confidence.amin(),
            (confidence - top[:, 1]).mean(),
            entropy.mean(),
            (confidence < threshold).float().mean(),
        ]
    )


@dataclass
class _Pending:
    call: DlSpan
    ready: Callable[[], bool]
    finish: Callable[[], Attributes]


class _Poller:
    """One daemon thread that ends the spans whose GPU work has completed."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pending: deque[_Pending] = deque()
        self._thread: threading.Thread | None = None

    def add(self, item: _Pending) -> None:
        with self._lock:
            self._pending.append(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="otel-dl-gpu-spans", daemon=True
                )
                self._thread.start()
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._lock.wait()
                items = list(self._pending)
            done = [item for item in items if _ready(item)]
            for item in done:
                _complete(item)
            with self._lock:
                for item in done:
                    self._pending.remove(item)
            if len(done) < len(items):
                time.sleep(POLL_INTERVAL_S)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def drain(self, deadline: float) -> bool:
        """Wait until no span is pending or ``time.monotonic()`` passes ``deadline``."""
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True


def _ready(item: _Pending) -> bool:
    try:
        return bool(item.ready())
    except Exception:
        report_internal_error(f"{item.call.site}.gpu")
        return True  # a broken event never completes: end the span now


def _complete(item: _Pending) -> None:
    end_ns = time.time_ns()
    item.call.extract("gpu_signals", item.finish)
    item.call.finish(end_ns)


_poller = _Poller()


def finish_later(call: DlSpan, ready: Callable[[], bool], finish: Callable[[], Attributes]) -> None:
    """End ``call`` once ``ready()`` is true, with the attributes ``finish()`` returns."""
    _poller.add(_Pending(call, ready, finish))


def pending_spans() -> int:
    """Spans waiting for their GPU work."""
    return _poller.pending()


def drain(deadline: float) -> bool:
    """Wait (until ``time.monotonic()`` reaches ``deadline`` at most) for the pending GPU
    spans to end; ``Instrumentation.force_flush`` does, so they are exported."""
    return _poller.drain(deadline)


def finish_when_done(
    call: DlSpan,
    output: Any,
    threshold: float | None,
    inputs: Any = None,
    observe: Callable[[Any], Mapping[str, Any]] | None = None,
    sample_rows: int = 64,
) -> None:
    """Queue the device-side signals of a CUDA call and end ``call`` when they are done.

    See the module docstring. ``inputs`` is the CUDA input tensor whose NaN/Inf share and
    row sample are read (None for none); ``observe`` profiles the row sample on the host
    (the source's monitor), for drift, range and schema. The output's confidence covers
    every prediction: on the device that costs the same kernel launches as a sample. A
    ``threshold`` of None: the output is no class scores, and only its rows are counted.
    """
    import torch

    with torch.no_grad():
        parts: dict[str, Any] = {}
        if (
            threshold is not None
            and output.dim() == 2
            and output.is_floating_point()
            and output.shape[1] > 1
        ):
            parts["stats"] = confidence_stats(output, threshold)
        if inputs is not None and inputs.is_floating_point() and inputs.dim() >= 1:
            rows = inputs.shape[0]
            sampled = min(rows, sample_rows)
            index = (torch.arange(sampled, device=inputs.device) * rows) // max(sampled, 1)
            parts["nonfinite"] = (~torch.isfinite(inputs)).sum()
            parts["sample"] = inputs.detach()[index].float()
        pinned = {
            key: torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            for key, value in parts.items()
        }
        for key, value in parts.items():
            pinned[key].copy_(value, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    rows_out = int(output.shape[0]) if output.dim() >= 1 else 1
    numel = int(inputs.numel()) if inputs is not None else 0
    inputs_rows = int(inputs.shape[0]) if inputs is not None and inputs.dim() >= 1 else 0

    def finish() -> Attributes:
        attrs: Attributes = {semconv.DL_PREDICTION_COUNT: rows_out}
        if "stats" in pinned:
            values = pinned["stats"].tolist()
            attrs[semconv.DL_CONFIDENCE_ROWS] = rows_out
            attrs.update(zip(_STAT_KEYS, map(float, values), strict=True))
        if "sample" in pinned and observe is not None:
            sampled = observe(pinned["sample"].numpy())
            attrs.update({k: v for k, v in sampled.items() if k in _FROM_SAMPLE})
            attrs[semconv.DL_BATCH_SIZE] = int(inputs_rows)
        if "nonfinite" in pinned and numel:
            attrs[semconv.DL_QUALITY_NAN_FRACTION] = float(pinned["nonfinite"].item() / numel)
        return attrs

    finish_later(call, event.query, finish)
    return None
