"""The failure-mode catalog: which span signals mean which fault, and who owns it.

The collector ships ``catalog.yaml`` next to this module; ``--catalog PATH`` adds
modes or replaces modes with the same id. Load both with :func:`load_catalog`::

    catalog = load_catalog(Path("my-modes.yaml"))
    for mode in catalog.modes:
        print(mode.id, mode.kind, mode.owner)

A mode matches a span when every ``where`` condition holds and at least one
``detect`` condition fires. Conditions read one *signal*: a span attribute name
(``dl.drift.score``), or one of the span facts ``duration`` (seconds),
``status.error``, ``exception``, ``span.kind`` and ``peer`` (the span calls a named
remote peer: a peer name attribute or the host of its URL, see
``attribute.peer_host``). Each condition has exactly one operator:

- ``above`` / ``below``: a fixed threshold;
- ``equals``: a string, number or boolean;
- ``above_baseline``: the value exceeds ``factor`` times the learned p99 of that signal
  for the same (service, operation: span name, route and peer), and the p99 by more
  than ``min_excess`` (an optional key of the condition; 0.01 s for ``duration``, 0
  otherwise), so scheduler jitter on a sub-millisecond span is not a fault;
- ``changed``: the value differs from every value established for the same key
  (``dl.model.name`` for model fingerprints, otherwise service and span name).

A mode's ``runbook`` is an absolute URL (kept as it is, pointing anywhere) or a page
name such as ``data-drift.md``, resolved against the ``runbook_base_url`` option; by
default that is the folder of runbook pages otel-dl ships (``docs/runbooks`` of the
repository, or ``share/otel-dl/runbooks`` of an installed package)::

    catalog = load_catalog(runbook_base_url="https://wiki.example.com/otel-dl/runbooks/")

An invalid catalog raises :class:`CatalogError` naming the file, the mode and the field.
"""

from __future__ import annotations

import logging
import math
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

import yaml

from otel_dl import semconv

from .decode import DERIVED_FROM, FALLBACKS

_log = logging.getLogger(__name__)

DEFAULT_CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
#: Where the runbook pages are: a source checkout (or editable install) keeps them in
#: docs/runbooks; an installed package puts them under its data prefix (pyproject.toml).
RUNBOOK_DIRS = (
    Path(__file__).resolve().parents[1] / "docs" / "runbooks",
    Path(sysconfig.get_path("data")) / "share" / "otel-dl" / "runbooks",
)

#: Signals that are facts about the span rather than attributes on it.
SPAN_SIGNALS = frozenset({"duration", "status.error", "exception", "span.kind", "peer"})
OPERATORS = ("above", "below", "equals", "above_baseline", "changed")
SEVERITIES = ("low", "medium", "high", "critical")
_SPAN_KINDS = ("internal", "server", "client", "producer", "consumer")
#: Default ``min_excess`` of ``above_baseline`` conditions, by signal. A sub-millisecond
#: span (an ASGI ``http send``) has a p99 so small that milliseconds of scheduler jitter
#: are many times it; 10 ms is below any slowdown worth an alert.
DEFAULT_MIN_EXCESS = {"duration": 0.01}


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names the file, the mode and the field."""


@dataclass(frozen=True)
class Condition:
    """One test on one signal of a span."""

    signal: str
    op: str
    value: Any
    #: For ``above_baseline``: how far past the learned p99 the value must also be.
    min_excess: float = 0.0


@dataclass(frozen=True)
class FailureMode:
    """One catalogued way to fail, with the conditions that detect it."""

    id: str
    kind: str
    origin: str
    detect: tuple[Condition, ...]
    where: tuple[Condition, ...]
    severity: str
    owner: str
    mitigation: str
    runbook: str

    @property
    def signals(self) -> frozenset[str]:
        """Every signal the mode reads."""
        return frozenset(c.signal for c in (*self.detect, *self.where))


@dataclass(frozen=True)
class Catalog:
    """The ordered failure modes the attributor matches spans against."""

    modes: tuple[FailureMode, ...]

    def by_id(self, mode_id: str) -> FailureMode:
        """Return the mode with ``mode_id``; raise ``KeyError`` when there is none."""
        for mode in self.modes:
            if mode.id == mode_id:
                return mode
        raise KeyError(mode_id)

    @property
    def attributes(self) -> frozenset[str]:
        """Span attribute names any mode reads (span facts excluded)."""
        read = frozenset(s for m in self.modes for s in m.signals if s not in SPAN_SIGNALS)
        fallbacks = frozenset(FALLBACKS[s] for s in read if s in FALLBACKS)
        return (
            read
            | fallbacks
            | frozenset(s for k in read & DERIVED_FROM.keys() for s in DERIVED_FROM[k])
        )


def default_runbook_base_url() -> str:
    """The ``file://`` URL of the shipped runbook pages (the first folder that exists)."""
    found = next((d for d in RUNBOOK_DIRS if d.is_dir()), RUNBOOK_DIRS[-1])
    return found.as_uri() + "/"


