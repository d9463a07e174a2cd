"""End to end against a real Jaeger: the demo pipeline with a fault, and the SDK alone.

Jaeger v2 (see ``jaeger.py`` and ``binaries.py``) runs with in-memory storage on
loopback ports. ``test_demo_fault_reaches_jaeger_attributed`` runs ``examples/pipeline/run.py``
(four services and the otel-dl collector as processes, stale features injected), the
collector exporting to Jaeger, and reads everything back through Jaeger's query API.
``test_sdk_alone_puts_dl_attributes_in_jaeger`` has a plain program, with
``otel_dl.instrument()`` and no collector, export straight to Jaeger.

These tests skip only when Jaeger is not cached and no ``go`` toolchain can build it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_dl.collector.tracelink import render_trace_link
from tests.e2e.binaries import NoGoToolchain, jaeger_binary
from tests.e2e.jaeger import Jaeger, tag_map, tag_types

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "examples" / "pipeline" / "run.py"
SERVICES = {"batch-scorer", "inference-service", "feature-service", "external-api"}
FAULT, FAULT_SERVICE, FAULT_KIND = "stale_features", "feature-service", "stale_features"


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    try:
        binary = jaeger_binary()
    except NoGoToolchain as exc:
        pytest.skip(str(exc))
    with Jaeger(binary, tmp_path_factory.mktemp("jaeger")) as running:
        yield running


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def _wait_for(query: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = query()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _span_service(trace: dict[str, Any], span: dict[str, Any]) -> str:
    return str(trace["processes"][span["processID"]]["serviceName"])


def _parent(span: dict[str, Any]) -> str | None:
    refs = [r["spanID"] for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
    return refs[0] if refs else None


@pytest.fixture(scope="module")
def demo(jaeger: Jaeger, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("demo")
    summary = work / "summary.json"
    result = subprocess.run(
        [
            *(sys.executable, str(RUNNER), "--fault", FAULT, "--work-dir", str(work)),
            *("--export-endpoint", jaeger.otlp_grpc, "--summary", str(summary)),
            *("--normal-batches", "40", "--fault-batches", "12"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert summary.exists(), result.stdout + result.stderr
    outcome = json.loads(summary.read_text())
    outcome.update(stdout=result.stdout, returncode=result.returncode, work=work)
    return outcome


@pytest.mark.timeout(300)
def test_demo_runs_and_leaves_no_process(demo: dict[str, Any]) -> None:
    assert demo["returncode"] == 0, demo["stdout"]
    assert "== otel-dl report ==" in demo["stdout"]
    assert re.search(rf"^{FAULT_SERVICE} +{FAULT_KIND} +\d+ ", demo["stdout"], re.MULTILINE)
    assert "<title>otel-dl fault report</title>" in Path(demo["html"]).read_text()
    assert _processes_mentioning(str(demo["work"])) == []


@pytest.mark.timeout(300)
def test_trace_links_open_the_trace_in_jaeger(jaeger: Jaeger, demo: dict[str, Any]) -> None:
    trace_id = demo["traces"][0]
    _wait_for(lambda: jaeger.traces(FAULT_SERVICE, tags={"dl.fault.root_cause": "true"}))
    page = render_trace_link(f"{jaeger.query}/trace/{{trace_id}}", trace_id)
    assert page is not None
    with urllib.request.urlopen(page, timeout=10) as reply:  # Jaeger's UI page of the trace
        assert reply.status == 200 and "html" in reply.headers["Content-Type"]
    # The same template over Jaeger's API: the link names exactly that trace.
    api = render_trace_link(f"{jaeger.query}/api/traces/{{trace_id}}", trace_id)
    assert api is not None
    with urllib.request.urlopen(api, timeout=10) as reply:
        (found,) = json.load(reply)["data"]
    assert found["traceID"] == trace_id and found["spans"]


@pytest.mark.timeout(300)
def test_demo_fault_reaches_jaeger_attributed(jaeger: Jaeger, demo: dict[str, Any]) -> None:
    assert set(jaeger.services()) >= SERVICES

    # The tag search finds the faulty traces, and the root-cause span names the service
    # and kind that were injected.
    tagged = _wait_for(lambda: jaeger.traces(FAULT_SERVICE, tags={"dl.fault.root_cause": "true"}))
    faulty = [t for t in tagged if t["traceID"] in set(demo["traces"])]
    stale = []
    for trace in faulty:
        (cause,) = [s for s in trace["spans"] if tag_map(s).get("dl.fault.root_cause") is True]
        assert _span_service(trace, cause) == FAULT_SERVICE
        tags = tag_map(cause)
        if tags["dl.fault.kind"] == FAULT_KIND:
            assert cause["operationName"] == "feature_store.get_online_features"
            assert tags["dl.fault.mode"] == "stale-features"
            assert tags["dl.fault.origin"] == "internal"
            assert tags["dl.feature.stale"] is True
            assert tags["dl.feature.freshness"] > 86400
            stale.append(trace["traceID"])
    # Most, not all: a sub-millisecond ASGI span that runs before the Feast read and
    # happens to be slow outranks it (a collector bug, described in docs/demo.md).
    assert len(stale) * 2 > demo["fault_batches"], (len(stale), len(faulty))

    # One faulty trace spans every service, with one root and every parent in the trace.
    trace = jaeger.trace(stale[0])
    spans = {s["spanID"]: s for s in trace["spans"]}
    assert {_span_service(trace, s) for s in spans.values()} == SERVICES
    roots = [s for s in spans.values() if _parent(s) is None]
    assert [(_span_service(trace, r), r["operationName"]) for r in roots] == [
        ("batch-scorer", "score_batch")
    ]
    assert all(_parent(s) in spans for s in spans.values() if _parent(s) is not None)
    root_tags = tag_map(roots[0])
    assert root_tags["dl.fault.root_cause.service"] == FAULT_SERVICE
    assert json.loads(root_tags["dl.fault.candidates"])[0] == FAULT_SERVICE
    # Each service's server span is the child of its caller's client span.
    callers = {
        "inference-service": "batch-scorer",
        "feature-service": "inference-service",
        "external-api": "inference-service",
    }
    for callee, caller in callers.items():
        (server,) = [
            s
            for s in spans.values()
            if _span_service(trace, s) == callee and tag_map(s).get("span.kind") == "server"
        ]
        client = spans[_parent(server)]
        assert _span_service(trace, client) == caller
        assert tag_map(client)["span.kind"] == "client"

    # dl.* attributes arrive with their types.
    by_name = {s["operationName"]: s for s in spans.values()}
    expected_types = {
        "dataloader.batch": {
            "dl.stage": "string",
            "dl.batch.index": "int64",
            "dl.batch.size": "int64",
            "dl.drift.score": "float64",
            "dl.drift.status": "string",
            "dl.quality.nan_fraction": "float64",
            "dl.data.fingerprint": "string",
        },
        "inference": {
            "dl.model.name": "string",
            "dl.model.fingerprint": "string",
            "dl.confidence.mean": "float64",
            "dl.prediction.count": "int64",
        },
        "feature_store.get_online_features": {
            "dl.feature.freshness": "float64",
            "dl.feature.stale": "bool",
            "dl.fault.root_cause": "bool",
            "dl.fault.score": "float64",
        },
    }
    for name, types in expected_types.items():
        got = tag_types(by_name[name])
        assert {k: got.get(k) for k in types} == types, name
    assert tag_map(by_name["inference"])["dl.model.name"] == "fraud-mlp"
    assert tag_map(by_name["dataloader.batch"])["dl.stage"] == "dataloader"


SDK_ONLY = """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import otel_dl

    handle = otel_dl.instrument("sdk-only-scorer", baseline_rows=512)
    x = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))
    x[2048:, 1] += 3.0  # the data drifts half way
    loader = DataLoader(TensorDataset(x), batch_size=256)
    model = otel_dl.watch(torch.nn.Linear(4, 2).eval(), name="sdk-only-model")
    with torch.no_grad():
        for (batch,) in loader:
            torch.softmax(model(batch), dim=1)
    handle.shutdown()
