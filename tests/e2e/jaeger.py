"""A real Jaeger for the end-to-end tests, started per test session.

The binary is Jaeger v2 (``tests.e2e.binaries.jaeger_binary()``), an OpenTelemetry
Collector distribution configured by YAML. ``Jaeger`` writes a configuration with
in-memory storage and every listener on a loopback port the OS picks, starts it, and
wraps the query HTTP API the tests read::

    with Jaeger(jaeger_binary(), tmp / "jaeger") as jaeger:
        send_spans_to(jaeger.otlp_grpc)           # "127.0.0.1:port"
        jaeger.services(); jaeger.traces("svc", tags={"dl.fault.root_cause": "true"})
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.binaries import free_port
from tests.e2e.processes import Process


def jaeger_config(otlp_grpc: int, otlp_http: int, query_http: int, query_grpc: int) -> dict:
    """Jaeger v2 as an all-in-one: OTLP in, in-memory storage, the query API."""
    loopback = "127.0.0.1:{}".format
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["jaeger_storage_exporter"],
                }
            },
            "telemetry": {"logs": {"level": "warn"}, "metrics": {"level": "none"}},
        },
        "extensions": {
            "jaeger_query": {
                "storage": {"traces": "memstore"},
                "http": {"endpoint": loopback(query_http)},
                "grpc": {"endpoint": loopback(query_grpc)},
            },
            "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 100_000}}}},
        },
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": loopback(otlp_grpc)},
                    "http": {"endpoint": loopback(otlp_http)},
                }
            }
        },
        "processors": {"batch": {}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }


class Jaeger(Process):
    """Jaeger v2 on loopback with in-memory storage; its files go in ``directory``."""

    def __init__(self, binary: Path, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(4)]
        config = directory / "jaeger.yaml"
        config.write_text(yaml.safe_dump(jaeger_config(*ports)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        super().__init__([str(binary), f"--config={config}"], directory / "jaeger.log", env)
        self.otlp_grpc = f"127.0.0.1:{ports[0]}"
        self.query = f"http://127.0.0.1:{ports[2]}"

    def ready(self) -> bool:
        try:
            self.services()
            return True
        except OSError:
            return False

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