def resolve_runbook(runbook: str, base_url: str) -> str:
    """``runbook`` as it is when it is an absolute URL, else resolved against ``base_url``.

    ``base_url`` names a folder; a missing trailing slash is added, so that
    ``https://wiki/runbooks`` and ``https://wiki/runbooks/`` both give
    ``https://wiki/runbooks/data-drift.md``.
    """
    if urlparse(runbook).scheme:
        return runbook
    return urljoin(base_url if base_url.endswith("/") else base_url + "/", runbook)


def _fail(path: Path, where: str, message: str) -> CatalogError:
    return CatalogError(f"{path}: {where}: {message}")


def _condition(path: Path, where: str, raw: Any) -> Condition:
    if not isinstance(raw, dict) or not isinstance(raw.get("signal"), str):
        raise _fail(
            path,
            where,
            "each condition must be a mapping with a 'signal' name, e.g. "
            "{signal: dl.drift.score, above: 0.25}",
        )
    signal = raw["signal"]
    if signal not in SPAN_SIGNALS and not signal.strip():
        raise _fail(path, where, "'signal' must not be empty")
    ops = [k for k in raw if k not in ("signal", "min_excess")]
    if len(ops) != 1 or ops[0] not in OPERATORS:
        raise _fail(
            path,
            f"{where} (signal {signal})",
            f"needs exactly one operator out of {', '.join(OPERATORS)}; found {ops or 'none'}",
        )
    op = ops[0]
    value = raw[op]
    if op in ("above", "below", "above_baseline") and (
        isinstance(value, bool) or not isinstance(value, (int, float))
    ):
        raise _fail(path, f"{where} (signal {signal})", f"'{op}' must be a number, got {value!r}")
    if op == "above_baseline" and value <= 0:
        raise _fail(path, f"{where} (signal {signal})", "'above_baseline' must be > 0")
    min_excess = raw.get("min_excess", DEFAULT_MIN_EXCESS.get(signal, 0.0))
    if "min_excess" in raw and op != "above_baseline":
        raise _fail(
            path, f"{where} (signal {signal})", "'min_excess' goes only with 'above_baseline'"
        )
    if (
        isinstance(min_excess, bool)
        or not isinstance(min_excess, (int, float))
        or not 0 <= min_excess < math.inf
    ):
        raise _fail(
            path,
            f"{where} (signal {signal})",
            f"'min_excess' must be a number >= 0, got {min_excess!r}",
        )
    if op == "changed" and value is not True:
        raise _fail(path, f"{where} (signal {signal})", "'changed' takes only the value true")
    if signal == "span.kind" and (op != "equals" or value not in _SPAN_KINDS):
        raise _fail(
            path,
            f"{where} (signal span.kind)",
            f"use 'equals' with one of {', '.join(_SPAN_KINDS)}",
        )
    return Condition(signal, op, value, float(min_excess) if op == "above_baseline" else 0.0)


def _conditions(path: Path, where: str, raw: Any, required: bool) -> tuple[Condition, ...]:
    if raw is None and not required:
        return ()
    if not isinstance(raw, list) or (required and not raw):
        need = "a non-empty list" if required else "a list"
        raise _fail(path, where, f"must be {need} of conditions")
    return tuple(_condition(path, f"{where}[{i}]", c) for i, c in enumerate(raw))


def _text(path: Path, where: str, raw: dict[str, Any], key: str, default: str | None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"{where} field '{key}'", "must be a non-empty string")
    return value


