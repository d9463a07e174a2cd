"""Third-party programs the end-to-end tests start on loopback (an OpenTelemetry
Collector; Jaeger in jaeger.py). Each is a context manager that starts the real program
in its own process group, waits until it serves, and kills the group on exit::

    with OtelCol(binary, config, tmp / "front") as front:
        front.otlp_grpc             # "127.0.0.1:port"

The otel-dl collector CLI runs under ``tests.collector.conftest.CollectorProcess``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import yaml


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
