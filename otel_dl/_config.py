"""Configuration: one table of options, with precedence argument > environment > default.

Every option has a field on :class:`Config`, an environment variable and a default.
``OPTIONS`` is the single table that ``instrument()``, the README's configuration
table and its test read. Standard ``OTEL_*`` variables are used where OpenTelemetry
defines one; otel-dl's own options are ``OTEL_DL_*``. :class:`Option`, the parsers,
the checks and :class:`ConfigError` are ``otel_dl._options``, shared with the collector.
An ``OTEL_DL_*`` variable that is no option gets a warning naming the likely intended one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from otel_dl import semconv
from otel_dl._options import (
    ConfigError,
    Option,
    fraction,
    non_negative,
    one_of,
    parse_bool,
    parse_list,
    parse_optional_float,
    positive,
    rate,
    unknown_variables,
)

logger = logging.getLogger("otel_dl")


@dataclass(frozen=True)
class Config:
    """Resolved otel-dl configuration. Build it with :func:`resolve_config`."""

    service_name: str | None = None
    traces_exporter: str = "otlp"
    metrics_exporter: str = "otlp"
    duration_metric: bool = False
    protocol: str = "grpc"
    endpoint: str | None = None
    exporter_encoder: str = "official"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    propagation: bool = True
    signals: bool = True
    drift_method: str = "psi"
    drift_bins: int = 10
    drift_warn: float | None = None
    drift_alert: float | None = None
    drift_false_alarm_rate: float = 0.001
    drift_window_rows: int = 10_000
    drift_min_rows: int = 500
    drift_max_rows: int = 1024
    drift_max_features: int = 256
    drift_every: int = 8
    baseline_rows: int = 1000
    confidence_threshold: float = 0.5
    confidence_rows: int = 16
    signals_delay_ms: int = 100
    sample_every: int = 1
    sample_latency: float | None = None
    trace_training: bool = False
    code_version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


OPTIONS: tuple[Option, ...] = (
    Option("service_name", "OTEL_SERVICE_NAME", str, "`service.name` of the Resource"),
    Option(
        "traces_exporter",
        "OTEL_TRACES_EXPORTER",
        str,
        "`otlp`, `console` or `none`",
        one_of("otlp", "console", "none"),
    ),
    Option(
        "metrics_exporter",
        "OTEL_METRICS_EXPORTER",
        str,
        "`otlp`, `console` or `none`",
        one_of("otlp", "console", "none"),
    ),
    Option(
        "duration_metric",
        "OTEL_DL_DURATION_METRIC",
        parse_bool,
        "also record `dl.operation.duration` in the process, one point per otel-dl span"
        " (the otel-dl collector derives it from the spans; 14 to 20 % of a one-row"
        " model call)",
    ),
    Option(
        "protocol",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        str,
        "`grpc` or `http/protobuf`",
        one_of("grpc", "http/protobuf"),
    ),
    Option(
        "endpoint",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        str,
        "OTLP endpoint, e.g. `http://localhost:4317` (the exporter's default when unset)",
    ),
    Option(
        "exporter_encoder",
        "OTEL_DL_EXPORT_ENCODER",
        str,
        "`official` or `fast` (otel-dl's OTLP span encoder: the same OTLP for about a third of"
        " the CPU)",
        one_of("fast", "official"),
    ),
    Option(
        "include",
        "OTEL_DL_INSTRUMENTATIONS",
        parse_list,
        "comma-separated instrumentor names to enable (default: every installed one)",
    ),
    Option(
        "exclude",
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS",
        parse_list,
        "comma-separated instrumentor names to skip",
    ),
    Option(
        "propagation",
        "OTEL_DL_PROPAGATION",
        parse_bool,
        "enable the installed standard HTTP/gRPC instrumentations, so calls between services"
        " join one trace",
    ),
    Option("signals", "OTEL_DL_SIGNALS", parse_bool, "compute drift, quality and confidence"),
    Option(
        "drift_method",
        "OTEL_DL_DRIFT_METHOD",
        str,
        "`psi`, `js`, `ks` or `wasserstein`",
        one_of(*semconv.DRIFT_METHODS),
    ),
    Option("drift_bins", "OTEL_DL_DRIFT_BINS", int, "bins per numeric feature", positive),
    Option(
        "drift_warn",
        "OTEL_DL_DRIFT_WARN",
        parse_optional_float,
        "score at which `dl.drift.status` becomes `warn` (default per method)",
        positive,
    ),
    Option(
        "drift_alert",
        "OTEL_DL_DRIFT_ALERT",
        parse_optional_float,
        "score at which `dl.drift.status` becomes `alert` (default per method)",
        positive,
    ),
    Option(
        "drift_false_alarm_rate",
        "OTEL_DL_DRIFT_FALSE_ALARM_RATE",
        float,
        "how often sampling alone may take `dl.drift.status` past `ok`: a score counts only"
        " beyond the one a window and a reference of their sizes reach by chance at this"
        " rate; 0 judges by the thresholds alone",
        rate,
    ),
    Option(
        "drift_window_rows",
        "OTEL_DL_DRIFT_WINDOW_ROWS",
        int,
        "recent rows the streaming drift window holds",
        positive,
    ),
    Option(
        "drift_min_rows",
        "OTEL_DL_DRIFT_MIN_ROWS",
        int,
        "rows the drift window must hold before drift is reported",
        positive,
    ),
    Option(
        "drift_max_rows",
        "OTEL_DL_DRIFT_MAX_ROWS",
        int,
        "rows per batch copied into the drift window (evenly spaced subsample above it)",
        positive,
    ),
    Option(
        "drift_max_features",
        "OTEL_DL_DRIFT_MAX_FEATURES",
        int,
        "numeric features per batch used for drift (evenly spaced subset above it)",
        positive,
    ),
    Option(
        "drift_every",
        "OTEL_DL_DRIFT_EVERY",
        int,
        "bin and score the drift window every k-th batch (spans between carry the latest"
        " score); exact confidence every k-th call",
        positive,
    ),
    Option(
        "baseline_rows",
        "OTEL_DL_BASELINE_ROWS",
        int,
        "rows that become the reference when none is given",
        positive,
    ),
    Option(
        "confidence_threshold",
        "OTEL_DL_CONFIDENCE_THRESHOLD",
        float,
        "confidence under which a prediction counts as low",
        fraction,
    ),
    Option(
        "confidence_rows",
        "OTEL_DL_CONFIDENCE_ROWS",
        int,
        "predictions per call the confidence figures are computed on (evenly spaced above"
        " it; all of them every `drift_every`-th call)",
        positive,
    ),
    Option(
        "signals_delay_ms",
        "OTEL_DL_SIGNALS_DELAY_MS",
        int,
        "model calls and DataLoader batches whose input is one CPU array or tensor (at most"
        " 65,536 feature values, or 1 MiB) get their signals computed together (and a"
        " DataLoader batch its span made), in bursts (16 calls of a batch, up to 64 of a few"
        " rows each) or this many milliseconds after the call at most (0: each at its"
        " call's end)",
        non_negative,
    ),
    Option(
        "sample_every",
        "OTEL_DL_SAMPLE_EVERY",
        int,
        "keep every abnormal otel-dl span and 1 in N of the normal ones (1: keep all)",
        positive,
    ),
    Option(
        "sample_latency",
        "OTEL_DL_SAMPLE_LATENCY",
        parse_optional_float,
        "seconds above which an otel-dl span counts as abnormal for sampling",
        positive,
    ),
    Option(
        "trace_training",
        "OTEL_DL_TRACE_TRAINING",
        parse_bool,
        "also trace torch model forwards in training mode",
    ),
    Option(
        "code_version",
        "OTEL_DL_CODE_VERSION",
        str,
        "`dl.code.version` (default: the git commit, when available)",
    ),
)

_OPTION_BY_NAME = {option.name: option for option in OPTIONS}
assert set(_OPTION_BY_NAME) | {"extra"} == {f.name for f in fields(Config)}

_VARIABLES = frozenset(option.env for option in OPTIONS)
# OTEL_DL_* variables of this project that are not SDK options, so no warning (matched as
# prefixes): the collector's own keys, which collector/config.py checks itself; the
# reliability suite's switch and its OTEL_DL_RELIABILITY_OUT / _CASE (tests/reliability);
# the e2e tests' binary overrides (tests/e2e/binaries.py), named in full, not as "*_BIN",
# so that a misspelt OTEL_DL_DRIFT_BIN is still reported.
_NOT_OPTIONS = (
    "OTEL_DL_COLLECTOR_",
    "OTEL_DL_RELIABILITY",
    "OTEL_DL_JAEGER_BIN",
    "OTEL_DL_HOTROD_BIN",
)
# Names already warned about: resolve_config runs many times in a process, the warning once.
_warned_variables: set[str] = set()


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """Warn, once per process and name, about an ``OTEL_DL_*`` variable that is no option:
    a misspelt one (``OTEL_DL_SAMPLE_EVRY``) would otherwise be ignored without a word.
    Never raises: a warning must not stop the configuration."""
    try:
        found = unknown_variables(environ, "OTEL_DL_", _VARIABLES, _NOT_OPTIONS)
        for name, close in found:
            if name in _warned_variables:
                continue
            _warned_variables.add(name)
            hint = f"; did you mean {close}?" if close else ""
            logger.warning(
                "otel-dl: environment variable %s is not an otel-dl option and is ignored%s",
                name,
                hint,
            )
    except Exception:
        logger.debug("otel-dl: checking the OTEL_DL_* variables failed", exc_info=True)


def resolve_config(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build a :class:`Config`: explicit ``overrides`` > environment > defaults.

    Raises :class:`ConfigError` naming the option, its variable and the fix; warns, once
    per name, about an ``OTEL_DL_*`` variable that is no option.
    """
    environ = os.environ if environ is None else environ
    _warn_unknown_variables(environ)
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = environ.get(option.env)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{option.env}={raw!r} is not valid for {option.name}: {exc}. "
                f"Set it to a valid value ({option.name}: {option.help}), or unset it."
            ) from None
    unknown = [key for key in (overrides or {}) if key not in _OPTION_BY_NAME]
    if unknown:
        raise ConfigError(
            f"unknown otel-dl option(s) {', '.join(sorted(unknown))}; "
            f"valid options are {', '.join(sorted(_OPTION_BY_NAME))}"
        )
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        option = _OPTION_BY_NAME[key]
        if isinstance(value, str) and option.parse is not str:
            # A string is read as the environment variable would be ("4", "true").
            try:
                value = option.parse(value)
            except ValueError as exc:
                raise ConfigError(
                    f"otel-dl option {key} = {value!r} is not valid: {exc}. Give a valid value"
                    f" ({key}: {option.help})."
                ) from None
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    config = replace(Config(), **values)
    for option in OPTIONS:
        value = getattr(config, option.name)
        try:
            problem = option.problem(value)
        except TypeError:
            problem = f"is a {type(value).__name__}; give {option.help}"
        if problem:
            raise ConfigError(f"otel-dl option {option.name} ({option.env}) = {value!r} {problem}.")
    return config


_active: Config | None = None


def get_config() -> Config:
    """The configuration in force: the one ``instrument()`` resolved, else env and defaults."""
    global _active
    if _active is None:
        _active = resolve_config()
    return _active


def set_config(config: Config | None) -> None:
    global _active
    _active = config
