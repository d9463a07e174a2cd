"""Security: bearer-token auth and TLS / mTLS on both receivers and the API, no payload
values in logs, the store or the report, and owner-only files.

The CA, server and client certificates are generated for each test module with the
``cryptography`` package and live only in the test's temporary directory.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import logging
import ssl
import stat
from pathlib import Path

import grpc
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from otel_dl import semconv
from otel_dl.collector.config import CollectorConfig, ConfigError, load_config
from otel_dl.collector.pipeline import Collector
from otel_dl.collector.report import main as report_main
from otel_dl.collector.report import report

TOKEN = "test-token-0123456789abcdef"
SECRET = "SECRET-c0ffee-5ca1ab1e"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PB = {"Content-Type": "application/x-protobuf"}


# --- certificates -------------------------------------------------------------------------
def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, key, issuer_name, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return str(path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("otel-dl test CA", ca_key, _name("otel-dl test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("127.0.0.1", server_key, ca.subject, ca_key, ca=False, server=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("a sender", client_key, ca.subject, ca_key, ca=False)
    return {
        "ca": _write(d / "ca.pem", cert=ca),
        "server_cert": _write(d / "server.pem", cert=server),
        "server_key": _write(d / "server.key", key=server_key),
        "client_cert": _write(d / "client.pem", cert=client),
        "client_key": _write(d / "client.key", key=client_key),
    }


# --- helpers ------------------------------------------------------------------------------
def _request(trace: int = 1, **attrs: object) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "feature-service"
    span = rs.scope_spans.add().spans.add()
    span.trace_id, span.span_id = trace.to_bytes(16, "big"), (trace + 1).to_bytes(8, "big")
    span.name = "feature_store.get"
    span.start_time_unix_nano, span.end_time_unix_nano = 10**18, 10**18 + 10**6
    for key, value in attrs.items():
        kv = span.attributes.add()
        kv.key = key
        if isinstance(value, float):
            kv.value.double_value = value
        else:
            kv.value.string_value = str(value)
    return request


def _grpc_export(channel: grpc.Channel, body: bytes, token: str | None = None):
    call = channel.unary_unary(EXPORT, response_deserializer=ExportTraceServiceResponse.FromString)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return call(body, timeout=5, metadata=metadata)


# --- bearer token -------------------------------------------------------------------------
def test_bearer_token_guards_both_receivers_and_the_api(make_collector):
    collector = make_collector(auth_token=TOKEN)
    body = _request().SerializeToString()
    otlp = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    api = f"http://127.0.0.1:{collector.api_port}"
    for header in (None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN, "Bearer"):
        headers = {**PB, **({"Authorization": header} if header else {})}
        resp = requests.post(otlp, data=body, headers=headers, timeout=5)
        assert resp.status_code == 401, header
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        for path in ("/api/faults", "/metrics"):
            auth = {"Authorization": header} if header else {}
            assert requests.get(api + path, headers=auth, timeout=5).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(otlp, data=body, headers={**PB, **good}, timeout=5).status_code == 200
    assert requests.get(f"{api}/metrics", headers=good, timeout=5).status_code == 200
    assert requests.get(f"{api}/api/faults", headers=good, timeout=5).status_code == 200

    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        for token in (None, "wrong-token"):
            with pytest.raises(grpc.RpcError) as info:
                _grpc_export(channel, body, token)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
        assert _grpc_export(channel, body, TOKEN) == ExportTraceServiceResponse()


def test_token_errors_never_echo_the_token():
    with pytest.raises(ConfigError) as info:
        load_config(env={"OTEL_DL_COLLECTOR_AUTH_TOKEN": "has space-secretvalue"})
    assert "secretvalue" not in str(info.value)
    assert "OTEL_DL_COLLECTOR_AUTH_TOKEN" in str(info.value)


# --- TLS and mTLS -------------------------------------------------------------------------
def test_tls_on_both_receivers_and_the_api(make_collector, certs):
    collector = make_collector(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    body = _request().SerializeToString()
    otlp = f"https://127.0.0.1:{collector.http_port}/v1/traces"
    resp = requests.post(otlp, data=body, headers=PB, verify=certs["ca"], timeout=5)
    assert resp.status_code == 200
    metrics = f"https://127.0.0.1:{collector.api_port}/metrics"
    assert requests.get(metrics, verify=certs["ca"], timeout=5).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):  # not trusted without the CA
        requests.post(otlp, data=body, headers=PB, timeout=5)
    with pytest.raises(requests.exceptions.ConnectionError):  # no plain text on a TLS port
        requests.post(otlp.replace("https", "http"), data=body, headers=PB, timeout=5)
    creds = grpc.ssl_channel_credentials(Path(certs["ca"]).read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{collector.grpc_port}", creds) as channel:
        assert _grpc_export(channel, body) == ExportTraceServiceResponse()


def test_mtls_refuses_clients_without_a_certificate(make_collector, certs):
    collector = make_collector(
        tls_cert=certs["server_cert"],
        tls_key=certs["server_key"],
        tls_client_ca=certs["ca"],
        auth_token=TOKEN,
    )
    body = _request().SerializeToString()
    auth = {**PB, "Authorization": f"Bearer {TOKEN}"}
    client = (certs["client_cert"], certs["client_key"])
    for port, path in ((collector.http_port, "/v1/traces"), (collector.api_port, "/metrics")):
        url = f"https://127.0.0.1:{port}{path}"
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            requests.post(url, data=body, headers=auth, verify=certs["ca"], timeout=5)
        method = requests.post if path == "/v1/traces" else requests.get
        resp = method(url, data=body, headers=auth, verify=certs["ca"], cert=client, timeout=5)
        assert resp.status_code == 200

    ca = Path(certs["ca"]).read_bytes()
    target = f"127.0.0.1:{collector.grpc_port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _grpc_export(channel, body, TOKEN)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(
        ca, Path(certs["client_key"]).read_bytes(), Path(certs["client_cert"]).read_bytes()
    )
    with grpc.secure_channel(target, creds) as channel:
        assert _grpc_export(channel, body, TOKEN) == ExportTraceServiceResponse()


def test_tls_configuration_errors_name_the_key_and_the_fix(tmp_path, certs):
    with pytest.raises(ConfigError, match=r"--tls-cert.*cannot be read .No such file"):
        load_config(flags={"tls_cert": str(tmp_path / "missing.pem"), "tls_key": certs["ca"]})
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config(flags={"tls_cert": certs["server_cert"]})
    with pytest.raises(ConfigError, match=r"tls_client_ca .* needs TLS"):
        load_config(flags={"tls_client_ca": certs["ca"]})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    config = CollectorConfig(
        tls_cert=str(garbage), tls_key=certs["server_key"], store=None, queue_dir=str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"cannot be used .* PEM certificate"):
        Collector(config)
    env = {"OTEL_DL_COLLECTOR_TLS_KEY": str(tmp_path / "nope.key")}
    with pytest.raises(ConfigError, match="OTEL_DL_COLLECTOR_TLS_KEY"):
        load_config(env=env)


# --- no payload values in logs, store, API or report --------------------------------------
def test_payload_values_stay_out_of_logs_store_api_and_report(
    make_collector, wait_for, caplog, tmp_path
):
    caplog.set_level(logging.DEBUG)
    collector = make_collector()
    otlp = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    # A stale-features fault, with the secret on the cause span's other attributes.
    faulty = _request(
        3,
        **{
            semconv.DL_STAGE: semconv.STAGE_FEATURE_STORE,
            semconv.DL_FEATURE_FRESHNESS: 500_000.0,
            "user.email": SECRET,
            semconv.DL_DRIFT_SCORE: SECRET,  # mistyped: a warning naming the key only
        },
    )
    resp = requests.post(otlp, data=faulty.SerializeToString(), headers=PB, timeout=5)
    assert resp.status_code == 200
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        _grpc_export(channel, _request(5, note=SECRET).SerializeToString())
        with pytest.raises(grpc.RpcError):
            _grpc_export(channel, b"\x0a\xff" + SECRET.encode())
    refused = [
        ({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": SECRET}]}]}]}, 400),
        ({"resourceSpans": [{"scopeSpans": [{"spans": [{"name": {"x": SECRET}}]}]}]}, 400),
    ]
    for body, status in refused:
        resp = requests.post(otlp, json=body, timeout=5)
        assert resp.status_code == status
        assert SECRET not in resp.text  # not even back to the sender
    requests.post(otlp, data=b"{" + SECRET.encode(), headers={"Content-Type": "application/json"})

    api = f"http://127.0.0.1:{collector.api_port}"
    faults = wait_for(lambda: requests.get(f"{api}/api/faults", timeout=5).json()["faults"])
    assert faults[0]["kind"] == "stale_features"
    assert SECRET not in json.dumps(faults)
    store = tmp_path / "faults.sqlite"
    out = io.StringIO()
    assert report(store, "1h", None, out) == 0
    assert "feature-service" in out.getvalue() and SECRET not in out.getvalue()
    html = tmp_path / "r.html"
    assert report_main(["report", "--store", str(store), "--html", str(html)]) == 0
    assert SECRET not in html.read_text()
    collector.stop()
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("faults.sqlite*"))
    wal = tmp_path / "faults.sqlite-wal"
    if wal.exists():  # SQLite gives it the store's mode
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert len(caplog.records) > 0
    assert SECRET not in caplog.text


def test_store_and_queue_files_are_owner_only(make_collector, tmp_path):
    # A closed backend port and a long decision wait keep spans in the journal, then
    # (after stop) in the export queue, so both kinds of segment can be checked.
    collector = make_collector(export_endpoint="127.0.0.1:9", decision_wait=30, early_grace=30)
    collector.ingest(_request(7, **{semconv.DL_FEATURE_FRESHNESS: 1.0}), None)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("queue/inbox/*.log")}
    assert modes
    collector.stop()
    export = [tmp_path / "faults.sqlite", *tmp_path.glob("queue/export/*.log")]
    modes.update({p: stat.S_IMODE(p.stat().st_mode) for p in export})
    assert len(modes) >= 3
    assert set(modes.values()) == {0o600}, modes
    for directory in (tmp_path / "queue" / "inbox", tmp_path / "queue" / "export"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_store_left_world_readable_is_tightened(tmp_path, make_collector):
    store = tmp_path / "faults.sqlite"
    store.touch(mode=0o644)
    store.chmod(0o644)
    make_collector()
    assert stat.S_IMODE(store.stat().st_mode) == 0o600


def test_ssl_context_requires_tls12(certs):
    from otel_dl.collector.security import server_ssl_context

    config = CollectorConfig(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    context = server_ssl_context(config)
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
