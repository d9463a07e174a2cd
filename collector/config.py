"""Collector configuration: YAML file, environment and flags, checked once at start.

Precedence is flag > environment (``OTEL_DL_COLLECTOR_<KEY>``) > YAML file > default.
``OPTIONS`` is the one table of keys: every key of :class:`CollectorConfig` can be set
in the file and by its environment variable, and every key but a secret one by its flag
``--<key with dashes>``, which ``python -m otel_dl.collector`` generates from the table.
Build a configuration with :func:`load_config`::

    config = load_config(Path("collector.yaml"), env=os.environ, flags={"grpc_port": 4317})

A bad value raises :class:`ConfigError` naming the source (file, variable or flag),
the key and the fix; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from otel_dl._options import (
    Check,
    ConfigError,
    Option,
    accept,
    integer,
    key_values,
    non_negative,
    number,
    open_fraction,
    optional_text,
    port,
    positive,
    text,
    unknown_variables,
)

from .tracelink import TraceLinkError, check_trace_link_template


@dataclass(frozen=True)
class CollectorConfig:
    """Resolved collector configuration."""

    host: str = "127.0.0.1"
    grpc_port: int = 4317
    http_port: int = 4318
    api_port: int = 8889
    export_endpoint: str | None = None
    export_headers: tuple[tuple[str, str], ...] = ()
    export_timeout: float = 10.0
    export_batch_spans: int = 8192
    export_max_backoff: float = 30.0
    decision_wait: float = 5.0
    early_grace: float = 1.0
    max_spans: int = 200_000
    max_traces: int = 50_000
    decision_cache_size: int = 100_000
    store: str | None = "./otel-dl.sqlite"
    catalog: str | None = None
    queue_dir: str = "./otel-dl-queue"
    queue_max_bytes: int = 256 * 1024 * 1024
    journal_fsync_ms: int = 100
    min_baseline_samples: int = 30
    fp_budget: float = 0.001
    max_request_bytes: int = 64 * 1024 * 1024
    max_request_wait: float = 2.0
    memory_limit_mib: int = 0
    max_metric_services: int = 100
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    runbook_base_url: str | None = None
    trace_link_template: str | None = None
    webhook_url: str | None = None
    webhook_dedupe_window: float = 300.0
    webhook_max_per_minute: int = 30
    webhook_retries: int = 3


def _endpoint(value: str) -> str | None:
    if value.startswith(("http://", "https://")):
        parsed = urlparse(value)
        return None if parsed.hostname else "must be an http(s):// URL with a host"
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        return "must be host:port for OTLP/gRPC or an http(s):// URL for OTLP/HTTP"
    return None


def _base_url(value: str) -> str | None:
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return None
    if parsed.scheme == "file" and parsed.path.startswith("/"):
        return None
    return (
        "must be an http(s):// URL with a host or a file:/// URL of a folder, "
        "e.g. https://wiki.example.com/otel-dl/runbooks/"
    )


def _trace_link(value: str) -> str | None:
    try:
        check_trace_link_template(value)
    except TraceLinkError as exc:
        return str(exc)
    return None


def _webhook(value: str) -> str | None:
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return None
    return "must be an http(s):// URL with a host"


def _token(value: str) -> str | None:
    # The token travels in an HTTP header and gRPC metadata: printable ASCII, no spaces.
    if not all("!" <= ch <= "~" for ch in value):
        return "must be printable ASCII without spaces"
    return None


def _readable_file(value: str) -> str | None:
    try:
        with open(value, "rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror}); give the path of an existing PEM file"
    return None


_ENV_PREFIX = "OTEL_DL_COLLECTOR_"


@dataclass(frozen=True)
class CollectorOption(Option):
    """A collector key: settable in the YAML file, by its variable and, unless secret, by a flag."""

    # A secret's value never appears in error messages (they reach logs and terminals).
    secret: bool = False
    # Shown for the flag's value in ``--help``.
    metavar: str | None = None

    @property
    def flag(self) -> str | None:
        """``--<key with dashes>``; ``None`` for a secret."""
        # No flag for a secret (auth_token, webhook_url): a command line is visible to every
        # user in the process list.
        return None if self.secret else "--" + self.name.replace("_", "-")


def _key(
    name: str,
    parse: Callable[[Any], Any],
    help: str,
    check: Check = accept,
    *,
    metavar: str | None = None,
    secret: bool = False,
) -> CollectorOption:
    env = _ENV_PREFIX + name.upper()
    return CollectorOption(name, env, parse, help, check, secret=secret, metavar=metavar)


OPTIONS: tuple[CollectorOption, ...] = (
    _key("host", text, "address the receivers and the API listen on", metavar="HOST"),
    _key("grpc_port", integer, "OTLP/gRPC receiver port", port, metavar="PORT"),
    _key("http_port", integer, "OTLP/HTTP receiver port", port, metavar="PORT"),
    _key("api_port", integer, "fault API and Prometheus metrics port", port, metavar="PORT"),
    _key(
        "export_endpoint",
        optional_text,
        "OTLP/gRPC host:port or http(s):// URL to forward to; none stores only",
        _endpoint,
        metavar="ENDPOINT",
    ),
    _key(
        "export_headers",
        key_values,
        "headers sent with every export, key=value,...",
        metavar="KEY=VALUE,...",
    ),
    _key("export_timeout", number, "seconds one export call may take", positive, metavar="SECONDS"),
    _key("export_batch_spans", integer, "most spans in one export request", positive, metavar="N"),
    _key(
        "export_max_backoff",
        number,
        "longest wait between export retries, s",
        positive,
        metavar="SECONDS",
    ),
    _key(
        "decision_wait",
        number,
        "seconds after a trace's last span before it is decided",
        non_negative,
        metavar="SECONDS",
    ),
    _key(
        "early_grace",
        number,
        "quiet seconds before an early decision",
        non_negative,
        metavar="SECONDS",
    ),
    _key(
        "max_spans",
        integer,
        "spans held in memory before the oldest trace is evicted",
        positive,
        metavar="N",
    ),
    _key(
        "max_traces",
        integer,
        "traces held in memory before the oldest is evicted",
        positive,
        metavar="N",
    ),
    _key(
        "decision_cache_size",
        integer,
        "decided traces remembered for late spans",
        positive,
        metavar="N",
    ),
    _key(
        "store",
        optional_text,
        "SQLite file for attributed faults; none disables it",
        metavar="PATH",
    ),
    _key(
        "catalog",
        optional_text,
        "YAML file with extra or overriding failure modes",
        metavar="PATH",
    ),
    _key(
        "queue_dir",
        text,
        "directory of the persistent inbox journal and export queue",
        metavar="DIR",
    ),
    _key(
        "queue_max_bytes",
        integer,
        "disk bytes before senders get back-pressure",
        positive,
        metavar="BYTES",
    ),
    _key(
        "journal_fsync_ms",
        integer,
        "most ms between fsyncs of the inbox journal; 0 fsyncs each request before "
        "acknowledging it",
        non_negative,
        metavar="MS",
    ),
    _key(
        "min_baseline_samples",
        integer,
        "samples before a learned baseline is used",
        positive,
        metavar="N",
    ),
    _key(
        "fp_budget",
        number,
        "share of healthy calls of an entry operation allowed over its SLO threshold "
        "(the threshold is that learned quantile); also the error rate below which an "
        "operation's errors are unusual, and the tail probability of an error burst",
        open_fraction,
        metavar="FRACTION",
    ),
    _key(
        "max_request_bytes",
        integer,
        "largest accepted OTLP request, after decompression, bytes",
        positive,
        metavar="BYTES",
    ),
    _key(
        "max_request_wait",
        number,
        "seconds a request may wait for a worker: one that would wait longer is refused "
        "with back-pressure as it arrives, before it is read; 0 never refuses",
        non_negative,
        metavar="SECONDS",
    ),
    _key(
        "memory_limit_mib",
        integer,
        "resident memory (MiB) to stay under: requests are held back above 75 % and "
        "refused above 80 % of it; 0 sets no limit",
        non_negative,
        metavar="MIB",
    ),
    _key(
        "max_metric_services",
        integer,
        "service names the per-service Prometheus metrics label (and dl.stage/dl.model.name"
        " pairs the operation durations label); later ones count as (other)",
        positive,
        metavar="N",
    ),
    _key(
        "auth_token",
        optional_text,
        "bearer token senders and API clients must present; unset disables auth",
        _token,
        secret=True,
    ),
    _key(
        "tls_cert",
        optional_text,
        "PEM server certificate (chain) for TLS",
        _readable_file,
        metavar="PATH",
    ),
    _key(
        "tls_key",
        optional_text,
        "PEM private key of --tls-cert",
        _readable_file,
        metavar="PATH",
    ),
    _key(
        "tls_client_ca",
        optional_text,
        "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
        _readable_file,
        metavar="PATH",
    ),
    _key(
        "runbook_base_url",
        optional_text,
        "URL the catalog's relative runbook links resolve against; unset: the runbook "
        "pages shipped in docs/runbooks",
        _base_url,
        metavar="URL",
    ),
    _key(
        "trace_link_template",
        optional_text,
        "URL of one trace in Jaeger or Tempo, with {trace_id} (and optionally {span_id}, "
        "{service}), e.g. http://jaeger:16686/trace/{trace_id}; unset: no links",
        _trace_link,
        metavar="URL",
    ),
    _key(
        "webhook_url",
        optional_text,
        "http(s):// URL the fault notifier POSTs JSON to; unset disables notifications",
        _webhook,
        secret=True,
    ),
    _key(
        "webhook_dedupe_window",
        number,
        "seconds a (mode, service) incident stays open: its later faults notify no one",
        non_negative,
        metavar="SECONDS",
    ),
    _key(
        "webhook_max_per_minute",
        integer,
        "most webhook notifications sent in any minute; the rest are dropped and counted",
        positive,
        metavar="N",
    ),
    _key(
        "webhook_retries",
        integer,
        "retries of a failed webhook delivery, with exponential backoff",
        non_negative,
        metavar="N",
    ),
)

_BY_KEY = {o.name: o for o in OPTIONS}
assert set(_BY_KEY) == {f.name for f in fields(CollectorConfig)}


def _apply(option: CollectorOption, raw: Any, source: str) -> Any:
    shown = "the value" if option.secret else repr(raw)
    try:
        value = option.parse(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid {shown} ({exc}); {option.help}") from exc
    problem = option.problem(value)
    if problem:
        raise ConfigError(f"{source}: {shown} {problem}; {option.help}")
    return value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys such as 'grpc_port: 4317'")
    for key in data:
        if key not in _BY_KEY:
            raise ConfigError(
                f"{path}: unknown key {key!r}; allowed keys: {', '.join(sorted(_BY_KEY))}"
            )
    return data


def _warn_unknown_variables(env: Mapping[str, str]) -> None:
    """Warn about ``OTEL_DL_COLLECTOR_*`` variables that name no key: a misspelt one was
    ignored without a word. A warning, not an error: an environment shared with a newer
    collector may set keys this one does not have."""
    known = {option.env for option in OPTIONS}
    for name, close in unknown_variables(env, _ENV_PREFIX, known):
        hint = f"; did you mean {close}?" if close else ""
        logging.getLogger("otel_dl.collector").warning(
            "environment variable %s names no collector key and is ignored%s", name, hint
        )


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> CollectorConfig:
    """Resolve the configuration: ``flags`` > ``env`` > the YAML file at ``path`` > defaults."""
    values: dict[str, Any] = {}
    if path is not None:
        for key, raw in _read_file(path).items():
            values[key] = _apply(_BY_KEY[key], raw, f"{path}: key '{key}'")
    for option in OPTIONS:
        if env is not None and option.env in env:
            values[option.name] = _apply(option, env[option.env], f"environment {option.env}")
    if env is not None:
        _warn_unknown_variables(env)
    for key, raw in (flags or {}).items():
        if raw is None:
            continue
        if key not in _BY_KEY:
            raise ConfigError(f"unknown option {key!r}")
        values[key] = _apply(_BY_KEY[key], raw, f"flag --{key.replace('_', '-')}")
    config = replace(CollectorConfig(), **values)
    if config.catalog is not None and not Path(config.catalog).is_file():
        raise ConfigError(
            f"catalog {config.catalog!r} is not a file; pass an existing YAML catalog "
            "with --catalog or leave it unset to use the shipped one"
        )
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError(
            "tls_cert and tls_key go together: set both to serve TLS, or neither for plain text"
        )
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("tls_client_ca (mTLS) needs TLS: set tls_cert and tls_key as well")
    return config
