"""Root-cause attribution on real traces: Jaeger's HotROD demo, with real faults injected.

Run ``python benchmarks/rca_real.py`` (``--quick`` for a smoke run). It builds HotROD
from the Jaeger module v1.76.0 once (cached under ``~/.cache/otel-dl/bin``, see
tests/e2e/binaries.py), starts its four services (frontend, customer, driver, route) as
separate processes on 127.0.0.1, each exporting OTLP/HTTP to an in-process otel-dl
collector, and drives ``/dispatch`` requests one at a time with a small HTTP client.
Nobody here wrote HotROD's traffic: its customer call goes through a ``mysql`` span with
a simulated query delay, its driver calls ``redis-manual``, which fails about every 5th
call and is retried, and its frontend asks route for several routes.

Phases, all on loopback:

1. ``normal``: requests with no fault injected (the first ones also warm the baselines).
2. Faults, each request followed by one more normal request:

   - ``pause-customer`` / ``pause-driver`` / ``pause-route``: the service process is
     stopped (SIGSTOP) for ``--pause`` seconds while the request runs, then continued:
     a stalled process. Truth: that service.
   - ``starve-customer`` / ``starve-route``: the service gets 10 % of the time while the
     request runs, the way a tight CPU quota (cgroup ``cpu.max``) throttles it: stopped
     for 45 ms of every 50 ms. Truth: that service.
   - ``invalid-customer``: HotROD's own error path, ``customer=999`` is not in its
     database: the query fails and the request ends in HTTP 500. Truth: mysql or customer.
   - ``slow-query``: the customer service restarted with HotROD's own
     ``--fix-db-query-delay`` at 1.5 s (300 ms by default). Truth: mysql.

Every trace the collector forwarded is then replayed, in arrival order, through two
fresh attributors on the same spans: ``before`` (``symptom_first=False``: the behaviour
before issue 17) and ``after`` (the default), and the live collector's own verdict is
read from the forwarded ``dl.fault.candidates``. Last, the live collector's incident
ranking (``/api/incidents``, see collector/incidents.py) is read from its store for the
window of each request: the services ranked over the window's faulty traces against the
healthy traffic of the 10 minutes before. Reported per phase: traces given a root cause
(the false-positive rate for ``normal``), AC@1, AC@3, and how often the top candidate
was a caller of the true service (frontend for customer, driver and route; customer for
mysql).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otel_dl.collector.assemble import SpanRecord, flatten  # noqa: E402
from otel_dl.collector.attribute import Attributor  # noqa: E402
from otel_dl.collector.catalog import load_catalog  # noqa: E402
from otel_dl.collector.config import load_config  # noqa: E402
from otel_dl.collector.incidents import query_incidents  # noqa: E402
from otel_dl.collector.pipeline import Collector  # noqa: E402
from tests.e2e.binaries import free_port, hotrod_binary  # noqa: E402
from tests.faultsim import start_sink  # noqa: E402

SERVICES = ("customer", "driver", "route", "frontend")
TRUTH: dict[str, frozenset[str]] = {
    "pause-customer": frozenset({"customer"}),
    "pause-driver": frozenset({"driver"}),
    "pause-route": frozenset({"route"}),
    "starve-customer": frozenset({"customer"}),
    "starve-route": frozenset({"route"}),
    "invalid-customer": frozenset({"mysql", "customer"}),
    "slow-query": frozenset({"mysql"}),
}
#: Who calls whom in HotROD: blaming one of these for a fault of the key is blaming a caller.
CALLERS: dict[str, frozenset[str]] = {
    "customer": frozenset({"frontend"}),
    "driver": frozenset({"frontend"}),
    "route": frozenset({"frontend"}),
    "mysql": frozenset({"customer", "frontend"}),
}
CUSTOMERS = ("123", "392", "731", "567")


class HotROD:
    """HotROD's four services as separate processes on loopback ports."""

    def __init__(self, binary: Path, otlp_http: str, log_dir: Path) -> None:
        self.binary = binary
        self.ports = {s: free_port() for s in SERVICES}
        self.env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _flags(self) -> list[str]:
        flags = []
        for service in SERVICES:
            flags += [f"--{service}-service-hostname", "127.0.0.1"]
        return [
            *flags,
            "-c",
            str(self.ports["customer"]),
            "-d",
            str(self.ports["driver"]),
            "-r",
            str(self.ports["route"]),
            "-f",
            str(self.ports["frontend"]),
        ]

    def start(self, service: str, *extra: str) -> None:
        log = open(self.log_dir / f"{service}.log", "ab")  # noqa: SIM115 - closed by stop()
        self.procs[service] = subprocess.Popen(
            [str(self.binary), service, *self._flags(), *extra],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, service: str) -> None:
        proc = self.procs.pop(service)
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def url(self, customer: str) -> str:
        return f"http://127.0.0.1:{self.ports['frontend']}/dispatch?customer={customer}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url("123"), timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                time.sleep(0.3)
        raise RuntimeError(f"HotROD did not answer within {timeout} s; see {self.log_dir}")

    def close(self) -> None:
        for service in list(self.procs):
            self.stop(service)