"""


@pytest.mark.timeout(180)
def test_sdk_alone_puts_dl_attributes_in_jaeger(jaeger: Jaeger, tmp_path: Path) -> None:
    script = tmp_path / "sdk_only.py"
    script.write_text(textwrap.dedent(SDK_ONLY))
    env = _env()
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{jaeger.otlp_grpc}", OTEL_METRICS_EXPORTER="none"
    )
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=120)

    alerts = _wait_for(lambda: jaeger.traces("sdk-only-scorer", tags={"dl.drift.status": "alert"}))
    assert alerts, "a tag search for dl.drift.status=alert finds the drifted batches"
    batch = next(s for t in alerts for s in t["spans"] if s["operationName"] == "dataloader.batch")
    types = tag_types(batch)
    assert types["dl.drift.score"] == "float64"
    assert types["dl.batch.index"] == "int64"
    assert tag_map(batch)["dl.drift.feature"] == "1"
    spans = [s for t in jaeger.traces("sdk-only-scorer") for s in t["spans"]]
    inference = [s for s in spans if s["operationName"] == "inference"]
    assert len(inference) == 16
    tags = tag_map(inference[0])
    assert tags["dl.model.name"] == "sdk-only-model"
    assert isinstance(tags["dl.confidence.mean"], float)
    assert not any(k.startswith("dl.fault.") for s in spans for k in tag_map(s))
