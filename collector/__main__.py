"""Command line of the collector: ``otel-dl-collector`` or ``python -m otel_dl.collector``.

Flags override ``OTEL_DL_COLLECTOR_*`` environment variables, which override the YAML
file given with ``--config``. A bad configuration or catalog exits with status 2 and
a message naming the source, the key and the fix. SIGINT/SIGTERM stop it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .catalog import CatalogError
from .config import ConfigError, load_config
from .pipeline import Collector


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="otel-dl-collector",
        description="Receive OTLP traces, attribute deep-learning faults, enrich and forward.",
    )
    p.add_argument("--config", type=Path, help="the YAML configuration file")
    p.add_argument("--grpc-port", dest="grpc_port", help="OTLP/gRPC receiver port (4317)")
    p.add_argument("--http-port", dest="http_port", help="OTLP/HTTP receiver port (4318)")
    p.add_argument("--host", help="address to listen on (127.0.0.1)")
    p.add_argument(
        "--export-endpoint",
        dest="export_endpoint",
        help="OTLP/gRPC host:port or http(s):// URL for OTLP/HTTP (default: store only)",
    )
    p.add_argument(
        "--decision-wait",
        dest="decision_wait",
        metavar="SECONDS",
        help="how long to wait for a trace to complete (5)",
    )
    p.add_argument("--store", help="SQLite file for attributed faults, or none (./otel-dl.sqlite)")
    p.add_argument("--catalog", help="YAML file with extra or overriding failure modes")
    p.add_argument("--api-port", dest="api_port", help="fault API and metrics port (8889)")
    p.add_argument(
        "--max-request-bytes",
        dest="max_request_bytes",
        help="largest OTLP request accepted, after decompression (67108864)",
    )
    p.add_argument(
        "--max-request-wait",
        dest="max_request_wait",
        metavar="SECONDS",
        help="refuse (back-pressure) a request that waited longer for a worker (2; 0: never)",
    )
    p.add_argument(
        "--memory-limit-mib",
        dest="memory_limit_mib",
        metavar="MIB",
        help=(
            "resident memory to stay under: back-pressure when memory in use is above "
            "80 %% of it (0: no limit)"
        ),
    )
    # No flag for auth_token: a command line is visible to every user in the process list.
    p.add_argument("--tls-cert", dest="tls_cert", help="PEM server certificate: serve TLS")
    p.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        dest="tls_client_ca",
        help="PEM CA bundle: require client certificates it signed (mTLS)",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    flags = {
        k: getattr(args, k)
        for k in (
            "grpc_port",
            "http_port",
            "host",
            "export_endpoint",
            "decision_wait",
            "store",
            "catalog",
            "api_port",
            "max_request_bytes",
            "max_request_wait",
            "memory_limit_mib",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
        )
    }
    try:
        config = load_config(args.config, os.environ, flags)
        collector = Collector(config)
        collector.start()
    except (ConfigError, CatalogError) as exc:
        print(f"otel-dl-collector: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"otel-dl-collector: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("otel_dl.collector").info(
        "listening on %s: OTLP/gRPC %d, OTLP/HTTP %d, API %d (%s, %s); exporting to %s",
        config.host,
        collector.grpc_port,
        collector.http_port,
        collector.api_port,
        "mTLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plain text",
        "bearer token required" if config.auth_token else "no auth",
        config.export_endpoint or "the store only",
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    collector.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
