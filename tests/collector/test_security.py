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
import re
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
from tests.reliability.findings import record

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
        # What strict verification (Python 3.13's default) asks of a chain: key usages,
        # and key identifiers linking each certificate to its issuer.
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
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


def _outcome(call) -> str:  # type: ignore[no-untyped-def]
    """What a client call came to: an HTTP status, a gRPC code name or an exception name."""
    try:
        result = call()
    except grpc.RpcError as exc:
        return exc.code().name
    except requests.RequestException as exc:
        return type(exc).__name__
    if isinstance(result, requests.Response):
        return str(result.status_code)
    return "accepted" if result == ExportTraceServiceResponse() else repr(result)


def _record(tried: str, checks: list[tuple[bool, str]], notes: tuple[str, ...] = ()) -> None:
    """One finding: each ``(held, sentence)`` goes under held or did not hold."""
    record(
        "collector-security",
        tried=[tried],
        held=[line for ok, line in checks if ok],
        did_not_hold=[line for ok, line in checks if not ok],
        notes=notes,
    )


# --- bearer token -------------------------------------------------------------------------
BAD_HEADERS = (None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN, "Bearer")


def test_bearer_token_guards_both_receivers_and_the_api(make_collector):
    collector = make_collector(auth_token=TOKEN)
    body = _request().SerializeToString()
    otlp = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    api = f"http://127.0.0.1:{collector.api_port}"
    refused: dict[str, int] = {"OTLP/HTTP": 0, "/api/faults": 0, "/metrics": 0}
    challenges = 0
    for header in BAD_HEADERS:
        auth = {"Authorization": header} if header else {}
        resp = requests.post(otlp, data=body, headers={**PB, **auth}, timeout=5)
        refused["OTLP/HTTP"] += resp.status_code == 401
        challenges += resp.headers.get("WWW-Authenticate") == "Bearer"
        for path in ("/api/faults", "/metrics"):
            refused[path] += requests.get(api + path, headers=auth, timeout=5).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    with_token = {
        "OTLP/HTTP": _outcome(lambda: requests.post(otlp, data=body, headers={**PB, **good})),
        "/metrics": _outcome(lambda: requests.get(f"{api}/metrics", headers=good, timeout=5)),
        "/api/faults": _outcome(lambda: requests.get(f"{api}/api/faults", headers=good, timeout=5)),
    }
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        grpc_bad = [_outcome(lambda t=t: _grpc_export(channel, body, t)) for t in (None, "wrong")]
        grpc_good = _outcome(lambda: _grpc_export(channel, body, TOKEN))
    n = len(BAD_HEADERS)
    _record(
        "A bearer token on both receivers and the API (compared with hmac.compare_digest): "
        "no header, `Bearer wrong`, `Basic <token>`, the bare token and `Bearer` alone on "
        "OTLP/HTTP, `/api/faults` and `/metrics`; no token and a wrong one on OTLP/gRPC.",
        [
            (
                all(v == n for v in refused.values()) and challenges == n,
                "Wrong or missing tokens: "
                + ", ".join(f"{v} of {n} refused with 401 on {k}" for k, v in refused.items())
                + f"; {challenges} of {n} OTLP/HTTP refusals carried `WWW-Authenticate: Bearer`.",
            ),
            (
                set(with_token.values()) == {"200"},
                "The right token: " + ", ".join(f"{v} on {k}" for k, v in with_token.items()) + ".",
            ),
            (
                grpc_bad == ["UNAUTHENTICATED"] * 2 and grpc_good == "accepted",
                f"OTLP/gRPC: no token {grpc_bad[0]}, a wrong one {grpc_bad[1]}, the right one "
                f"{grpc_good}.",
            ),
        ],
    )
    assert all(v == n for v in refused.values()) and challenges == n
    assert set(with_token.values()) == {"200"}
    assert grpc_bad == ["UNAUTHENTICATED"] * 2 and grpc_good == "accepted"


