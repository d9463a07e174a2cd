"""Two real services on loopback join one trace through otel_dl.instrument() alone.

Service B is a FastAPI app under uvicorn in its own process, exporting over real OTLP to
a loopback receiver. Service A is this test process, calling B with requests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.trace import SpanKind

import otel_dl
from tests.collector.conftest import time_until
from tests.otlp_sink import OtlpSink
from tests.support import SpanList

SERVICE_B = """
    import sys

    import numpy as np
    import uvicorn
    from fastapi import FastAPI

    import otel_dl

    otel_dl.instrument("service-b", metrics_exporter="none")
    app = FastAPI()

    @otel_dl.stage("featurise")
    def featurise(n: int) -> np.ndarray:
        return np.ones((n, 3), dtype=np.float32)

    @app.get("/score")
    def score(n: int = 4) -> dict[str, int]:
        return {"rows": int(featurise(n).shape[0])}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service B exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("service B did not start")


def _server_spans(sink: OtlpSink) -> list[Any]:
    return [
        span
        for rs in sink.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
        if span.kind == span.SPAN_KIND_SERVER
    ]


@pytest.mark.timeout(120)
def test_http_call_between_two_services_is_one_trace(tmp_path: Path, spans: SpanList) -> None:
    script = tmp_path / "service_b.py"
    script.write_text(textwrap.dedent(SERVICE_B))
    port = _free_port()
    with OtlpSink() as sink:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port)], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait_until_up(f"127.0.0.1:{port}", proc)
            handle = otel_dl.instrument()
            try:
                assert "requests" in handle.instrumented
                response = requests.get(f"http://127.0.0.1:{port}/score?n=5", timeout=10)
            finally:
                handle.shutdown()
            assert response.json() == {"rows": 5}
            # The server span ends after the response, and the ASGI instrumentation may
            # export its internal send spans before it: wait for the server span itself.
            time_until(lambda: _server_spans(sink), 20, 0.05)
            names = sink.span_names()
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    (client,) = [s for s in spans.get() if s.kind is SpanKind.CLIENT]
    remote = {
        span.name: (span, rs.resource)
        for rs in sink.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    }
    assert "featurise" in names, names
    assert _server_spans(sink), names
    (server,) = _server_spans(sink)
    featurise = remote["featurise"][0]
    client_ctx = client.get_span_context()
    assert server.trace_id == client_ctx.trace_id.to_bytes(16, "big")
    assert server.parent_span_id == client_ctx.span_id.to_bytes(8, "big")
    assert featurise.trace_id == server.trace_id
    # featurise runs inside the FastAPI handler, under the server span (possibly via its
    # internal spans), so its chain of parents reaches the server span.
    by_id = {span.span_id: span for span, _ in remote.values()}
    parent = featurise.parent_span_id
    while parent and parent != server.span_id:
        parent = by_id[parent].parent_span_id
    assert parent == server.span_id
    service = {kv.key: kv.value.string_value for kv in remote["featurise"][1].attributes}
    assert service["service.name"] == "service-b"


def test_an_app_made_from_fastapi_imported_before_instrument_gets_its_server_span(
    spans: SpanList,
) -> None:
    # This module imported FastAPI at the top, as a service does before calling
    # instrument() in main(); the app is made after instrument().
    before = FastAPI.__init__
    handle = otel_dl.instrument(include=["fastapi"])
    try:
        assert "fastapi" in handle.instrumented
        app = FastAPI()

        @app.get("/ping")
        def ping() -> dict[str, bool]:
            return {"ok": True}

        with TestClient(app) as client:
            assert client.get("/ping").json() == {"ok": True}
    finally:
        handle.shutdown()
    server = [s for s in spans.get() if s.kind is SpanKind.SERVER]
    assert [s.name for s in server] == ["GET /ping"]
    assert server[0].instrumentation_scope.name == "opentelemetry.instrumentation.fastapi"
    # shutdown() takes the class back as it was.
    assert FastAPI.__init__ is before
    spans.clear()
    app = FastAPI()
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
