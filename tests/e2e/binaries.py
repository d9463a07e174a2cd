"""Go-built programs the end-to-end tests and benchmarks run, built once and cached.

Each function returns a binary under ``~/.cache/otel-dl/bin``, building it the first
time, or raises ``NoGoToolchain`` when it is not cached and no ``go`` command exists.
``python -m tests.e2e.binaries`` builds them all (the Makefile's test target runs it,
so a build is never counted in a test's timeout); the first build on a bare machine
takes several minutes each, later runs reuse the cache.

- ``jaeger_binary()``: Jaeger v2 (``cmd/jaeger``), an OpenTelemetry Collector
  distribution: the end-to-end tests' backend, and the ``tail_sampling`` pipeline of the
  side-by-side benchmark. The Go module proxy refuses the v2.20.0 commit and tag ("This
  module version is not available"); the newest tag it serves, v1.76.0 (the module's v1
  tag of a Jaeger v2 release, built on Collector v0.140), has a ``replace`` directive that
  ``go install`` rejects, so the module is downloaded (``go mod download``) and built as
  the main module instead. ``OTEL_DL_JAEGER_BIN`` overrides the path.
- ``hotrod_binary()``: Jaeger's HotROD demo (``examples/hotrod`` of the same module and
  version), a real multi-service Go application exporting OTLP: the real-trace bench
  ``benchmarks/rca_real.py``. Built from the downloaded module like Jaeger itself.
  ``OTEL_DL_HOTROD_BIN`` overrides the path.
- ``otelcol_binary()``: a small OpenTelemetry Collector built with the official builder
  from ``examples/deploy/otelcol/builder.yaml`` (otlp receiver, loadbalancing and otlp
  exporters, tail_sampling). The cached name carries a hash of the manifest, so editing
  the manifest rebuilds it.
- ``toxiproxy_binary()``: Shopify's toxiproxy (``go install``), a TCP proxy that
  injects latency, timeouts and resets into one link: the network faults of
  ``benchmarks/rca_real.py``. Like HotROD, built on demand: no test runs it.
- ``promtool_binary()`` and ``amtool_binary()``: Prometheus' and Alertmanager's own
  checkers (``go install``), for the alerting rules and routes generated from the
  catalog (tests/collector/test_alerts.py). promtool takes about 7 minutes to build
  cold on two cores.
- ``telemetrygen_binary()``: opentelemetry-collector-contrib's load generator
  (``go install``, about 40 s): the side-by-side benchmark's load from a client the
  project did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE_BIN = Path.home() / ".cache" / "otel-dl" / "bin"
BUILD_TIMEOUT_SECONDS = 2400

JAEGER = ("github.com/jaegertracing/jaeger", "v1.76.0")
BUILDER = ("go.opentelemetry.io/collector/cmd/builder", "v0.160.0")
PROMTOOL = ("github.com/prometheus/prometheus/cmd/promtool", "v0.316.0")
AMTOOL = ("github.com/prometheus/alertmanager/cmd/amtool", "v0.35.0")
TOXIPROXY = ("github.com/Shopify/toxiproxy/v2/cmd/server", "v2.5.0")
TELEMETRYGEN = (
    "github.com/open-telemetry/opentelemetry-collector-contrib/cmd/telemetrygen",
    "v0.160.0",
)
OTELCOL_MANIFEST = ROOT / "examples" / "deploy" / "otelcol" / "builder.yaml"


class NoGoToolchain(RuntimeError):
    """A binary is not cached and cannot be built: there is no ``go`` command."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cached(binary: Path) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK)


def _go(what: str) -> str:
    go = shutil.which("go")
    if go is None:
        raise NoGoToolchain(
            f"{what} is not in {CACHE_BIN} and no `go` command is on PATH to build it"
        )
    return go


def _go_install(module: str, version: str, binary: Path) -> Path:
    go = _go(f"{module}@{version}")
    CACHE_BIN.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [go, "install", f"{module}@{version}"],
        env={**os.environ, "GOBIN": str(CACHE_BIN)},
        check=True,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    return binary


