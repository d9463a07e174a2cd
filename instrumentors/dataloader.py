"""PyTorch DataLoader instrumentation: one span per batch fetched.

``otel_dl.instrument()`` enables it when torch is installed; by hand::

    from otel_dl.instrumentors.dataloader import DataLoaderInstrumentor
    DataLoaderInstrumentor().instrument()

Every batch the loader's iterator returns becomes a ``dataloader.batch`` span
(``dl.stage=dataloader``, ``dl.component=torch.dataloader``) whose duration is the fetch
latency, nested under the span current at the ``next()`` call (for example the user's
epoch span). It carries the batch index and size, the dataset class, provenance from
``otel_dl.watch(loader, source=..., version=...)``, and the drift, quality and data
fingerprint of the batch's features:

- a tensor batch is the features;
- a tuple or list: the first tensor, unless ``watch(loader, features=[i, ...])`` names
  positions;
- a dict: the keys named by ``watch(loader, features=[...])``, by default every
  floating-point tensor.

The span is made in the main process, after the batch arrives, so it works the same with
``num_workers > 0``, ``persistent_workers``, ``pin_memory`` and every multiprocessing
start method. The end of an epoch (``StopIteration``) makes no span; an exception from
the loader (a worker error, say) is recorded on the span and re-raised unchanged.

Spans that the dataset's own code makes in a worker are flushed when the worker exits
(see ``otel_dl.instrument``). Persistent workers still running when the application
exits would be terminated by multiprocessing, their last spans with them, so at exit
their loaders' workers are shut down the way deleting the loader would.
"""

from __future__ import annotations

import atexit
import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import wrapt
from opentelemetry.instrumentation.utils import unwrap

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import instrumentation_enabled, report_internal_error
from otel_dl._span import (
    NO_HOOKS,
    DlCall,
    Hooks,
    base_attributes,
    finish_span,
    record_error,
    start_span,
)
from otel_dl._watch import WatchState, ensure_state, watch_state

from ._base import DlInstrumentor

_MODULE = "torch.utils.data.dataloader"
_STATE_ATTR = "_otel_dl_state"
_SITE = "dataloader.next"


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def select_features(batch: Any, features: Sequence[Any] | None) -> Any:
    """The part of ``batch`` whose signals are recorded, or None when there is none."""
    if _is_tensor(batch):
        return batch
    if isinstance(batch, Mapping):
        keys = (
            list(features)
            if features is not None
            else [k for k, v in batch.items() if _is_tensor(v) and v.is_floating_point()]
        )
        picked = {str(k): batch[k] for k in keys if k in batch and _is_tensor(batch[k])}
        if not picked:
            return None
        return next(iter(picked.values())) if len(picked) == 1 else picked
    if isinstance(batch, list | tuple):
        if features is not None:
            picked_items = [batch[i] for i in features if isinstance(i, int) and i < len(batch)]
            return (
                picked_items[0]
                if len(picked_items) == 1
                else dict(zip(map(str, features), picked_items, strict=False))
            )
        return next((item for item in batch if _is_tensor(item)), None)
    return None


# Iterators with worker processes, so their workers can be shut down at exit.
_worker_iterators: weakref.WeakSet[Any] = weakref.WeakSet()


def _shutdown_workers_at_exit() -> None:
    """Shut down the workers of live iterators as deleting their loaders would.

    Registered after torch is imported, so it runs before torch marks the interpreter as
    exiting and before multiprocessing terminates its daemonic children: the workers
    finish their loop and flush their spans on the way out.
    """
    for iterator in list(_worker_iterators):
        try:
            iterator._shutdown_workers()
        except Exception:
            report_internal_error("dataloader.exit")