def _mode(path: Path, index: int, raw: Any) -> FailureMode:
    if not isinstance(raw, dict):
        raise _fail(path, f"modes[{index}]", "each mode must be a mapping with an 'id'")
    mode_id = raw.get("id")
    if not isinstance(mode_id, str) or not mode_id.strip():
        raise _fail(path, f"modes[{index}] field 'id'", "must be a non-empty string")
    where = f"mode '{mode_id}'"
    known = {"id", "kind", "origin", "detect", "where", "severity", "owner", "mitigation"}
    unknown = set(raw) - known - {"runbook"}
    if unknown:
        raise _fail(
            path,
            where,
            f"unknown field(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(known | {'runbook'}))}",
        )
    kind = raw.get("kind")
    if kind not in semconv.FAULT_KINDS:
        raise _fail(
            path,
            f"{where} field 'kind'",
            f"{kind!r} is not a fault kind; use one of {', '.join(semconv.FAULT_KINDS)}",
        )
    origin = raw.get("origin")
    origins = (semconv.FAULT_ORIGIN_INTERNAL, semconv.FAULT_ORIGIN_EXTERNAL)
    if origin not in origins:
        raise _fail(path, f"{where} field 'origin'", f"{origin!r} must be internal or external")
    severity = raw.get("severity")
    if severity not in SEVERITIES:
        raise _fail(
            path,
            f"{where} field 'severity'",
            f"{severity!r} must be one of {', '.join(SEVERITIES)}",
        )
    return FailureMode(
        id=mode_id,
        kind=kind,
        origin=origin,
        detect=_conditions(path, f"{where} field 'detect'", raw.get("detect"), required=True),
        where=_conditions(path, f"{where} field 'where'", raw.get("where"), required=False),
        severity=severity,
        owner=_text(path, where, raw, "owner", None),
        mitigation=_text(path, where, raw, "mitigation", None),
        runbook=_runbook(path, where, _text(path, where, raw, "runbook", None)),
    )


def _runbook(path: Path, where: str, value: str) -> str:
    value = value.strip()
    parsed = urlparse(value)
    if parsed.scheme:
        if not parsed.netloc and parsed.scheme != "file":
            raise _fail(
                path,
                f"{where} field 'runbook'",
                f"{value!r} is not a URL with a host; give an absolute URL such as "
                "https://wiki.example.com/runbooks/x.md or a page name such as x.md",
            )
        return value
    if value.startswith(("/", "\\")) or parsed.netloc:
        raise _fail(
            path,
            f"{where} field 'runbook'",
            f"{value!r} is neither an absolute URL nor a page name; write a page name "
            "relative to runbook_base_url (e.g. data-drift.md) or a full https:// URL",
        )
    return value


def _read_modes(path: Path) -> list[FailureMode]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(
            f"{path}: cannot read the catalog ({exc.strerror}); check the path"
        ) from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML ({exc}); fix the syntax") from exc
    if not isinstance(data, dict) or not isinstance(data.get("modes"), list):
        raise CatalogError(f"{path}: expected a top-level 'modes:' list of failure modes")
    modes = [_mode(path, i, raw) for i, raw in enumerate(data["modes"])]
    seen: set[str] = set()
    for mode in modes:
        if mode.id in seen:
            raise _fail(path, f"mode '{mode.id}'", "the id is defined twice; ids must be unique")
        seen.add(mode.id)
    return modes


def load_catalog(extra: Path | None = None, runbook_base_url: str | None = None) -> Catalog:
    """Load the shipped catalog, then add or replace modes from ``extra``.

    Relative runbooks resolve against ``runbook_base_url`` (the ``runbook_base_url``
    option, checked by the configuration), by default the shipped runbook pages.
    """
    base = runbook_base_url or default_runbook_base_url()
    modes = {m.id: m for m in _read_modes(DEFAULT_CATALOG_PATH)}
    if extra is not None:
        for mode in _read_modes(extra):
            modes[mode.id] = mode
    resolved = tuple(replace(m, runbook=resolve_runbook(m.runbook, base)) for m in modes.values())
    _warn_missing_pages(resolved)
    return Catalog(resolved)


def _warn_missing_pages(modes: tuple[FailureMode, ...]) -> None:
    """Log the modes whose runbook is a local page that does not exist."""
    missing = [
        m.id
        for m in modes
        if m.runbook.startswith("file:") and not Path(unquote(urlparse(m.runbook).path)).is_file()
    ]
    if missing:
        _log.warning(
            "no runbook page for mode(s) %s (%s): write the page, give the mode an absolute "
            "runbook URL, or set runbook_base_url",
            ", ".join(missing),
            next(m.runbook for m in modes if m.id == missing[0]),
        )
