"""The injectors a fault drill uses: each wraps one part of the user's own pipeline.

A pipeline under drill receives a :class:`Faults` and passes its parts through it::

    def pipeline(faults: Faults) -> None:
        loader = faults.batches(DataLoader(dataset, batch_size=64))
        store = faults.feature_store(store)
        model = faults.model(model)
        http = faults.http(session)
        ...                                    # one pass of the pipeline, as in production

Outside a drill (``Faults()``) every method returns its argument unchanged. In a drill,
the one part the drilled failure mode targets is changed for the run, inside the call
otel-dl instruments, so the span sees what production would see:

- ``batches`` (a DataLoader, a dataset or any iterable of batches): ``drift`` multiplies
  one feature by 1000 (a unit change upstream), ``nan`` blanks every fifth row, ``schema``
  appends a column. A DataLoader keeps its own span: the fault is in its ``collate_fn``.
- ``feature_store`` (a Feast ``FeatureStore``): ``stale`` rewrites the online rows a
  lookup reads with event timestamps three TTLs old (the materialisation job stopped);
  the rows are written back as they were when the run ends.
- ``model`` (a torch module; ``swap`` also a scikit-learn estimator): ``swap`` loads other
  weights, ``unsure`` flattens the outputs to equal scores, ``slow`` adds a delay and
  ``fail`` raises inside the forward.
- ``http`` (a ``requests.Session``): ``slow`` delays every request, ``fail`` answers 503
  without reaching the server. The client span (requests instrumentation) shows either.

Every change is undone by :meth:`Faults.close`, which the drill calls after each run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

#: The parts of a pipeline a drill can change, and what it can do to each.
ACTIONS: Final = {
    "batches": ("drift", "nan", "schema"),
    "feature_store": ("stale",),
    "model": ("swap", "unsure", "slow", "fail"),
    "http": ("slow", "fail"),
}
DRIFT_FACTOR: Final = 1000.0
NAN_EVERY: Final = 5
SLOW_SECONDS: Final = 0.25
STALE_TTLS: Final = 3


class InjectedFault(RuntimeError):
    """Raised by a ``fail`` fault inside the user's model: the failure a drill injects."""


@dataclass(frozen=True)
class Fault:
    """One fault to inject: which part of the pipeline and what to do to it."""

    target: str
    action: str

    def __post_init__(self) -> None:
        if self.action not in ACTIONS.get(self.target, ()):
            raise ValueError(
                f"no fault {self.action!r} for {self.target!r}; the faults are "
                + "; ".join(f"{t}: {', '.join(a)}" for t, a in ACTIONS.items())
            )


class Faults:
    """What a pipeline under drill passes its parts through; see the module docstring.

    ``offered`` records which parts the pipeline passed (a drill of a part never offered
    cannot be run), ``applied`` whether the fault found its part.
    """

    def __init__(self, fault: Fault | None = None) -> None:
        self.fault = fault
        self.offered: set[str] = set()
        self.applied = False
        self._undo: list[Callable[[], None]] = []

    def _wants(self, target: str) -> bool:
        self.offered.add(target)
        return self.fault is not None and self.fault.target == target

    def close(self) -> None:
        """Undo every change made to the user's objects, last first."""
        while self._undo:
            self._undo.pop()()

    # --- batches --------------------------------------------------------------------------

    def batches(self, source: Any) -> Any:
        """A DataLoader, dataset or iterable of batches, with the drilled data fault."""
        if not self._wants("batches"):
            return source
        assert self.fault is not None
        action = self.fault.action
        self.applied = True
        if hasattr(source, "collate_fn") and hasattr(source, "dataset"):  # a DataLoader
            original = source.collate_fn
            source.collate_fn = _FaultyCollate(original, action)

            def undo() -> None:
                source.collate_fn = original

            self._undo.append(undo)
            return source
        if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            return _FaultyDataset(source, action)
        return _faulty_iter(source, action)

    # --- feature store --------------------------------------------------------------------

    def feature_store(self, store: Any) -> Any:
        """A Feast ``FeatureStore`` whose online reads return stale rows in the drill."""
        if not self._wants("feature_store"):
            return store
        self.applied = True
        stale = _StaleOnline(store)
        self._undo.append(stale.restore)
        return stale.proxy()

    # --- model ----------------------------------------------------------------------------

    def model(self, model: Any) -> Any:
        """A model with the drilled model fault (torch modules; ``swap`` also estimators)."""
        if not self._wants("model"):
            return model
        assert self.fault is not None
        action = self.fault.action
        if _is_torch_module(model):
            self.applied = True
            self._undo.append(_torch_fault(model, action))
            return model
        if action == "swap":
            self.applied = True
            return _swapped_estimator(model)
        return model  # not applied: the drill reports it

    # --- HTTP -----------------------------------------------------------------------------

    def http(self, session: Any) -> Any:
        """A ``requests.Session`` whose calls are slow or fail in the drill."""
        if not self._wants("http"):
            return session
        assert self.fault is not None
        adapter = _faulty_adapter(self.fault.action)
        before = dict(session.adapters)
        for prefix in ("http://", "https://"):
            session.mount(prefix, adapter)
        self.applied = True

        def undo() -> None:
            session.adapters.clear()
            session.adapters.update(before)
            adapter.close()

        self._undo.append(undo)
        return session


