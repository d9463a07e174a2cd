"""Collector configuration: YAML file, environment and flags, checked once at start.

Precedence is flag > environment (``OTEL_DL_COLLECTOR_<KEY>``) > YAML file > default.
Every key of :class:`CollectorConfig` can be set in the file; ``OPTIONS`` lists them
with their environment variable. Build a configuration with :func:`load_config`::

    config = load_config(Path("collector.yaml"), env=os.environ, flags={"grpc_port": 4317})

A bad value raises :class:`ConfigError` naming the source (file, variable or flag),
the key and the fix; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from .tracelink import TraceLinkError, check_trace_link_template


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


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


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, str):
        value = value.strip()
    out = int(value)
    if isinstance(value, float) and value != out:
        raise ValueError("expected an integer")
    return out


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("expected a finite number")
    return out


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text == "" or text.lower() == "none" else text


def _str(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("expected a non-empty string")
    return text


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        return tuple((str(k).lower(), str(v)) for k, v in value.items())
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError("expected key=value pairs separated by commas")
            pairs.append((key.strip().lower(), val.strip()))
        return tuple(pairs)
    raise ValueError("expected a mapping or key=value,key=value")


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number in 0..65535 (0 picks a free one)"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _fraction(value: float) -> str | None:
    return None if 0 < value < 1 else "must be between 0 and 1, exclusive"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _endpoint(value: str | None) -> str | None:
    if value is None:
        return None
    if value.startswith(("http://", "https://")):
        parsed = urlparse(value)
        return None if parsed.hostname else "must be an http(s):// URL with a host"
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        return "must be host:port for OTLP/gRPC or an http(s):// URL for OTLP/HTTP"
    return None


def _base_url(value: str | None) -> str | None:
    if value is None:
        return None
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return None
    if parsed.scheme == "file" and parsed.path.startswith("/"):
        return None
    return (
        "must be an http(s):// URL with a host or a file:/// URL of a folder, "
        "e.g. https://wiki.example.com/otel-dl/runbooks/"
    )


def _trace_link(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        check_trace_link_template(value)
    except TraceLinkError as exc:
        return str(exc)
    return None


def _webhook(value: str | None) -> str | None:
    if value is None:
        return None
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return None
    return "must be an http(s):// URL with a host"


def _token(value: str | None) -> str | None:
    if value is None:
        return None
    # The token travels in an HTTP header and gRPC metadata: printable ASCII, no spaces.
    if not all("!" <= ch <= "~" for ch in value):
        return "must be printable ASCII without spaces"
    return None


def _readable_file(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        with open(value, "rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror}); give the path of an existing PEM file"
    return None


@dataclass(frozen=True)
class Option:
    """One configuration key: how to parse it and what makes it valid."""

    key: str
    parse: Callable[[Any], Any]
    check: Callable[[Any], str | None]
    help: str
    # A secret's value never appears in error messages (they reach logs and terminals).
    secret: bool = False

    @property
    def env(self) -> str:
        return "OTEL_DL_COLLECTOR_" + self.key.upper()


def _ok(_value: Any) -> str | None:
    return None


OPTIONS: tuple[Option, ...] = (
    Option("host", _str, _ok, "address the receivers and the API listen on"),
    Option("grpc_port", _int, _port, "OTLP/gRPC receiver port"),
    Option("http_port", _int, _port, "OTLP/HTTP receiver port"),
    Option("api_port", _int, _port, "fault API and Prometheus metrics port"),
    Option(
        "export_endpoint",
        _optional_str,
        _endpoint,
        "OTLP/gRPC host:port or http(s):// URL to forward to; none stores only",
    ),
    Option("export_headers", _headers, _ok, "headers sent with every export, key=value,..."),
    Option("export_timeout", _float, _positive, "seconds one export call may take"),
    Option("export_batch_spans", _int, _positive, "most spans in one export request"),
    Option("export_max_backoff", _float, _positive, "longest wait between export retries, s"),
    Option("decision_wait", _float, _non_negative, "seconds after a trace's last span"),
    Option("early_grace", _float, _non_negative, "quiet seconds before an early decision"),
    Option("max_spans", _int, _positive, "spans held in memory before the oldest trace is evicted"),
    Option("max_traces", _int, _positive, "traces held in memory before the oldest is evicted"),
    Option("decision_cache_size", _int, _positive, "decided traces remembered for late spans"),
    Option("store", _optional_str, _ok, "SQLite file for attributed faults; none disables it"),
    Option("catalog", _optional_str, _ok, "YAML file with extra or overriding failure modes"),
    Option("queue_dir", _str, _ok, "directory of the persistent inbox journal and export queue"),
    Option("queue_max_bytes", _int, _positive, "disk bytes before senders get back-pressure"),
    Option("min_baseline_samples", _int, _positive, "samples before a learned baseline is used"),
    Option(
        "fp_budget",
        _float,
        _fraction,
        "share of healthy calls of an entry operation allowed over its SLO threshold "
        "(the threshold is that learned quantile); also the error rate below which an "
        "operation's errors are unusual, and the tail probability of an error burst",
    ),
    Option("max_request_bytes", _int, _positive, "largest accepted OTLP request, bytes"),
    Option(
        "max_request_wait",
        _float,
        _non_negative,
        "seconds a request may wait for a worker before it is refused with back-pressure; "
        "0 never refuses",
    ),
    Option(
        "memory_limit_mib",
        _int,
        _non_negative,
        "resident memory (MiB) to stay under: new data is refused with back-pressure above "
        "80 % of it; 0 sets no limit",
    ),
    Option(
        "max_metric_services",
        _int,
        _positive,
        "service names the per-service Prometheus metrics label; later ones count as (other)",
    ),
    Option(
        "auth_token",
        _optional_str,
        _token,
        "bearer token senders and API clients must present; unset disables auth",
        secret=True,
    ),
    Option("tls_cert", _optional_str, _readable_file, "PEM server certificate (chain) for TLS"),
    Option("tls_key", _optional_str, _readable_file, "PEM private key of --tls-cert"),
    Option(
        "tls_client_ca",
        _optional_str,
        _readable_file,
        "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
    ),
    Option(
        "runbook_base_url",
        _optional_str,
        _base_url,
        "URL the catalog's relative runbook links resolve against; unset: the runbook "
        "pages shipped in docs/runbooks",
    ),
    Option(
        "trace_link_template",
        _optional_str,
        _trace_link,
        "URL of one trace in Jaeger or Tempo, with {trace_id} (and optionally {span_id}, "
        "{service}), e.g. http://jaeger:16686/trace/{trace_id}; unset: no links",
    ),
    Option(
        "webhook_url",
        _optional_str,
        _webhook,
        "http(s):// URL the fault notifier POSTs JSON to; unset disables notifications",
        secret=True,
    ),
    Option(
        "webhook_dedupe_window",
        _float,
        _non_negative,
        "seconds a (mode, service) incident stays open: its later faults notify no one",
    ),
    Option(
        "webhook_max_per_minute",
        _int,
        _positive,
        "most webhook notifications sent in any minute; the rest are dropped and counted",
    ),
    Option(
        "webhook_retries",
        _int,
        _non_negative,
        "retries of a failed webhook delivery, with exponential backoff",
    ),
)
_BY_KEY = {o.key: o for o in OPTIONS}
assert set(_BY_KEY) == {f.name for f in fields(CollectorConfig)}


def _apply(option: Option, raw: Any, source: str) -> Any:
    shown = "the value" if option.secret else repr(raw)
    try:
        value = option.parse(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid {shown} ({exc}); {option.help}") from exc
    problem = option.check(value)
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
            values[option.key] = _apply(option, env[option.env], f"environment {option.env}")
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
