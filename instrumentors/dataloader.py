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
- a dict, or a dataclass (its fields): the keys named by
  ``watch(loader, features=[...])``, by default every floating-point tensor of one row
  per sample (the leading size most of them share): a scalar or a per-batch tensor
  beside them (a temperature, class weights) is left out. A batch of token ids, masks
  and labels only has no features, and its batch size is the leading size most of its
  tensors share;
- samples a ``collate_fn`` of the user's left uncollated, as a list
  (``collate_fn=lambda b: b``) or transposed (``lambda b: tuple(zip(*b))``, the
  detection models' way): only the batch size, their number; reading one sample as the
  batch would profile its channels or tokens as rows. See :func:`_uncollated`.

The span is made in the main process, after the batch arrives, so it works the same with
``num_workers > 0``, ``persistent_workers``, ``pin_memory`` and every multiprocessing
start method. Once the source has a reference, a batch of one tensor (2-D float of at
most 65,536 feature values, or any numeric one of at most 1 MiB) is parked: ``next()``
keeps a copy of the features, the context current at the call and the call's times, and
the span is made with its signals in a burst of the loader's batches
(``otel_dl._burst``), at most ``signals_delay_ms`` later, with the same attributes,
parent and times; a model called with that batch shares its profile. Flush through the
handle ``otel_dl.instrument()`` returns before reading spans. The end of an epoch
(``StopIteration``) makes no span; an exception from the loader (a worker error, say) is
recorded on a span made at once and re-raised unchanged.

Spans that the dataset's own code makes in a worker are flushed when the worker exits
(see ``otel_dl.instrument``). Persistent workers still running when the application
exits would be terminated by multiprocessing, their last spans with them, so at exit
their loaders' workers are shut down the way deleting the loader would.
"""

from __future__ import annotations

import atexit
import dataclasses
import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._guard import instrumentation_enabled, report_internal_error
from otel_dl._span import DlCall, DlSpan, base_attributes
from otel_dl._watch import WatchState, ensure_state, watch_state
from otel_dl.monitor import combine, observe_once, share

from ._base import DlInstrumentor, Patches

_MODULE = "torch.utils.data.dataloader"
_STATE_ATTR = "_otel_dl_state"
# Whether the iterator's full batches were samples left uncollated (see _uncollated).
_UNCOLLATED_ATTR = "_otel_dl_uncollated"
_SITE = "dataloader.next"


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def select_features(batch: Any, features: Sequence[Any] | None) -> Any:
    """The part of ``batch`` whose signals are recorded, or None when there is none."""
    if _is_tensor(batch):
        return batch
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        # A collate_fn's dataclass reads as the mapping of its fields (not asdict(): that
        # deep-copies every tensor).
        batch = {field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)}
    if isinstance(batch, Mapping):
        keys = list(features) if features is not None else _row_features(batch)
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


def _default_collates() -> tuple[Any, ...]:
    from torch.utils.data import default_collate, default_convert

    return (default_collate, default_convert)


def _uncollated(iterator: Any, batch: Any) -> int | None:
    """The number of samples in ``batch`` when the loader's own ``collate_fn`` left them
    uncollated, else None: a list of samples (tensors, of any shapes, tuples or dicts),
    or its transpose (parts that each hold one item per sample).

    A full batch decides, once per iterator: a list as long as the loader's batch size
    whose items are samples (tensors not all of that leading size, as collated parts
    would be, or tuples or dicts), else parts all as long as the batch size. A shorter
    last batch follows that decision. torch's own collate functions always collate."""
    if not isinstance(batch, list | tuple) or not batch:
        return None
    collate = getattr(iterator, "_collate_fn", None)
    if collate is None or collate in _default_collates():
        return None
    kind = getattr(iterator, _UNCOLLATED_ATTR, None)
    if kind is None:
        size = getattr(getattr(iterator, "_index_sampler", None), "batch_size", None)
        if not isinstance(size, int) or size < 1:
            return None
        if len(batch) == size and all(_is_tensor(item) for item in batch):
            collated = all(item.dim() > 0 and item.shape[0] == size for item in batch)
            kind = "" if collated else "samples"
        elif len(batch) == size and all(isinstance(i, list | tuple | Mapping) for i in batch):
            kind = "samples"
        elif all(isinstance(part, list | tuple) and len(part) == size for part in batch):
            kind = "parts"
        elif any(_is_tensor(i) and i.dim() > 0 and i.shape[0] == size for i in batch):
            kind = ""  # a full batch's collated parts
        else:
            return None  # not a full batch: the next one decides
        setattr(iterator, _UNCOLLATED_ATTR, kind)
    if kind == "samples":
        return len(batch)
    if kind == "parts" and isinstance(batch[0], list | tuple):
        return len(batch[0])
    return None


def _leading_size(batch: Any) -> int | None:
    """The leading size most tensors of a dict or dataclass batch share (a tokenizer's
    ``input_ids``, ``attention_mask`` and ``labels``), or None."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = {field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)}
    if not isinstance(batch, Mapping):
        return None
    sizes = [int(v.shape[0]) for v in batch.values() if _is_tensor(v) and v.dim() > 0]
    return max(sizes, key=sizes.count) if sizes else None


def _row_features(batch: Mapping[Any, Any]) -> list[Any]:
    """The keys of a dict batch's floating-point tensors that hold one row per sample:
    those with the leading size most of them share (the first one's, on a tie). A scalar
    or a per-batch tensor beside them (a temperature, class weights) is not a feature,
    and read with them it would cost every signal of the batch."""
    floats = [(k, v) for k, v in batch.items() if _is_tensor(v) and v.is_floating_point()]
    sizes = [int(v.shape[0]) for _, v in floats if v.dim() > 0]
    if not sizes:
        return []
    rows = max(sizes, key=sizes.count)  # max keeps the first of equally common sizes
    return [k for k, v in floats if v.dim() > 0 and int(v.shape[0]) == rows]


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

    _exit_hook_registered = False

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("torch >= 2.1",)

    def patches(self) -> Patches:
        return {
            _MODULE: {
                "DataLoader.__iter__": self._wrap_iter,
                "_BaseDataLoaderIter.__next__": self._wrap_next,
            }
        }

    def on_instrument(self, **kwargs: Any) -> None:
        if not DataLoaderInstrumentor._exit_hook_registered:
            DataLoaderInstrumentor._exit_hook_registered = True
            atexit.register(_shutdown_workers_at_exit)

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
                call = self._span(instance, start_ns, failed=True)
                call.start(self._tracer, semconv.SPAN_DATALOADER_BATCH, attach=False)
                call.error(exc)
                call.finish(end_ns)
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

    def _static(self, iterator: Any, state: WatchState) -> dict[str, Any]:
        """The attributes every batch of this source shares, built once per watch state."""
        static = state.static
        if static is None:
            static = base_attributes(
                semconv.STAGE_DATALOADER, semconv.COMPONENT_TORCH_DATALOADER, state.provenance()
            )
            if state.version is not None:
                static[semconv.DL_DATA_VERSION] = state.version
            dataset = getattr(iterator, "_dataset", None)
            if dataset is not None:
                cls = type(dataset)
                static[semconv.DL_DATASET_CLASS] = f"{cls.__module__}.{cls.__qualname__}"
            state.static = static
        return static

    def _span(self, iterator: Any, start_ns: int, failed: bool = False) -> DlSpan:
        static = self._static(iterator, self._state(iterator))
        call = DlSpan(_SITE, static, start_ns=start_ns)
        # torch counts a batch in _num_yielded once it is fetched: a failed one is not.
        yielded = int(getattr(iterator, "_num_yielded", 1))
        index = yielded if failed else max(yielded - 1, 0)
        call.attributes[semconv.DL_BATCH_INDEX] = index
        return call

    def _record(
        self, iterator: Any, args: Any, kwargs: Any, batch: Any, start_ns: int, end_ns: int
    ) -> None:
        state = self._state(iterator)
        call = self._span(iterator, start_ns)
        hooked = self._hooks.request is not None or self._hooks.response is not None
        call.extract("signals", _signals, state, batch, not hooked, iterator)
        later = call.later
        if later is not None:
            # Parked: the batch's profile waits for a burst, and so does the span, made
            # then with this call's parent, times and every attribute (see otel_dl._burst).
            call.defer_start(self._tracer, semconv.SPAN_DATALOADER_BATCH)
            call.end(end_ns)
            share(later)  # a model given this batch takes the profile, not a second one
            return
        # The batch has arrived: the span is made whole now, never current.
        call.start(self._tracer, semconv.SPAN_DATALOADER_BATCH, attach=False)
        if hooked:
            dl_call = DlCall(semconv.COMPONENT_TORCH_DATALOADER, iterator, tuple(args), kwargs)
            call.hook(self._hooks.request, dl_call)
            call.hook(self._hooks.response, dl_call, batch)
        call.finish(end_ns)


def _signals(
    state: WatchState, batch: Any, park: bool = False, iterator: Any = None
) -> dict[str, Any]:
    """Batch size, and the drift, quality and fingerprint of the batch's features; with
    ``park``, those of a batch :meth:`~otel_dl.monitor.FeatureMonitor.burst_inputs` takes
    come back as a :class:`~otel_dl.monitor.Later` for a burst. Samples left uncollated
    give their number only."""
    out: dict[str, Any] = {}
    if state.features is None and iterator is not None:
        samples = _uncollated(iterator, batch)
        if samples is not None:
            return {semconv.DL_BATCH_SIZE: samples}
    features = select_features(batch, state.features)
    first = next(iter(features.values()), None) if isinstance(features, dict) else features
    if first is not None and _is_tensor(first) and first.dim() > 0:
        out[semconv.DL_BATCH_SIZE] = int(first.shape[0])
    elif features is None:  # no features (token ids, masks, labels): the rows still count
        rows = _leading_size(batch)
        if rows is not None:
            out[semconv.DL_BATCH_SIZE] = rows
    config = get_config()
    if features is not None and config.signals:
        later = park and config.signals_delay_ms > 0
        found = observe_once(state.monitor(), features, later=later, shared=True)
        return combine(out, found)
    return out
