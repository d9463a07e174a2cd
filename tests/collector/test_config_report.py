"""Configuration and catalog validation, the CLIs and the report."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import otel_dl
from otel_dl.collector.__main__ import build_parser, config_from_args, main
from otel_dl.collector.catalog import CatalogError, load_catalog
from otel_dl.collector.config import OPTIONS, ConfigError, load_config
from otel_dl.collector.report import main as report_main
from otel_dl.collector.report import report
from otel_dl.collector.store import query_faults


def test_precedence_flag_over_env_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpc_port: 1000\nhttp_port: 1001\ndecision_wait: 2\n")
    config = load_config(
        path,
        {"OTEL_DL_COLLECTOR_HTTP_PORT": "2001", "OTEL_DL_COLLECTOR_GRPC_PORT": "2000"},
        {"grpc_port": "3000"},
    )
    assert (config.grpc_port, config.http_port, config.decision_wait) == (3000, 2001, 2.0)
    assert load_config(flags={"store": "none"}).store is None


@pytest.mark.parametrize(
    ("text", "env", "flags", "needle"),
    [
        ("grpc_prot: 1\n", {}, {}, "unknown key 'grpc_prot'"),
        ("decision_wait: soon\n", {}, {}, "key 'decision_wait'"),
        ("", {"OTEL_DL_COLLECTOR_API_PORT": "70000"}, {}, "OTEL_DL_COLLECTOR_API_PORT"),
        ("", {}, {"export_endpoint": "nohost"}, "flag --export-endpoint"),
        ("", {}, {"catalog": "/nonexistent.yaml"}, "--catalog"),
        ("fp_budget: 1.5\n", {}, {}, "between 0 and 1"),
        ("", {"OTEL_DL_COLLECTOR_FP_BUDGET": "0"}, {}, "OTEL_DL_COLLECTOR_FP_BUDGET"),
    ],
)
def test_bad_configuration_names_source_key_and_fix(tmp_path, text, env, flags, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("'", ".")):
        load_config(path, env, flags)


def test_catalog_override_and_errors(tmp_path):
    extra = tmp_path / "modes.yaml"
    extra.write_text(
        "modes:\n  - id: data-drift\n    kind: data_drift\n    origin: internal\n"
        "    detect: [{signal: dl.drift.score, above: 0.5}]\n    severity: low\n"
        "    owner: me\n    mitigation: m\n    runbook: https://r\n"
    )
    catalog = load_catalog(extra)
    assert catalog.by_id("data-drift").owner == "me"
    kinds = {m.kind for m in load_catalog().modes}
    assert len(kinds) == 9
    extra.write_text(extra.read_text().replace("data_drift", "drifty"))
    with pytest.raises(CatalogError, match=r"modes.yaml: mode 'data-drift' field 'kind'"):
        load_catalog(extra)
    extra.write_text(
        extra.read_text()
        .replace("kind: drifty", "kind: data_drift")
        .replace("above: 0.5", "abov: 0.5")
    )
    with pytest.raises(CatalogError, match=r"mode 'data-drift' field 'detect'\[0\]"):
        load_catalog(extra)


def test_collector_cli_refuses_bad_config(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("grpc_port: -5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "otel_dl.collector", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "c.yaml: key 'grpc_port'" in proc.stderr


# The flags the command line had before they were generated from OPTIONS.
EARLIER_FLAGS = (
    "--grpc-port",
    "--http-port",
    "--host",
    "--export-endpoint",
    "--decision-wait",
    "--store",
    "--catalog",
    "--api-port",
    "--max-request-bytes",
    "--max-request-wait",
    "--memory-limit-mib",
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
)


@pytest.fixture
def clean_environment(monkeypatch):
    """main() reads os.environ: no OTEL_DL_COLLECTOR_* variable of the caller's."""
    for name in [n for n in os.environ if n.startswith("OTEL_DL_COLLECTOR_")]:
        monkeypatch.delenv(name)