def _request(url: str) -> tuple[int, int, int]:
    """(status, send time, answer time) in ns since the epoch, like span timestamps."""
    start = time.time_ns()
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, start, time.time_ns()


def _paused(proc: subprocess.Popen[bytes], seconds: float, url: str) -> tuple[int, int, int]:
    """Run one request while ``proc`` is stopped for ``seconds`` from the request's start."""
    proc.send_signal(signal.SIGSTOP)
    timer = threading.Timer(seconds, proc.send_signal, (signal.SIGCONT,))
    timer.start()
    try:
        return _request(url)
    finally:
        timer.join()


def _starved(proc: subprocess.Popen[bytes], url: str) -> tuple[int, int, int]:
    """Run one request while ``proc`` runs 5 ms of every 50 ms (a CPU quota of 10 %)."""
    done = threading.Event()

    def throttle() -> None:
        while not done.is_set():
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.045)
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.005)

    thread = threading.Thread(target=throttle, daemon=True)
    thread.start()
    try:
        return _request(url)
    finally:
        done.set()
        thread.join()
        proc.send_signal(signal.SIGCONT)


def drive(hotrod: HotROD, args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """Send every request; return (phase, send ns, answer ns) per request, in order."""
    rng = random.Random(args.seed)
    sent: list[tuple[str, int, int]] = []

    def normal() -> None:
        _, start, end = _request(hotrod.url(rng.choice(CUSTOMERS)))
        sent.append(("normal", start, end))

    for _ in range(args.normal):
        normal()
    plan = [
        "pause-customer",
        "pause-driver",
        "pause-route",
        "starve-customer",
        "starve-route",
        "invalid-customer",
    ] * args.per_fault
    rng.shuffle(plan)
    for phase in plan:
        url = hotrod.url(rng.choice(CUSTOMERS))
        if phase == "invalid-customer":
            _, start, end = _request(hotrod.url("999"))
        elif phase.startswith("starve-"):
            _, start, end = _starved(hotrod.procs[phase.split("-")[1]], url)
        else:
            _, start, end = _paused(hotrod.procs[phase.split("-")[1]], args.pause, url)
        sent.append((phase, start, end))
        normal()
    # HotROD's own slow query: the customer service with a 1.5 s database delay.
    hotrod.stop("customer")
    hotrod.start("customer", "--fix-db-query-delay", "1.5s")
    hotrod.wait_ready()
    for _ in range(args.per_fault):
        _, start, end = _request(hotrod.url(rng.choice(CUSTOMERS)))
        sent.append(("slow-query", start, end))
    return sent


def traces_by_request(
    requests: list[bytes], sent: list[tuple[str, int, int]], wanted: frozenset[str]
) -> list[tuple[str, list[SpanRecord]]]:
    """The forwarded traces matched to the requests that caused them, in request order:
    requests ran one at a time, so a trace belongs to the request whose send and answer
    times enclose its entry span's start."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    spans: dict[bytes, list[SpanRecord]] = defaultdict(list)
    for raw in requests:
        records, _, _ = flatten(ExportTraceServiceRequest.FromString(raw), wanted)
        for rec in records:
            spans[rec.trace_id].append(rec)
    entries = []
    for trace_id, recs in spans.items():
        ids = {r.span_id for r in recs}
        roots = [r for r in recs if not r.parent_id or r.parent_id not in ids]
        entry = min(roots, key=lambda r: r.start)
        entries.append((entry.start, trace_id))
    entries.sort()
    out: list[tuple[str, list[SpanRecord]]] = []
    i = 0
    for phase, start, end in sent:
        while i < len(entries) and entries[i][0] < start:
            i += 1  # a trace of no request of ours (HotROD sends none, but be sure)
        if i < len(entries) and entries[i][0] <= end:
            out.append((phase, spans[entries[i][1]]))
            i += 1
    return out


def _candidates(spans: list[SpanRecord]) -> tuple[str, ...]:
    """The live collector's verdict, read from the forwarded entry span."""
    for rec in spans:
        if not rec.parent_id:
            for kv in rec.span.attributes:
                if kv.key == "dl.fault.candidates":
                    return tuple(v.string_value for v in kv.value.array_value.values)
    return ()


def _most_blamed(ranked_all: list[tuple[str, ...]]) -> str:
    tops = Counter(r[0] for r in ranked_all if r)
    return ", ".join(f"{service} {n}" for service, n in tops.most_common(2)) or "-"


def score(verdicts: dict[str, list[tuple[str, ...]]]) -> None:
    print(
        f"{'phase':<18} {'traces':>6} {'flagged':>8} {'AC@1':>6} {'AC@3':>6} {'caller@1':>9}"
        "  most blamed"
    )
    for phase, ranked_all in verdicts.items():
        n = len(ranked_all)
        flagged = sum(bool(r) for r in ranked_all)
        if phase == "normal":
            print(
                f"{phase:<18} {n:>6} {flagged / max(1, n):>8.1%} {'':>6} {'':>6} {'':>9}"
                f"  {_most_blamed(ranked_all)}"
            )
            continue
        truth = TRUTH[phase]
        callers = frozenset().union(*(CALLERS.get(t, frozenset()) for t in truth)) - truth
        ac1 = sum(bool(r) and r[0] in truth for r in ranked_all)
        ac3 = sum(bool(truth & set(r[:3])) for r in ranked_all)
        blamed_caller = sum(bool(r) and r[0] in callers for r in ranked_all)
        print(
            f"{phase:<18} {n:>6} {flagged / max(1, n):>8.1%} {ac1 / max(1, n):>6.2f} "
            f"{ac3 / max(1, n):>6.2f} {blamed_caller / max(1, n):>9.2f}"
            f"  {_most_blamed(ranked_all)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normal", type=int, default=200, help="fault-free requests first")
    parser.add_argument("--per-fault", type=int, default=8, help="requests per fault kind")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds a process is stopped")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--quick", action="store_true", help="40 normal, 3 per fault")
    args = parser.parse_args()
    if args.quick:
        args.normal, args.per_fault = 40, 3
    binary = hotrod_binary()
    tmp = Path(tempfile.mkdtemp(prefix="otel-dl-rca-real-"))
    sink, sink_server, sink_port = start_sink(keep=True)
    collector = Collector(
        load_config(
            flags={
                "grpc_port": 0,
                "http_port": 0,
                "api_port": 0,
                # A stopped process exports its spans late; wait for them.
                "decision_wait": 6.0,
                "early_grace": 3.0,
                "store": str(tmp / "faults.sqlite"),
                "queue_dir": str(tmp / "q"),
                "export_endpoint": f"127.0.0.1:{sink_port}",
            }
        )
    )
    collector.start()
    hotrod = HotROD(binary, f"http://127.0.0.1:{collector.http_port}", tmp)
    began = time.monotonic()
    try:
        for service in SERVICES:
            hotrod.start(service)
        hotrod.wait_ready()
        sent = drive(hotrod, args)
    finally:
        hotrod.close()
    time.sleep(2.0)  # HotROD's exporters flushed at exit; let the collector decide
    collector.stop()
    sink_server.stop(None)
    raw = [r.SerializeToString() for r in sink.requests]
    wanted = Attributor(load_catalog()).wanted_attributes | {"dl.fault.candidates"}
    matched = traces_by_request(raw, sent, wanted)
    print(
        f"\n## HotROD v1.76.0, {len(sent)} requests ({args.normal} normal first), "
        f"{len(matched)} traces matched, {time.monotonic() - began:.0f} s\n"
    )
    seconds: dict[str, list[float]] = defaultdict(list)
    for phase, start, end in sent:
        seconds[phase].append((end - start) / 1e9)
    print(
        "request time, median / max s: "
        + ", ".join(
            f"{phase} {statistics.median(v):.2f} / {max(v):.2f}" for phase, v in seconds.items()
        )
        + "\n"
    )
    for label, attributor in (
        ("before (symptom_first=False)", Attributor(load_catalog(), 30, symptom_first=False)),
        ("after", Attributor(load_catalog(), 30)),
        ("live collector (after)", None),
    ):
        verdicts: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for phase, spans in matched:
            if attributor is None:
                ranked: tuple[str, ...] = _candidates(spans)
            else:
                decision = attributor.decide(spans[0].trace_id, spans)
                ranked = decision.candidates if decision.fault else ()
            verdicts[phase].append(ranked)
        print(f"### {label}\n")
        score(verdicts)
        print()
    ranked_windows: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for phase, start, end in sent:
        found = query_incidents(tmp / "faults.sqlite", start / 1e9, end / 1e9, baseline=600)
        ranking = found[0].ranking if found else ()
        ranked_windows[phase].append(tuple(r.service for r in ranking))
    print("### live collector, incident ranking over each request's window\n")
    score(ranked_windows)
    print()


if __name__ == "__main__":
    main()