class DataLoaderInstrumentor(DlInstrumentor):
    """Traces ``torch.utils.data.DataLoader`` iteration; see the module docstring."""

    _hooks: Hooks = NO_HOOKS
    _exit_hook_registered = False

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("torch >= 2.1",)

    def _instrument(self, **kwargs: Any) -> None:
        self._hooks = self.hooks_from(kwargs)
        wrapt.wrap_function_wrapper(_MODULE, "DataLoader.__iter__", self._wrap_iter)
        wrapt.wrap_function_wrapper(_MODULE, "_BaseDataLoaderIter.__next__", self._wrap_next)
        if not DataLoaderInstrumentor._exit_hook_registered:
            DataLoaderInstrumentor._exit_hook_registered = True
            atexit.register(_shutdown_workers_at_exit)

    def _uninstrument(self, **kwargs: Any) -> None:
        import torch.utils.data.dataloader as dataloader

        unwrap(dataloader.DataLoader, "__iter__")
        unwrap(dataloader._BaseDataLoaderIter, "__next__")

    def _wrap_iter(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        iterator = wrapped(*args, **kwargs)
        try:
            setattr(iterator, _STATE_ATTR, ensure_state(instance))
            if getattr(iterator, "_workers", None):
                _worker_iterators.add(iterator)
        except Exception:
            report_internal_error("dataloader.iter")
        return iterator

    def _wrap_next(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if not instrumentation_enabled():
            return wrapped(*args, **kwargs)
        start_ns = time.time_ns()
        try:
            batch = wrapped(*args, **kwargs)
        except StopIteration:
            raise
        except BaseException as exc:
            end_ns = time.time_ns()
            try:
                span = start_span(
                    semconv.SPAN_DATALOADER_BATCH, self._attributes(instance), start_time=start_ns
                )
                record_error(span, exc)
                finish_span(span, {}, start_ns, end_ns)
            except Exception:
                report_internal_error(_SITE)
            raise
        end_ns = time.time_ns()
        try:
            self._record(instance, args, kwargs, batch, start_ns, end_ns)
        except Exception:
            report_internal_error(_SITE)
        return batch

    def _state(self, iterator: Any) -> WatchState:
        state = getattr(iterator, _STATE_ATTR, None)
        if state is None:
            # An iterator made without DataLoader.__iter__: key the baseline on the dataset.
            dataset = getattr(iterator, "_dataset", None)
            state = watch_state(dataset) if dataset is not None else None
            state = state or ensure_state(dataset if dataset is not None else iterator)
        return state

    def _attributes(self, iterator: Any) -> dict[str, Any]:
        state = self._state(iterator)
        attrs = base_attributes(
            semconv.STAGE_DATALOADER, semconv.COMPONENT_TORCH_DATALOADER, state.provenance()
        )
        if state.version is not None:
            attrs[semconv.DL_DATA_VERSION] = state.version
        dataset = getattr(iterator, "_dataset", None)
        if dataset is not None:
            cls = type(dataset)
            attrs[semconv.DL_DATASET_CLASS] = f"{cls.__module__}.{cls.__qualname__}"
        attrs[semconv.DL_BATCH_INDEX] = max(int(getattr(iterator, "_num_yielded", 1)) - 1, 0)
        return attrs

    def _record(
        self, iterator: Any, args: Any, kwargs: Any, batch: Any, start_ns: int, end_ns: int
    ) -> None:
        state = self._state(iterator)
        attrs = self._attributes(iterator)
        signals: dict[str, Any] = {}
        feature_count = None
        try:
            features = select_features(batch, state.features)
            first = next(iter(features.values()), None) if isinstance(features, dict) else features
            if first is not None and _is_tensor(first) and first.dim() > 0:
                signals[semconv.DL_BATCH_SIZE] = int(first.shape[0])
            if features is not None and get_config().signals:
                monitor = state.monitor()
                signals.update(monitor.observe(features))
                feature_count = monitor.feature_count
        except Exception:
            # The span still goes out, without the signals that failed.
            report_internal_error(f"{_SITE}.signals")
        span = start_span(semconv.SPAN_DATALOADER_BATCH, attrs, start_time=start_ns)
        call = DlCall(semconv.COMPONENT_TORCH_DATALOADER, iterator, tuple(args), kwargs)
        if self._hooks.request is not None:
            try:
                self._hooks.request(span, call)
            except Exception:
                report_internal_error(f"{_SITE}.request_hook")
        if self._hooks.response is not None:
            try:
                self._hooks.response(span, call, batch)
            except Exception:
                report_internal_error(f"{_SITE}.response_hook")
        finish_span(span, signals, start_ns, end_ns, feature_count)
