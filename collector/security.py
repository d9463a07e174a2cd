"""Security of the receivers and the API: bearer-token auth and TLS (optionally mTLS).

Both are off by default and configured once for every listener (OTLP/gRPC, OTLP/HTTP
and the API) by ``auth_token``, ``tls_cert``, ``tls_key`` and ``tls_client_ca``::

    auth = BearerAuth(config.auth_token)          # None: every request is let through
    auth.allows(request.headers.get("Authorization"))
    server = grpc.server(executor, interceptors=auth.grpc_interceptors())
    server.add_secure_port(address, grpc_credentials(config))
    web.TCPSite(runner, host, port, ssl_context=server_ssl_context(config))

Tokens are compared with :func:`hmac.compare_digest`, so the time a refusal takes does
not tell an attacker how much of a guessed token was right. With ``tls_client_ca`` a
client without a certificate signed by that CA is refused in the TLS handshake.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from .config import CollectorConfig, ConfigError

_SCHEME = "bearer"
UNAUTHENTICATED_MESSAGE = (
    "missing or wrong bearer token; send the header 'Authorization: Bearer <token>' "
    "with the collector's auth_token"
)


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` values against the configured token."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def allows(self, header: str | None) -> bool:
        """Whether a request with this ``Authorization`` value may proceed."""
        if self._token is None:
            return True
        if not header:
            return False
        scheme, _, presented = header.strip().partition(" ")
        # Compare even on a wrong scheme, so both refusals take the same time.
        same = hmac.compare_digest(
            presented.strip().encode("utf-8", "surrogateescape"), self._token
        )
        return same and scheme.lower() == _SCHEME

    def grpc_interceptors(self) -> list[grpc.ServerInterceptor]:
        """Interceptors that refuse unauthenticated calls before their message is decoded."""
        return [_GrpcAuth(self)] if self.enabled else []


class _GrpcAuth(grpc.ServerInterceptor):
    def __init__(self, auth: BearerAuth) -> None:
        self._auth = auth

        def refuse(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        # Raw bytes in, so a refused call is never decoded.
        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        if self._auth.allows(header):
            return continuation(handler_call_details)
        return self._refusal


def _read_pem(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{key} {path!r} cannot be read ({exc.strerror}); give the path of a PEM file"
        ) from exc


def grpc_credentials(config: CollectorConfig) -> grpc.ServerCredentials | None:
    """Server credentials for the gRPC receiver, or None to serve plain text."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    # Load through the ssl module first: grpc reports a bad PEM only as a failed bind.
    server_ssl_context(config)
    cert = _read_pem(config.tls_cert, "tls_cert")
    key = _read_pem(config.tls_key, "tls_key")
    client_ca = _read_pem(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_ssl_context(config: CollectorConfig) -> ssl.SSLContext | None:
    """The TLS context for the OTLP/HTTP receiver and the API, or None for plain text."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls_cert {config.tls_cert!r} / tls_key {config.tls_key!r} cannot be used "
            f"({exc}); give a PEM certificate and the PEM private key that matches it"
        ) from exc
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls_client_ca {config.tls_client_ca!r} cannot be used ({exc}); "
                "give a PEM file of CA certificates"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