def test_token_errors_never_echo_the_token():
    with pytest.raises(ConfigError) as info:
        load_config(env={"OTEL_DL_COLLECTOR_AUTH_TOKEN": "has space-secretvalue"})
    message = str(info.value)
    echoed = "secretvalue" in message
    named = "OTEL_DL_COLLECTOR_AUTH_TOKEN" in message
    _record(
        "A token that cannot be used (a space in it), set through the environment.",
        [
            (
                named and not echoed,
                "The configuration error names OTEL_DL_COLLECTOR_AUTH_TOKEN and "
                + ("quotes the token." if echoed else "does not quote the token."),
            )
        ],
    )
    assert named and not echoed


# --- TLS and mTLS -------------------------------------------------------------------------
def test_tls_on_both_receivers_and_the_api(make_collector, certs):
    collector = make_collector(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    body = _request().SerializeToString()
    otlp = f"https://127.0.0.1:{collector.http_port}/v1/traces"
    metrics = f"https://127.0.0.1:{collector.api_port}/metrics"
    outcomes = {
        "OTLP/HTTPS with the CA": _outcome(
            lambda: requests.post(otlp, data=body, headers=PB, verify=certs["ca"], timeout=5)
        ),
        "API with the CA": _outcome(lambda: requests.get(metrics, verify=certs["ca"], timeout=5)),
        "OTLP/HTTPS without the CA": _outcome(
            lambda: requests.post(otlp, data=body, headers=PB, timeout=5)
        ),
        "plain HTTP to the TLS port": _outcome(
            lambda: requests.post(otlp.replace("https", "http"), data=body, headers=PB, timeout=5)
        ),
    }
    creds = grpc.ssl_channel_credentials(Path(certs["ca"]).read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{collector.grpc_port}", creds) as channel:
        outcomes["gRPC over TLS with the CA"] = _outcome(lambda: _grpc_export(channel, body))
    expected = {
        "OTLP/HTTPS with the CA": "200",
        "API with the CA": "200",
        "OTLP/HTTPS without the CA": "SSLError",
        "plain HTTP to the TLS port": "ConnectionError",
        "gRPC over TLS with the CA": "accepted",
    }
    _record(
        "TLS on every port, with a throwaway CA, a server certificate for 127.0.0.1 and a "
        "client certificate made at test time with `cryptography`.",
        [
            (
                outcomes == expected,
                "; ".join(f"{k}: {v}" for k, v in outcomes.items())
                + " (SSLError: the certificate failed verification; ConnectionError: no "
                "plain text on a TLS port).",
            )
        ],
    )
    assert outcomes == expected


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
    outcomes: dict[str, tuple[str, str]] = {}
    for name, port, path in (
        ("OTLP/HTTP", collector.http_port, "/v1/traces"),
        ("API", collector.api_port, "/metrics"),
    ):
        url = f"https://127.0.0.1:{port}{path}"
        method = requests.post if path == "/v1/traces" else requests.get
        without = _outcome(
            lambda url=url, method=method: method(
                url, data=body, headers=auth, verify=certs["ca"], timeout=5
            )
        )
        with_cert = _outcome(
            lambda url=url, method=method: method(
                url, data=body, headers=auth, verify=certs["ca"], cert=client, timeout=5
            )
        )
        outcomes[name] = (without, with_cert)
    ca = Path(certs["ca"]).read_bytes()
    target = f"127.0.0.1:{collector.grpc_port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        grpc_without = _outcome(lambda: _grpc_export(channel, body, TOKEN))
    creds = grpc.ssl_channel_credentials(
        ca, Path(certs["client_key"]).read_bytes(), Path(certs["client_cert"]).read_bytes()
    )
    with grpc.secure_channel(target, creds) as channel:
        grpc_with = _outcome(lambda: _grpc_export(channel, body, TOKEN))
    outcomes["OTLP/gRPC"] = (grpc_without, grpc_with)
    refused = {"SSLError", "ConnectionError", "UNAVAILABLE"}
    ok = all(w in refused and c in ("200", "accepted") for w, c in outcomes.values())
    _record(
        "mTLS: a client without a certificate, and one with a certificate the CA signed.",
        [
            (
                ok,
                "Without a client certificate: "
                + ", ".join(f"{k} {w}" for k, (w, _) in outcomes.items())
                + " (refused in the handshake); with one: "
                + ", ".join(f"{k} {c}" for k, (_, c) in outcomes.items())
                + ".",
            )
        ],
    )
    assert ok, outcomes


def test_tls_configuration_errors_name_the_key_and_the_fix(tmp_path, certs):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    cases = {
        "a missing certificate file": (
            lambda: load_config(
                flags={"tls_cert": str(tmp_path / "missing.pem"), "tls_key": certs["ca"]}
            ),
            r"--tls-cert.*cannot be read .No such file",
        ),
        "a certificate without a key": (
            lambda: load_config(flags={"tls_cert": certs["server_cert"]}),
            "tls_cert and tls_key go together",
        ),
        "mTLS without TLS": (
            lambda: load_config(flags={"tls_client_ca": certs["ca"]}),
            r"tls_client_ca .* needs TLS",
        ),
        "a file that is not PEM": (
            lambda: Collector(
                CollectorConfig(
                    tls_cert=str(garbage),
                    tls_key=certs["server_key"],
                    store=None,
                    queue_dir=str(tmp_path),
                )
            ),
            r"cannot be used .* PEM certificate",
        ),
        "a missing key named through the environment": (
            lambda: load_config(env={"OTEL_DL_COLLECTOR_TLS_KEY": str(tmp_path / "nope.key")}),
            "OTEL_DL_COLLECTOR_TLS_KEY",
        ),
    }
    stopped = []
    for name, (start, pattern) in cases.items():
        try:
            start()
        except ConfigError as exc:
            stopped.append(name if re.search(pattern, str(exc)) else f"{name} (message?)")
    _record(
        "TLS configuration errors: " + ", ".join(cases) + ".",
        [
            (
                stopped == list(cases),
                f"{len(stopped)} of {len(cases)} stopped the collector at start with the key, "
                "the path and the fix: " + ", ".join(stopped) + ".",
            )
        ],
    )
    assert stopped == list(cases)


# --- no payload values in logs, store, API or report --------------------------------------
@pytest.mark.parametrize(
    ("span", "path"),
    [
        ({"startTimeUnixNano": "s3cr3t"}, "field resourceSpans.scopeSpans.spans.startTimeUnixNano"),
        (
            {"attributes": [{"key": "k", "value": {"intValue": "1.5"}}]},
            "field resourceSpans[0].scopeSpans[0].spans[0].attributes[0].value.intValue",
        ),
    ],
)
def test_a_bad_json_field_is_named_by_its_path_never_its_value(span, path):
    """The message names the field the parser refused (it named only resourceSpans, the
    outermost, whatever was wrong), and never the value it held."""
    from otel_dl.collector.decode import PayloadError
    from otel_dl.collector.receive import decode_json

    span = {"traceId": "01" * 16, "spanId": "02" * 8, "name": "n", **span}
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()
    with pytest.raises(PayloadError) as refused:
        decode_json(body)
    message = str(refused.value)
    assert path in message and "s3cr3t" not in message and "1.5" not in message


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
    accepted = requests.post(otlp, data=faulty.SerializeToString(), headers=PB, timeout=5)
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        _grpc_export(channel, _request(5, note=SECRET).SerializeToString())
        undecodable = _outcome(lambda: _grpc_export(channel, b"\x0a\xff" + SECRET.encode()))
    refused_bodies = [
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": SECRET}]}]}]},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"name": {"x": SECRET}}]}]}]},
    ]
    refusals = [requests.post(otlp, json=body, timeout=5) for body in refused_bodies]
    requests.post(otlp, data=b"{" + SECRET.encode(), headers={"Content-Type": "application/json"})

    api = f"http://127.0.0.1:{collector.api_port}"
    faults = wait_for(lambda: requests.get(f"{api}/api/faults", timeout=5).json()["faults"])
    store = tmp_path / "faults.sqlite"
    out = io.StringIO()
    text_status = report(store, "1h", None, out)
    html = tmp_path / "r.html"
    html_status = report_main(["report", "--store", str(store), "--html", str(html)])
    collector.stop()
    sqlite = b"".join(p.read_bytes() for p in tmp_path.glob("faults.sqlite*"))
    wal = tmp_path / "faults.sqlite-wal"
    wal_mode = stat.S_IMODE(wal.stat().st_mode) if wal.exists() else None

    places = {
        "captured logs (every logger at DEBUG)": SECRET in caplog.text,
        "error bodies sent back": any(SECRET in r.text for r in refusals),
        "/api/faults": SECRET in json.dumps(faults),
        "the text report": SECRET in out.getvalue(),
        "the HTML report": SECRET in html.read_text(),
        "the SQLite files": SECRET.encode() in sqlite,
    }
    leaked = [place for place, found in places.items() if found]
    worked = (
        accepted.status_code == 200
        and undecodable == "INVALID_ARGUMENT"
        and [r.status_code for r in refusals] == [400, 400]
        and faults[0]["kind"] == "stale_features"
        and text_status == 0
        and html_status == 0
        and "feature-service" in out.getvalue()
        and len(caplog.records) > 0
    )
    _record(
        "A secret string sent as a span attribute, as a mistyped `dl.drift.score`, inside "
        "undecodable protobuf, as a JSON trace id and inside a JSON field of the wrong type, "
        "with a stale-features fault on the same span.",
        [
            (
                not leaked and worked,
                (
                    f"The secret appeared in none of these {len(places)} places: "
                    if not leaked
                    else f"The secret appeared in {', '.join(leaked)}, of: "
                )
                + ", ".join(places)
                + f". The fault was still attributed ({faults[0]['kind']}), the reports "
                f"written, {len(caplog.records)} log records captured.",
            ),
            (
                wal_mode in (None, 0o600),
                "No WAL file was left after the stop."
                if wal_mode is None
                else f"The store's WAL file had mode {wal_mode:o}.",
            ),
        ],
    )
    assert worked
    assert not leaked, leaked
    assert wal_mode in (None, 0o600)


def test_store_and_queue_files_are_owner_only(make_collector, tmp_path):
    # A closed backend port and a long decision wait keep spans in the journal, then
    # (after stop) in the export queue, so both kinds of segment can be checked.
    collector = make_collector(export_endpoint="127.0.0.1:9", decision_wait=30, early_grace=30)
    collector.ingest(_request(7, **{semconv.DL_FEATURE_FRESHNESS: 1.0}), None)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("queue/inbox/*.log")}
    collector.stop()
    export = [tmp_path / "faults.sqlite", *tmp_path.glob("queue/export/*.log")]
    modes.update({p: stat.S_IMODE(p.stat().st_mode) for p in export})
    dirs = {
        d: stat.S_IMODE(d.stat().st_mode)
        for d in (tmp_path / "queue" / "inbox", tmp_path / "queue" / "export")
    }
    kinds = sorted({p.name.split("-")[0].split(".")[0] for p in modes})
    ok = len(modes) >= 3 and set(modes.values()) == {0o600} and set(dirs.values()) == {0o700}
    _record(
        "File modes of the store, journal segments and export-queue segments.",
        [
            (
                ok,
                f"{len(modes)} files ({', '.join(kinds)}) had modes "
                f"{', '.join(sorted({f'{m:o}' for m in modes.values()}))}; the journal and "
                f"export-queue directories {', '.join(sorted({f'{m:o}' for m in dirs.values()}))}.",
            )
        ],
    )
    assert len(modes) >= 3
    assert set(modes.values()) == {0o600}, modes
    assert set(dirs.values()) == {0o700}, dirs


def test_a_store_left_world_readable_is_tightened(tmp_path, make_collector):
    store = tmp_path / "faults.sqlite"
    store.touch(mode=0o644)
    store.chmod(0o644)
    make_collector()
    mode = stat.S_IMODE(store.stat().st_mode)
    _record(
        "A store left with mode 644 from before.",
        [(mode == 0o600, f"The collector set its mode to {mode:o} at start.")],
        notes=(
            "**Did not hold before, fixed.** The store was created 0644 and the journal "
            "segments, which hold whole requests, 0644 as well; JSON decode errors quoted "
            "the offending id.",
        ),
    )
    assert mode == 0o600


def test_ssl_context_requires_tls12(certs):
    from otel_dl.collector.security import server_ssl_context

    config = CollectorConfig(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    context = server_ssl_context(config)
    minimum = context.minimum_version.name if context is not None else "none"
    _record(
        "The server TLS context.",
        [(minimum == "TLSv1_2", f"Its minimum protocol version is {minimum}.")],
    )
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
