"""Run the demo pipeline end to end: four services, the otel-dl collector, one fault.

``make demo`` runs this (``make demo FAULT=<name>`` picks the fault)::

    python examples/pipeline/run.py --fault stale_features
    python examples/pipeline/run.py --export-endpoint 127.0.0.1:4317   # also to Jaeger

It starts the otel-dl collector (store only, or exporting to ``--export-endpoint``) and
the external-api, feature-service and inference-service as separate processes on
loopback ports the OS picks. The batch scorer then scores ``--normal-batches`` batches
of clean traffic, the fault is injected (a flag of the scorer for upstream drift, the
service's ``/admin/fault`` for the others) and ``--fault-batches`` more are scored.
Once the collector has decided every trace, the runner stops the services, prints the
collector's attribution report (``otel-dl report``), writes the HTML report, and says
whether the root cause named for the faulty traces is the injected one.

Every process runs in its own process group, killed on the way out (also on Ctrl-C or
SIGTERM), so nothing is left behind. Logs and data stay in ``--work-dir`` (a new
temporary folder by default). ``--summary PATH`` writes the outcome as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from common import EXTERNAL, FAULTS, FEATURES, INFERENCE, SCORER, free_port, wait_for_port

HERE = Path(__file__).resolve().parent
STOP_GRACE_SECONDS = 10.0
SETTLE_TIMEOUT_SECONDS = 60.0


class Processes:
    """Child processes, each in its own process group, all stopped by :meth:`stop_all`."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=HERE,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[name] = proc
        return proc

    def run(self, name: str, argv: list[str], timeout: float) -> str:
        """Run a process to its end and return its last output line."""
        proc = self.start(name, argv)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            self.stop(name)
        lines = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}; see {self.log_dir / name}.log")
        return lines[-1] if lines else ""

    def stop(self, name: str) -> None:
        proc = self.running.pop(name, None)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def _metrics(api: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{api}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_until_decided(api: str, quiet: float) -> None:
    """Wait until the collector has decided and handed on every span, quiet ``quiet`` s."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        m = _metrics(api)
        received = m.get("otel_dl_collector_spans_received_total", 0.0)
        if received != last:
            last, since = received, time.monotonic()
        elif (
            not m.get("otel_dl_collector_spans_buffered", 0.0)
            and not m.get("otel_dl_collector_spans_queued", 0.0)
            and time.monotonic() - since > quiet
        ):
            return
        time.sleep(0.25)
    raise TimeoutError(f"the collector did not decide every trace in {SETTLE_TIMEOUT_SECONDS} s")


def post(url: str) -> None:
    request = urllib.request.Request(url, method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as reply:
        reply.read()


def faults_since(api: str, since: float) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{api}/api/faults?since={since}&limit=1000", timeout=5) as r:
        return list(json.load(r)["faults"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fault", default="upstream_drift", choices=sorted(FAULTS))
    parser.add_argument("--work-dir", type=Path, help="logs, data, store (default: a new temp dir)")
    parser.add_argument("--export-endpoint", help="OTLP endpoint the collector forwards to")
    parser.add_argument("--normal-batches", type=int, default=40)
    parser.add_argument("--fault-batches", type=int, default=12)
    parser.add_argument("--summary", type=Path, help="write the outcome here as JSON")
    args = parser.parse_args(argv)
    fault = FAULTS[args.fault]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="otel-dl-demo-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM ends the runner like Ctrl-C does, through the finally below; SIGINT is set
    # explicitly because a shell starting the runner in the background ignores it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    ports = {name: free_port() for name in ("grpc", "http", "api", INFERENCE, FEATURES, EXTERNAL)}
    api = f"http://127.0.0.1:{ports['api']}"
    url = {name: f"http://127.0.0.1:{ports[name]}" for name in (INFERENCE, FEATURES, EXTERNAL)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{ports['grpc']}",
        # The collector takes traces only; the demo's metrics are not needed.
        OTEL_METRICS_EXPORTER="none",
        OTEL_BSP_SCHEDULE_DELAY="200",
        # The runner's fault switch is no part of the traffic being traced.
        OTEL_PYTHON_FASTAPI_EXCLUDED_URLS="admin",
        OTEL_DL_COLLECTOR_QUEUE_DIR=str(work / "queue"),
    )
    procs = Processes(logs, env)
    python = sys.executable
    store = work / "otel-dl.sqlite"
    print(f"otel-dl demo: fault {fault.name} ({fault.description}); work dir {work}")
    try:
        collector = [python, "-m", "otel_dl.collector", "--store", str(store)]
        collector += ["--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"])]
        collector += ["--api-port", str(ports["api"]), "--decision-wait", "3"]
        if args.export_endpoint:
            collector += ["--export-endpoint", args.export_endpoint]
        procs.start("collector", collector)
        svc = ["--work-dir", str(work / "services")]
        procs.start(EXTERNAL, [python, "external_api.py", "--port", str(ports[EXTERNAL])])
        procs.start(FEATURES, [python, "feature_service.py", "--port", str(ports[FEATURES]), *svc])
        procs.start(
            INFERENCE,
            [
                *(python, "inference_service.py", "--port", str(ports[INFERENCE]), *svc),
                *("--features-url", url[FEATURES], "--external-url", url[EXTERNAL]),
            ],
        )
        for name in ("collector", EXTERNAL, FEATURES, INFERENCE):
            port = ports["api" if name == "collector" else name]
            wait_for_port(port, alive=lambda p=procs.running[name]: p.poll() is None)
        print(f"services up: {', '.join(url[n] for n in (INFERENCE, FEATURES, EXTERNAL))}")

        scorer = [python, "batch_scorer.py", "--work-dir", str(work / "scorer")]
        scorer += ["--inference-url", url[INFERENCE]]
        print(procs.run(SCORER, [*scorer, "--batches", str(args.normal_batches)], timeout=300))
        wait_until_decided(api, quiet=1.0)

        fault_start = time.time()
        if fault.name == "upstream_drift":
            scorer += ["--fault", fault.name]
        else:
            post(f"{url[fault.service]}/admin/fault?name={fault.name}")
        print(f"injected {fault.name} into {fault.service}")
        faulty = [*scorer, "--batches", str(args.fault_batches), "--seed", "1"]
        print(procs.run(SCORER, faulty, timeout=300))
        wait_until_decided(api, quiet=1.0)
        for name in (INFERENCE, FEATURES, EXTERNAL):
            procs.stop(name)  # SIGTERM: each flushes its last spans on the way out
        wait_until_decided(api, quiet=1.0)

        before = faults_since(api, 0)
        during = faults_since(api, fault_start)
        found = Counter((str(f["service"]), str(f["kind"])) for f in during)
        top = found.most_common(1)[0][0] if found else None
        ok = top == (fault.service, fault.kind)
        html = work / "report.html"
        print("\n== otel-dl report ==")
        subprocess.run(
            [
                *(python, "-m", "otel_dl.collector.report", "report", "--store", str(store)),
                *("--since", "1h", "--html", str(html)),
            ],
            check=True,
        )
        print(
            f"\ninjected: {fault.name} into {fault.service}; expected root cause "
            f"{fault.service}/{fault.kind}; collector says "
            f"{'/'.join(top) if top else 'nothing'} ({found[top] if top else 0} of "
            f"{args.fault_batches} faulty batches) -> {'RIGHT' if ok else 'WRONG'}"
        )
        print(f"HTML report: {html}")
        if args.summary:
            args.summary.write_text(
                json.dumps(
                    {
                        "fault": fault.name,
                        "expected": [fault.service, fault.kind],
                        "top": list(top) if top else None,
                        "during": [f"{s}/{k}" for (s, k) in found.elements()],
                        "before": len(before) - len(during),
                        "traces": sorted({str(f["trace_id"]) for f in during}),
                        "work_dir": str(work),
                        "html": str(html),
                        "ports": ports,
                        "fault_batches": args.fault_batches,
                    },
                    indent=2,
                )
            )
        return 0 if ok else 1
    finally:
        procs.stop_all()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every demo process was stopped", file=sys.stderr)
        sys.exit(130)
