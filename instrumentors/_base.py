"""The base every otel-dl instrumentor shares: instrumentors declare, the base acts.

An otel-dl instrumentor is an OpenTelemetry ``BaseInstrumentor`` (so the standard
``opentelemetry-instrument`` runner finds it through its ``otel_dl_*`` entry point) that
declares what it patches as data::

    class OnnxRuntimeInstrumentor(DlInstrumentor):
        def instrumentation_dependencies(self):
            return ("onnxruntime >= 1.17",)

        def patches(self):
            return {"onnxruntime.capi.onnxruntime_inference_collection": {
                "Session.run": self._wrap_run,
            }}

The base then owns the mechanics, the same for every instrumentor:

- each module is patched when the application imports it (at once if it already has),
  so a library the application never imports costs nothing, not even its import;
- ``uninstrument()`` unwraps exactly what was patched; an attribute a library version
  lacks is skipped;
- it always checks that its target library is installed, and quietly does nothing when
  it is not, even when the runner asks it to skip that check;
- it accepts ``hooks=`` (an ``otel_dl._span.Hooks``), or ``request_hook=`` and
  ``response_hook=``, as ``self._hooks``;
- it honours ``tracer_provider=``, as the contrib instrumentations do: its spans come
  from ``self._tracer``, a tracer of that provider (else of the global one).

``on_instrument``/``on_uninstrument`` are for what is not a patch (a watch listener,
an exit hook, hooks on model instances).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import wrapt
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import Tracer

from otel_dl._guard import report_internal_error
from otel_dl._span import NO_HOOKS, Hooks, get_tracer

logger = logging.getLogger("otel_dl")

Patches = Mapping[str, Mapping[str, Callable[..., Any]]]


def _owner(module: Any, path: str) -> tuple[Any, str] | None:
    """The object holding ``path``'s last name, and that name; None when it is absent."""
    owner = module
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
        if owner is None:
            return None
    return (owner, name) if hasattr(owner, name) else None


class DlInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Base class of the otel-dl instrumentors; see the module docstring."""

    _tracer: Tracer = get_tracer()
    _hooks: Hooks = NO_HOOKS
    # Per subclass (set in __init_subclass__): BaseInstrumentor is a singleton whose
    # __init__ runs on every call, and wrapt's import hooks cannot be removed.
    _dl_enabled: ClassVar[bool]
    _dl_import_hooked: ClassVar[set[str]]
    _dl_patched: ClassVar[dict[str, list[str]]]
    _dl_lock: ClassVar[threading.RLock]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._dl_enabled = False
        cls._dl_import_hooked = set()
        cls._dl_patched = {}
        cls._dl_lock = threading.RLock()

    # -- what a subclass declares ------------------------------------------------------
    def patches(self) -> Patches:
        """``{module: {"Class.method" or "function": wrapt wrapper}}``."""
        return {}

    def on_instrument(self, **kwargs: Any) -> None:
        """Work beyond the patches, after they are in place."""

    def on_uninstrument(self) -> None:
        """Undo :meth:`on_instrument`, after the patches are removed."""

    # -- what the base does -------------------------------------------------------------
    def missing_dependency(self) -> str | None:
        """Why the target library cannot be instrumented, or None when it can."""
        conflict = self._check_dependency_conflicts()
        return None if conflict is None else str(conflict)

    def instrument(self, **kwargs: Any) -> Any:
        kwargs.pop("skip_dep_check", None)
        if self.is_instrumented_by_opentelemetry:
            return None
        missing = self.missing_dependency()
        if missing:
            logger.debug("otel-dl: %s not enabled: %s", type(self).__name__, missing)
            return None
        self._tracer = get_tracer(kwargs.get("tracer_provider"))
        return super().instrument(skip_dep_check=True, **kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        cls = type(self)
        self._hooks = self.hooks_from(kwargs)
        cls._dl_enabled = True
        for name in self.patches():
            if name not in cls._dl_import_hooked:
                cls._dl_import_hooked.add(name)
                # Called at once for a module already imported, else when it is imported.
                wrapt.register_post_import_hook(self._patch_module, name)
            elif name in sys.modules:
                self._patch_module(sys.modules[name])
        self.on_instrument(**kwargs)

    def _uninstrument(self, **kwargs: Any) -> None:
        cls = type(self)
        with cls._dl_lock:
            cls._dl_enabled = False
            for name, paths in cls._dl_patched.items():
                module = sys.modules[name]
                for path in paths:
                    found = _owner(module, path)
                    if found is not None:
                        unwrap(*found)
            cls._dl_patched.clear()
        self.on_uninstrument()

    def _patch_module(self, module: Any) -> None:
        cls = type(self)
        name = module.__name__
        with cls._dl_lock:
            if not cls._dl_enabled or name in cls._dl_patched:
                return
            done: list[str] = []
            for path, wrapper in self.patches().get(name, {}).items():
                if _owner(module, path) is None:
                    continue  # not in this version of the library
                try:
                    wrapt.wrap_function_wrapper(module, path, wrapper)
                    done.append(path)
                except Exception:
                    report_internal_error(f"{cls.__name__}.patch")
            cls._dl_patched[name] = done

    def is_patched(self, module: str) -> bool:
        """Whether ``module``'s declared patches are in place."""
        return module in type(self)._dl_patched

    @staticmethod
    def hooks_from(kwargs: dict[str, Any]) -> Hooks:
        hooks = kwargs.get("hooks")
        if isinstance(hooks, Hooks):
            return hooks
        return Hooks(kwargs.get("request_hook"), kwargs.get("response_hook"))
