"""Command line of the collector: ``otel-dl-collector`` or ``python -m otel_dl.collector``.

Every key of ``config.OPTIONS`` but a secret one is a flag ``--<key with dashes>``,
generated from that table. Flags override ``OTEL_DL_COLLECTOR_*`` environment variables,
which override the YAML file given with ``--config``. A bad configuration or catalog
exits with status 2 and a message naming the source, the key and the fix. SIGINT/SIGTERM
stop it cleanly.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .catalog import CatalogError
from .config import OPTIONS, CollectorConfig, ConfigError, load_config
from .pipeline import Collector


def _shown(default: Any) -> str:
    if default is None or default == ():
        return "none"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--config``, ``--log-level`` and one flag per key of ``OPTIONS``."""
    secrets = " and ".join(option.name for option in OPTIONS if option.flag is None)
    p = argparse.ArgumentParser(
        prog="otel-dl-collector",
        description="Receive OTLP traces, attribute deep-learning faults, enrich and forward.",
        epilog="Every flag but --config and --log-level sets a configuration key, which can "
        "also be set as OTEL_DL_COLLECTOR_<KEY> in the environment or as <key> in the --config "
        "file; a flag beats the environment, which beats the file. The secrets "
        f"{secrets} have no flag: a command line is visible in the process list.",
    )
    p.add_argument("--config", type=Path, metavar="PATH", help="the YAML configuration file")
    defaults = CollectorConfig()
    for option in OPTIONS:
        if option.flag is None:
            continue
        # No default here: an absent flag must leave the key to the environment and the file.
        shown = _shown(getattr(defaults, option.name))
        p.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar,
            help=f"{option.help} (default: {shown})".replace("%", "%%"),
        )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        metavar="LEVEL",
        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: %(default)s)",
    )
    return p


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> CollectorConfig:
    """The configuration of parsed ``args``: flags > ``env`` > the ``--config`` file > defaults."""
    flags = {option.name: getattr(args, option.name) for option in OPTIONS if option.flag}
    return load_config(args.config, env, flags)


# Allocations between two collections of the youngest generation, and collections of
# each generation between two of the next. Python's defaults (700, 10, 10) suit a
# process whose objects die young; the collector keeps tens of thousands of spans alive
# for a decision wait, so every young collection walked the spans that arrived since the
# last one, and the older generations were scanned again and again. Spans are freed by
# reference counting, not by these collections. Measured on telemetrygen's gRPC load:
# about 12 % less CPU per span and 12 % more spans/s (docs/collector.md).
GC_THRESHOLDS = (100_000, 50, 100)


def _tune_gc() -> None:
    """For the service process only: the thresholds above, and what start-up made
    (modules, the catalog, grpc's and aiohttp's objects) frozen out of every scan."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Configuration keys that name files or directories the collector opens at start.
_PATH_KEYS = ("queue_dir", "store", "tls_cert", "tls_key", "tls_client_ca")


def _file_error(exc: OSError, config: Any) -> str:
    """``exc``, and when it is about a file a path key names: the key and the fix."""
    filename = getattr(exc, "filename", None)
    if filename is None or config is None:
        return str(exc)
    failed = os.path.abspath(str(filename))
    for key in _PATH_KEYS:
        value = getattr(config, key, None)
        if not value:
            continue
        path = os.path.abspath(value)
        if failed == path or failed.startswith(path + os.sep) or path.startswith(failed + os.sep):
            flag = "--" + key.replace("_", "-")
            need = "read" if key.startswith("tls_") else "create and write"
            return (
                f"{key} = {value!r}: {exc.strerror or exc} ({filename}); give a path this "
                f"process can {need}, with {flag}, OTEL_DL_COLLECTOR_{key.upper()} or the "
                f"'{key}' key of the config file"
            )
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = None
    try:
        config = config_from_args(args, os.environ)
        collector = Collector(config)
        collector.start()
        _tune_gc()
    except (ConfigError, CatalogError) as exc:
        print(f"otel-dl-collector: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"otel-dl-collector: {_file_error(exc, config)}", file=sys.stderr)
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
    # A timed wait: a signal the kernel hands to another thread (gRPC's own, say) sets
    # Python's pending flag but does not wake a main thread blocked on a lock, so an
    # untimed wait could miss SIGTERM for good.
    while not done.wait(0.5):
        pass
    collector.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