def _build_from_jaeger_module(what: str, package: str, binary: Path) -> Path:
    """Build ``package`` of the Jaeger module as the main module: ``go install`` rejects
    the module's ``replace`` directive, a build inside the downloaded module honours it."""
    module, version = JAEGER
    go = _go(f"{what} ({module}@{version})")
    downloaded = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    source = json.loads(downloaded.stdout)["Dir"]
    CACHE_BIN.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [go, "build", "-o", str(binary), package],
        cwd=source,
        check=True,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    return binary


def jaeger_binary() -> Path:
    """Jaeger v2 (an OpenTelemetry Collector distribution), built from its module."""
    override = os.environ.get("OTEL_DL_JAEGER_BIN")
    binary = Path(override) if override else CACHE_BIN / f"jaeger-{JAEGER[1]}"
    if _cached(binary):
        return binary
    return _build_from_jaeger_module("Jaeger v2", "./cmd/jaeger", binary)


def hotrod_binary() -> Path:
    """Jaeger's HotROD demo application, built from the Jaeger module."""
    override = os.environ.get("OTEL_DL_HOTROD_BIN")
    binary = Path(override) if override else CACHE_BIN / f"hotrod-{JAEGER[1]}"
    if _cached(binary):
        return binary
    return _build_from_jaeger_module("HotROD", "./examples/hotrod", binary)


def _go_tool(module: str, version: str, cached_as: str | None = None) -> Path:
    """A Go command, built with ``go install`` into a scratch GOBIN and cached by version
    (as ``cached_as`` when the command's own name, such as ``server``, says too little)."""
    name = module.rsplit("/", 1)[-1]
    binary = CACHE_BIN / f"{cached_as or name}-{version}"
    if _cached(binary):
        return binary
    go = _go(f"{module}@{version}")
    CACHE_BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="otel-dl-go-") as gobin:
        subprocess.run(
            [go, "install", f"{module}@{version}"],
            env={**os.environ, "GOBIN": gobin},
            check=True,
            timeout=BUILD_TIMEOUT_SECONDS,
        )
        shutil.move(Path(gobin) / name, binary)
    return binary


def promtool_binary() -> Path:
    """Prometheus' ``promtool``."""
    return _go_tool(*PROMTOOL)


def amtool_binary() -> Path:
    """Alertmanager's ``amtool``."""
    return _go_tool(*AMTOOL)


def telemetrygen_binary() -> Path:
    """opentelemetry-collector-contrib's ``telemetrygen`` load generator."""
    return _go_tool(*TELEMETRYGEN)


def toxiproxy_binary() -> Path:
    """Toxiproxy, a TCP proxy that injects network faults (latency, timeouts, resets)."""
    return _go_tool(*TOXIPROXY, cached_as="toxiproxy")


def otelcol_binary() -> Path:
    """The OpenTelemetry Collector of ``examples/deploy/otelcol/builder.yaml``."""
    manifest = OTELCOL_MANIFEST.read_bytes()
    binary = CACHE_BIN / f"otelcol-otel-dl-{hashlib.sha256(manifest).hexdigest()[:10]}"
    if _cached(binary):
        return binary
    builder = CACHE_BIN / "builder"
    if not _cached(builder):
        _go_install(*BUILDER, builder)
    with tempfile.TemporaryDirectory(prefix="otel-dl-ocb-") as work:
        (Path(work) / "builder.yaml").write_bytes(manifest)
        subprocess.run(
            [str(builder), "--config", "builder.yaml"],
            cwd=work,
            check=True,
            timeout=BUILD_TIMEOUT_SECONDS,
        )
        shutil.move(Path(work) / "otelcol-otel-dl" / "otelcol-otel-dl", binary)
    return binary


if __name__ == "__main__":
    # HotROD and toxiproxy are built on demand by benchmarks/rca_real.py: no test runs them.
    builds = (jaeger_binary, otelcol_binary, promtool_binary, amtool_binary, telemetrygen_binary)
    for build in builds:
        try:
            print(build())
        except NoGoToolchain as exc:
            print(f"skipping a Go build: {exc}", file=sys.stderr)