def test_every_key_but_a_secret_has_a_flag(capsys):
    parser = build_parser()
    for option in OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        if option.name in ("auth_token", "webhook_url"):
            assert option.flag is None
            with pytest.raises(SystemExit) as exited:
                parser.parse_args([flag, "x"])
            assert exited.value.code == 2
            assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
        else:
            assert option.flag == flag
            assert getattr(parser.parse_args([flag, "x"]), option.name) == "x"
    assert set(EARLIER_FLAGS) <= {option.flag for option in OPTIONS}
    # An absent flag leaves the key to the environment and the file.
    args = parser.parse_args([])
    assert all(getattr(args, o.name) is None for o in OPTIONS if o.flag)
    assert (args.config, args.log_level) == (None, "INFO")


def test_generated_flags_reach_the_configuration(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fp_budget: 0.2\nearly_grace: 3\nwebhook_retries: 1\nmax_spans: 10\n")
    argv = ["--config", str(path), "--fp-budget", "0.5", "--early-grace", "2.5"]
    argv += ["--export-headers", "X-Team=ml", "--store", "none"]
    env = {"OTEL_DL_COLLECTOR_EARLY_GRACE": "4", "OTEL_DL_COLLECTOR_WEBHOOK_RETRIES": "5"}
    config = config_from_args(build_parser().parse_args(argv), env)
    assert (config.fp_budget, config.early_grace, config.export_headers) == (
        0.5,
        2.5,
        (("x-team", "ml"),),
    )
    assert (config.store, config.webhook_retries, config.max_spans) == (None, 5, 10)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--fp-budget", "1.5"], "flag --fp-budget: '1.5' must be between 0 and 1, exclusive"),
        (["--early-grace", "soon"], "flag --early-grace: invalid 'soon'"),
        (["--grpc-port", "70000"], "flag --grpc-port: '70000' must be a port number"),
    ],
)
def test_a_bad_flag_value_exits_2_naming_the_flag(capsys, clean_environment, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("otel-dl-collector: configuration error: ") and needle in err


def test_a_misspelt_environment_variable_is_named_with_the_likely_key(caplog):
    env = {"OTEL_DL_COLLECTOR_GRPC_PROT": "5", "OTEL_DL_COLLECTOR_HTTP_PORT": "4318"}
    with caplog.at_level("WARNING", logger="otel_dl.collector"):
        config = load_config(env=env)
    assert config.http_port == 4318
    (record,) = caplog.records
    assert record.getMessage() == (
        "environment variable OTEL_DL_COLLECTOR_GRPC_PROT names no collector key and is "
        "ignored; did you mean OTEL_DL_COLLECTOR_GRPC_PORT?"
    )


def test_a_bad_log_level_exits_2_listing_the_levels(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--log-level", "LOUD"])
    assert exited.value.code == 2
    assert "DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'" in capsys.readouterr().err
    assert build_parser().parse_args(["--log-level", "debug"]).log_level == "DEBUG"


def test_a_grpc_port_in_use_exits_2_naming_the_flag(tmp_path):
    """grpcio raises RuntimeError where older releases returned 0: the start still ends
    with the message and exit 2, not a traceback."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        argv = ["--grpc-port", str(port), "--http-port", "0", "--api-port", "0"]
        argv += ["--store", "none", "--queue-dir", str(tmp_path / "q")]
        proc = subprocess.run(
            [sys.executable, "-m", "otel_dl.collector", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen for OTLP/gRPC on 127.0.0.1:{port}" in proc.stderr
    assert "--grpc-port" in proc.stderr and "Traceback" not in proc.stderr


def test_a_path_that_cannot_be_made_names_its_key(tmp_path, capsys, clean_environment):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["--grpc-port", "0", "--http-port", "0", "--api-port", "0", "--store", "none"]
    assert main([*argv, "--queue-dir", str(blocker / "q")]) == 2
    err = capsys.readouterr().err
    assert f"queue_dir = '{blocker / 'q'}'" in err
    assert "--queue-dir, OTEL_DL_COLLECTOR_QUEUE_DIR or the 'queue_dir' key" in err


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    flagged = [option for option in OPTIONS if option.flag]
    for option in flagged:
        assert f"{option.flag} {option.metavar} {option.help} (default: " in text
    assert text.count("(default: ") == len(flagged) + 1  # and --log-level
    assert "--grpc-port PORT OTLP/gRPC receiver port (default: 4317)" in text
    assert "--fp-budget FRACTION" in text and "(default: 0.001)" in text
    assert "(default: ./otel-dl.sqlite)" in text and "80 % of it" in text
    assert "--auth-token" not in text and "--webhook-url" not in text


def test_one_config_error_for_the_sdk_and_the_collector():
    assert ConfigError is otel_dl.ConfigError


def test_docs_list_every_collector_key():
    doc = (Path(__file__).parents[2] / "docs" / "collector.md").read_text()
    section = doc.split("### Configuration keys", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(\w+)`", "".join(re.findall(r"^\|([^|]+)\|", section, re.M))))
    assert listed == {option.name for option in OPTIONS}


def test_report_table_and_html(tmp_path, make_collector, wait_for):
    collector = make_collector()
    request = ExportTraceServiceRequest()
    for service, span_id, parent, error in (("frontend", 1, None, True), ("prep", 2, 1, True)):
        rs = request.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", service
        span = rs.scope_spans.add().spans.add()
        span.trace_id, span.span_id = (7).to_bytes(16, "big"), span_id.to_bytes(8, "big")
        if parent:
            span.parent_span_id = parent.to_bytes(8, "big")
        span.name, span.status.code = f"op-{span_id}", 2 if error else 0
        span.start_time_unix_nano, span.end_time_unix_nano = 10**18, 10**18 + 10**6
        conf = span.attributes.add()
        conf.key, conf.value.double_value = "dl.confidence.mean", 0.9
    collector.ingest(request, None)
    store = tmp_path / "faults.sqlite"
    out = io.StringIO()
    wait_for(lambda: report(store, "1h", None, out) == 0 and "prep" in out.getvalue())
    assert "error" in out.getvalue() and (7).to_bytes(16, "big").hex() in out.getvalue()
    html_path = tmp_path / "r.html"
    assert report_main(["report", "--store", str(store), "--html", str(html_path)]) == 0
    page = html_path.read_text()
    assert "data:image/png;base64" in page and "runbooks/internal-error.md" in page
    assert report_main(["report", "--store", str(tmp_path / "missing.sqlite")]) == 2
    # Trace links: every trace id of the page links to the trace; a bad template is refused.
    template = "http://jaeger:16686/trace/{trace_id}"
    linked = ["report", "--store", str(store), "--html", str(html_path)]
    assert report_main([*linked, "--trace-link-template", template]) == 0
    trace_id = (7).to_bytes(16, "big").hex()
    assert f'href="http://jaeger:16686/trace/{trace_id}"' in html_path.read_text()
    assert report_main([*linked, "--trace-link-template", "http://jaeger/{trace}"]) == 2


@pytest.mark.parametrize(
    ("condition", "needle"),
    [
        ("{signal: duration, above_baseline: 2.0, min_excess: -1}", "'min_excess' must be"),
        ("{signal: duration, above_baseline: 2.0, min_excess: .nan}", "'min_excess' must be"),
        ("{signal: duration, above: 2.0, min_excess: 0.1}", "only with 'above_baseline'"),
    ],
)
def test_catalog_refuses_a_bad_min_excess(tmp_path, condition, needle):
    extra = tmp_path / "modes.yaml"
    extra.write_text(
        f"modes:\n  - id: x\n    kind: latency\n    origin: internal\n"
        f"    detect: [{condition}]\n"
        "    severity: low\n    owner: o\n    mitigation: m\n    runbook: r\n"
    )
    with pytest.raises(CatalogError, match=needle):
        load_catalog(extra)


def test_timelines_break_the_line_across_gaps():
    from otel_dl.collector.report import break_gaps

    xs, ys = break_gaps([0, 1, 2, 3, 60, 61, 62], [1, 1, 1, 1, 9, 9, 9])
    assert len(xs) == 8 and math.isnan(ys[4]) and 3 < xs[4] < 60
    # Evenly spaced samples stay one line.
    assert break_gaps([0, 1, 2, 3], [1, 2, 3, 4]) == ([0, 1, 2, 3], [1, 2, 3, 4])


def test_report_counts_are_pluralised():
    from otel_dl.collector.report import plural, render_html, summarise
    from otel_dl.collector.store import FaultRow

    assert (plural(1, "fault"), plural(2, "fault"), plural(0, "fault")) == (
        "1 fault",
        "2 faults",
        "0 faults",
    )
    row = FaultRow(
        "ab", 0.0, "svc", "cd", "span", "error", "m", "internal", 1.0, "high", "o", "r", "e", ()
    )
    assert "1 attributed fault." in render_html(summarise([row]), [row], [], [], "1h")


def _faulty_traces(
    service: str, first: int, n: int, stale: bool = False
) -> ExportTraceServiceRequest:
    """``n`` one-span traces of ``service``, each a fault: an error, or stale features."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = service
    spans = rs.scope_spans.add().spans
    for i in range(first, first + n):
        span = spans.add(
            trace_id=i.to_bytes(16, "big"),
            span_id=(1).to_bytes(8, "big"),
            name="op",
            start_time_unix_nano=10**18,
            end_time_unix_nano=10**18 + 10**6,
        )
        if stale:
            span.attributes.add(key="dl.feature.freshness").value.double_value = 200_000.0
        else:
            span.status.code = 2
    return request


def test_fault_api_filters_in_the_query_not_in_the_newest_rows(tmp_path, make_collector, wait_for):
    """A service's faults older than ``limit`` x 10 rows of other services are still found."""
    collector = make_collector()
    store = tmp_path / "faults.sqlite"
    api = f"http://127.0.0.1:{collector.api_port}/api/faults"

    def count() -> int:
        return len(requests.get(f"{api}?limit=10000", timeout=5).json()["faults"])

    # Oldest first: 202 errors and 10 stale-feature faults of feature-service, then 120
    # faults of other services, more than limit x 10 = 50 newer rows for limit=5.
    collector.ingest(_faulty_traces("feature-service", 1, 202), None)
    wait_for(lambda: count() == 202)
    collector.ingest(_faulty_traces("feature-service", 1000, 10, stale=True), None)
    wait_for(lambda: count() == 212)
    for k in range(6):
        collector.ingest(_faulty_traces(f"other-{k}", 2000 + 100 * k, 20), None)
    wait_for(lambda: count() == 332)

    def get(query: str) -> list[dict]:
        resp = requests.get(f"{api}?{query}", timeout=5)
        assert resp.status_code == 200, resp.text
        return resp.json()["faults"]

    newest = get("limit=5")
    assert [f["service"].startswith("other-") for f in newest] == [True] * 5
    mine = get("service=feature-service&limit=5")
    assert [(f["service"], f["kind"]) for f in mine] == [("feature-service", "stale_features")] * 5
    times = [f["time"] for f in mine]
    assert times == sorted(times, reverse=True)
    errors = get("service=feature-service&kind=error&limit=5")
    assert [(f["service"], f["kind"]) for f in errors] == [("feature-service", "error")] * 5
    assert len(get("service=feature-service&kind=error&limit=10000")) == 202
    assert len(get("kind=stale_features&limit=10000")) == 10
    assert get("service=nobody&limit=5") == []
    # Through the store's own query too, with a time window.
    window = query_faults(store, since=mine[-1]["time"], service="feature-service")
    assert [r.trace_id for r in window] == [f["trace_id"] for f in mine]
