"""A real Jaeger for the end-to-end tests, started per test session.

The binary comes from ``tests.e2e.binaries.jaeger_binary()``: Jaeger all-in-one
v1.48.0, the last all-in-one of Jaeger v1, which has an OTLP receiver. (Jaeger v2 at its
v2.20.0 commit is what the end-to-end issue names, but the Go module proxy answers 403
"This module version is not available" for both the commit and the tag.)

``Jaeger`` starts it with in-memory storage and every listener on a loopback port the OS
picks, and wraps the query HTTP API the tests read::

    with Jaeger(jaeger_binary()) as jaeger:
        send_spans_to(jaeger.otlp_grpc)           # "127.0.0.1:port"
        jaeger.services(); jaeger.traces("svc", tags={"dl.fault.root_cause": "true"})
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.e2e.binaries import free_port


class Jaeger:
    """A Jaeger all-in-one process on loopback with in-memory storage."""

    def __init__(self, binary: Path, log: Path) -> None:
        self.binary = binary
        self.log = log
        self.ports = {
            name: free_port()
            for name in (
                *("otlp_grpc", "otlp_http", "query", "query_grpc", "admin", "collector_grpc"),
                *("collector_http", "sampling", "compact", "binary", "zipkin_compact"),
            )
        }
        self.otlp_grpc = f"127.0.0.1:{self.ports['otlp_grpc']}"
        self.query = f"http://127.0.0.1:{self.ports['query']}"
        self._proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        flags = {
            "collector.otlp.enabled": "true",
            "collector.otlp.grpc.host-port": "otlp_grpc",
            "collector.otlp.http.host-port": "otlp_http",
            "query.http-server.host-port": "query",
            "query.grpc-server.host-port": "query_grpc",
            "admin.http.host-port": "admin",
            "collector.grpc-server.host-port": "collector_grpc",
            "collector.http-server.host-port": "collector_http",
            "http-server.host-port": "sampling",
            "processor.jaeger-compact.server-host-port": "compact",
            "processor.jaeger-binary.server-host-port": "binary",
            "processor.zipkin-compact.server-host-port": "zipkin_compact",
        }
        argv = [str(self.binary)]
        for flag, port in flags.items():
            value = port if port == "true" else f"127.0.0.1:{self.ports[port]}"
            argv.append(f"--{flag}={value}")
        return argv

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        # Jaeger traces itself to localhost:4317 by default, where another process may
        # listen: its own spans are switched off and pointed at its own receiver.
        env.update(
            SPAN_STORAGE_TYPE="memory",
            OTEL_TRACES_SAMPLER="always_off",
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://{self.otlp_grpc}",
        )
        return env

    def __enter__(self) -> Jaeger:
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(
                self._argv(),
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Jaeger exited at start; see {self.log}")
            try:
                self.services()
                return self
            except OSError:
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise TimeoutError(f"Jaeger's query API did not answer in 60 s; see {self.log}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._proc = None

    def _get(self, path: str, **query: str) -> Any:
        url = f"{self.query}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)["data"]

    def services(self) -> list[str]:
        return sorted(self._get("/api/services") or [])

    def traces(
        self, service: str, tags: dict[str, str] | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Traces of ``service`` (Jaeger's JSON), filtered by span tags when given."""
        query = {"service": service, "limit": str(limit), "lookback": "1h"}
        if tags:
            query["tags"] = json.dumps(tags)
        return list(self._get("/api/traces", **query) or [])

    def trace(self, trace_id: str) -> dict[str, Any]:
        (found,) = self._get(f"/api/traces/{trace_id}")
        return dict(found)


def tag_map(span: dict[str, Any]) -> dict[str, Any]:
    """A Jaeger JSON span's tags as ``{key: value}``."""
    return {t["key"]: t["value"] for t in span.get("tags", [])}


def tag_types(span: dict[str, Any]) -> dict[str, str]:
    """A Jaeger JSON span's tags as ``{key: Jaeger type}`` (string, bool, int64, float64)."""
    return {t["key"]: t["type"] for t in span.get("tags", [])}
