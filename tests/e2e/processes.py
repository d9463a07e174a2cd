"""Pipeline processes the end-to-end tests start on loopback: otel-dl collectors and an
OpenTelemetry Collector. Each is a context manager that starts the real program in its
own process group, waits until it serves, and kills the group on exit::

    with OtelDlCollector(tmp / "a", export="127.0.0.1:4317") as member:
        member.otlp_grpc            # "127.0.0.1:port"
        member.metric("otel_dl_collector_spans_received_total")
        member.series("otel_dl_collector_faults_total")   # {labels: value}
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.binaries import free_port


class Process:
    """A program in its own process group; ``ready()`` says when it serves."""

    startup_seconds = 60.0

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited at start; see {self.log}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.argv[0]} did not serve in {self.startup_seconds} s; {self.log}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _grpc_serves(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
            return True
        except grpc.FutureTimeoutError:
            return False


class OtelDlCollector(Process):
    """``python -m otel_dl.collector`` with its data in ``directory`` (kept across restarts)."""

    def __init__(
        self, directory: Path, export: str, decision_wait: float = 2.0, **options: object
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("grpc_port", "http_port", "api_port")}
        config = {
            **self.ports,
            "export_endpoint": export,
            "decision_wait": decision_wait,
            "store": "none",
            "queue_dir": str(directory / "queue"),
            **options,
        }
        path = directory / "collector.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        argv = [sys.executable, "-m", "otel_dl.collector", "--config", str(path)]
        super().__init__(argv, directory / "collector.log", env)
        self.otlp_grpc = f"127.0.0.1:{self.ports['grpc_port']}"

    def ready(self) -> bool:
        try:
            self.metrics_text()
            return _grpc_serves(self.otlp_grpc)
        except OSError:
            return False

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.ports['api_port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """The Prometheus samples named ``name`` (``..._faults_total``), by their labels."""
        return {
            frozenset(sample.labels.items()): sample.value
            for family in text_string_to_metric_families(self.metrics_text())
            for sample in family.samples
            if sample.name == name
        }

    def metric(self, name: str) -> float:
        """The value of one unlabelled Prometheus sample, e.g. ``..._spans_received_total``."""
        try:
            return self.series(name)[frozenset()]
        except KeyError:
            raise KeyError(name) from None


class OtelCol(Process):
    """An OpenTelemetry Collector binary running ``config`` (a dict written as YAML)."""

    def __init__(self, binary: Path, config: dict[str, object], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "otelcol.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        super().__init__([str(binary), f"--config={path}"], directory / "otelcol.log", env)
        receiver = config["receivers"]["otlp"]["protocols"]["grpc"]  # type: ignore[index]
        self.otlp_grpc = str(receiver["endpoint"])

    def ready(self) -> bool:
        return _grpc_serves(self.otlp_grpc)