# --- data faults ------------------------------------------------------------------------------


def _float_array(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f"
    return bool(getattr(value, "is_floating_point", lambda: False)())


def _corrupt(x: Any, action: str, rows: Any = None) -> Any:
    """A changed copy of the float array or tensor ``x`` (rows x features, or one row)."""
    out = x.clone() if hasattr(x, "clone") else np.array(x, copy=True)
    if action == "drift":
        out[..., -1] = out[..., -1] * DRIFT_FACTOR
    elif action == "nan":
        if out.ndim > 1:
            out[::NAN_EVERY] = float("nan")
        elif rows:
            out[...] = float("nan")
    elif action == "schema":
        extra = out[..., -1:] * 0
        out = (
            np.concatenate([out, extra], axis=-1)
            if isinstance(out, np.ndarray)
            else _torch_cat(out, extra)
        )
    return out


def _torch_cat(a: Any, b: Any) -> Any:
    import torch

    return torch.cat([a, b], dim=-1)


def _apply(batch: Any, action: str, rows: Any = None) -> Any:
    """``batch`` with its first float array or tensor (the features) changed."""
    if _float_array(batch):
        return _corrupt(batch, action, rows)
    if isinstance(batch, tuple | list):
        items = list(batch)
        for i, item in enumerate(items):
            if _float_array(item):
                items[i] = _corrupt(item, action, rows)
                break
        return type(batch)(items) if isinstance(batch, tuple) else items
    if isinstance(batch, dict):
        for key, item in batch.items():
            if _float_array(item):
                return {**batch, key: _corrupt(item, action, rows)}
    return batch


class _FaultyCollate:
    """A DataLoader's ``collate_fn`` followed by the fault (picklable for workers)."""

    def __init__(self, collate: Callable[[Any], Any], action: str) -> None:
        self.collate, self.action = collate, action

    def __call__(self, samples: Any) -> Any:
        return _apply(self.collate(samples), self.action)


class _FaultyDataset:
    """A map-style dataset whose rows carry the fault (every fifth row, for ``nan``)."""

    def __init__(self, dataset: Any, action: str) -> None:
        self.dataset, self.action = dataset, action

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        row = self.dataset[index]
        if self.action == "nan":
            return _apply(row, "nan", rows=index % NAN_EVERY == 0)
        return _apply(row, self.action)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _faulty_iter(batches: Iterable[Any], action: str) -> Iterator[Any]:
    for batch in batches:
        yield _apply(batch, action)


# --- model faults -----------------------------------------------------------------------------


def _is_torch_module(model: Any) -> bool:
    return any(
        c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module"
        for c in type(model).__mro__
    )


def _torch_fault(model: Any, action: str) -> Callable[[], None]:
    """Apply ``action`` to a torch module; return what undoes it."""
    import torch

    leaves = [m for m in model.modules() if not list(m.children())] or [model]
    if action == "swap":
        original = {k: v.clone() for k, v in model.state_dict().items()}
        generator = torch.Generator().manual_seed(1)
        other = {
            k: torch.randn(v.shape, generator=generator).to(v.dtype) * v.float().std().nan_to_num(1)
            if v.is_floating_point()
            else v
            for k, v in original.items()
        }
        # load_state_dict, as a deploy would: the weights' fingerprint is recomputed.
        model.load_state_dict(other)
        return lambda: model.load_state_dict(original)
    if action == "unsure":
        # First among the hooks: otel-dl's own forward hook, on a one-layer model the same
        # module, must read the flattened output.
        handle = leaves[-1].register_forward_hook(lambda _m, _i, out: out * 0, prepend=True)
        return handle.remove  # type: ignore[no-any-return]
    if action == "slow":
        handle = leaves[0].register_forward_pre_hook(lambda _m, _i: time.sleep(SLOW_SECONDS))
        return handle.remove  # type: ignore[no-any-return]

    def fail(_module: Any, _inputs: Any) -> None:
        raise InjectedFault("fault drill: the model fails on every call")

    handle = leaves[0].register_forward_pre_hook(fail)
    return handle.remove  # type: ignore[no-any-return]


def _swapped_estimator(model: Any) -> Any:
    """A copy of a fitted estimator with other learned weights (``coef_``-style arrays)."""
    other = copy.deepcopy(model)
    steps = [s for _, s in getattr(other, "steps", [])] or [other]
    rng = np.random.default_rng(1)
    for step in steps:
        for name, value in vars(step).items():
            if name.endswith("_") and isinstance(value, np.ndarray) and value.dtype.kind == "f":
                noise = np.asarray(rng.normal(0.0, 1.0, value.shape), dtype=value.dtype)
                setattr(step, name, value + noise)
    return other


# --- dependency faults ------------------------------------------------------------------------


def _faulty_adapter_class() -> type:
    import requests
    import requests.adapters

    class FaultyAdapter(requests.adapters.HTTPAdapter):
        """Slow by ``SLOW_SECONDS``, or a 503 that never reaches the server."""

        def __init__(self, action: str) -> None:
            super().__init__()
            self.action = action

        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            if self.action == "slow":
                time.sleep(SLOW_SECONDS)
                return super().send(request, *args, **kwargs)
            response = requests.Response()
            response.status_code = 503
            response.reason = "Service Unavailable (fault drill)"
            response.url = request.url
            response.request = request
            response._content = b'{"error": "fault drill: dependency unavailable"}'
            return response

    return FaultyAdapter


def _faulty_adapter(action: str) -> Any:
    # The class is built on first use: requests is only needed by pipelines that use it.
    return _faulty_adapter_class()(action)


# --- feature-store faults ---------------------------------------------------------------------


class _StaleOnline:
    """Makes the online rows a Feast lookup reads three TTLs old, and puts them back."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.saved: list[tuple[str, Any]] = []  # (view, frame as it was), in write order

    def proxy(self) -> Any:
        stale = self

        class StaleStore:
            def __getattr__(self, name: str) -> Any:
                return getattr(stale.store, name)

            def get_online_features(self, features: Any, entity_rows: Any, **kw: Any) -> Any:
                stale.age(features, entity_rows)
                return stale.store.get_online_features(features, entity_rows, **kw)

        return StaleStore()

    def _views(self, features: Any) -> dict[str, list[str]]:
        refs = features
        if not isinstance(features, list | tuple):  # a FeatureService
            refs = [
                f"{projection.name}:{f.name}"
                for projection in features.feature_view_projections
                for f in projection.features
            ]
        views: dict[str, list[str]] = {}
        for ref in refs:
            view, _, name = str(ref).partition(":")
            views.setdefault(view, []).append(name)
        return views

    def age(self, features: Any, entity_rows: Any) -> None:
        import pandas as pd
        from opentelemetry.instrumentation.utils import suppress_instrumentation

        with suppress_instrumentation():
            for view, names in self._views(features).items():
                spec = self.store.get_feature_view(view)
                keys = list(spec.join_keys)
                read = self.store.get_online_features(
                    [f"{view}:{n}" for n in names], entity_rows
                ).to_df(include_event_timestamps=True)
                read = read.dropna(subset=names, how="all")
                if read.empty:
                    continue
                ttl = spec.ttl.total_seconds() if spec.ttl else 86400.0
                before = read[keys + names].copy()
                stamps = [f"{n}__ts" for n in names if f"{n}__ts" in read]
                before["event_timestamp"] = read[stamps].min(axis=1) if stamps else pd.NaT
                before["created"] = before["event_timestamp"]
                self.saved.append((view, before))
                old = read[keys + names].copy()
                old["event_timestamp"] = pd.Timestamp.now(tz="UTC") - pd.Timedelta(
                    seconds=STALE_TTLS * ttl
                )
                old["created"] = old["event_timestamp"]
                self.store.write_to_online_store(view, old)

    def restore(self) -> None:
        from opentelemetry.instrumentation.utils import suppress_instrumentation

        with suppress_instrumentation():
            # The first read of each entity saw it as it was: write those last.
            for view, frame in reversed(self.saved):
                self.store.write_to_online_store(view, frame.dropna(subset=["event_timestamp"]))
        self.saved.clear()
