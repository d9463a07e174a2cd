"""Root-cause attribution on real traces: Jaeger's HotROD demo, with real faults injected.

Run ``python benchmarks/rca_real.py`` (``--quick`` for a smoke run, ``--faults
delay,timeout,stall,reset`` for the network faults alone). It builds HotROD from the
Jaeger module v1.76.0 and toxiproxy v2.5.0 once (cached under ``~/.cache/otel-dl/bin``,
see tests/e2e/binaries.py), starts HotROD's four services (frontend, customer, driver,
route) as separate processes on 127.0.0.1, each exporting OTLP/HTTP to an in-process
otel-dl collector, and drives ``/dispatch`` requests one at a time with a small HTTP
client. The frontend reaches customer (HTTP), driver (gRPC) and route (HTTP) through one
toxiproxy proxy per link, always (its ``-c``/``-d``/``-r`` port flags name the proxies'
ports; the callees listen on their own).
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
   - Network faults on one link at a time, frontend → customer, driver or route
     (``--per-link`` requests each), a toxic added for the request and removed after it
     (then ``--settle`` s for gRPC to reconnect): ``delay-*``, 200 ms more on every
     answer; ``timeout-*``, nothing reaches the callee and the connection closes after
     1.5 s; ``stall-*``, the same on the way back (the callee answers, the answer is
     lost); ``reset-*``, every connection reset as the caller sends. Truth: the callee
     (a root cause on the callee's span or standing for it, ``dl.fault.blame = link``,
     counts as right, and the ``link`` column counts those).

Every trace the collector forwarded is then replayed, in request order, through fresh
attributors on the same spans: ``before``, the collector of git revision 6255403 (its
tree extracted once with ``git archive`` under ``~/.cache/otel-dl`` and run in a
subprocess), ``pre-symptom-first`` (``symptom_first=False``: the behaviour before
issue 17) and ``after`` (this tree); and the live collector's own verdict is read from
the forwarded ``dl.fault.candidates`` and ``dl.fault.blame``. Last, the live collector's incident
ranking (``/api/incidents``, see collector/incidents.py) is read from its store for the
window of each request: the services ranked over the window's faulty traces against the
healthy traffic of the 10 minutes before. Reported per phase: traces given a root cause
(the false-positive rate for ``normal``), AC@1, AC@3, and how often the top candidate
was a caller of the true service (frontend for customer, driver and route; customer for
mysql), per phase and per fault type over its links (``delay (all)``...).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import struct
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

from otel_dl.collector.attribute import Attributor  # noqa: E402
from otel_dl.collector.catalog import load_catalog  # noqa: E402
from otel_dl.collector.config import load_config  # noqa: E402
from otel_dl.collector.decode import SpanRecord, flatten  # noqa: E402
from otel_dl.collector.incidents import query_incidents  # noqa: E402
from otel_dl.collector.pipeline import Collector  # noqa: E402
from tests.e2e.binaries import free_port, hotrod_binary, toxiproxy_binary  # noqa: E402
from tests.otlp_sink import OtlpSink  # noqa: E402

SERVICES = ("customer", "driver", "route", "frontend")
TRUTH: dict[str, frozenset[str]] = {
    "pause-customer": frozenset({"customer"}),
    "pause-driver": frozenset({"driver"}),
    "pause-route": frozenset({"route"}),
    "starve-customer": frozenset({"customer"}),
    "starve-route": frozenset({"route"}),
    "invalid-customer": frozenset({"mysql", "customer"}),
    "slow-query": frozenset({"mysql"}),
    **{
        f"{fault}-{callee}": frozenset({callee})
        for fault in ("delay", "timeout", "stall", "reset")
        for callee in ("customer", "driver", "route")
    },
}
#: Fault types ``--faults`` selects, and the phases of each.
FAULT_TYPES: dict[str, tuple[str, ...]] = {
    "pause": ("pause-customer", "pause-driver", "pause-route"),
    "starve": ("starve-customer", "starve-route"),
    "invalid": ("invalid-customer",),
    "slow-query": ("slow-query",),
    **{
        fault: tuple(f"{fault}-{callee}" for callee in ("customer", "driver", "route"))
        for fault in ("delay", "timeout", "stall", "reset")
    },
}
#: The toxic each network fault adds to the proxied link (toxiproxy's HTTP API): 200 ms
#: more on every answer; the link blackholed towards the callee (no request reaches it)
#: and closed after 1.5 s; the same on the way back (the callee answers, the answer is
#: lost); every connection reset (RST) as soon as the caller sends on it.
TOXICS: dict[str, dict[str, object]] = {
    "delay": {"type": "latency", "stream": "downstream", "attributes": {"latency": 200}},
    "timeout": {"type": "timeout", "stream": "upstream", "attributes": {"timeout": 1500}},
    "stall": {"type": "timeout", "stream": "downstream", "attributes": {"timeout": 1500}},
    "reset": {"type": "reset_peer", "stream": "upstream", "attributes": {"timeout": 0}},
}
#: The revision the ``before`` figures replay the traces through.
BEFORE_REVISION = "6255403"
#: Who calls whom in HotROD: blaming one of these for a fault of the key is blaming a caller.
CALLERS: dict[str, frozenset[str]] = {
    "customer": frozenset({"frontend"}),
    "driver": frozenset({"frontend"}),
    "route": frozenset({"frontend"}),
    "mysql": frozenset({"customer", "frontend"}),
}
CUSTOMERS = ("123", "392", "731", "567")


class FaultProxy:
    """Toxiproxy on loopback: one proxy per link, a fault added and removed through its
    HTTP API."""

    def __init__(self, binary: Path, log_dir: Path) -> None:
        self.api = f"http://127.0.0.1:{free_port()}"
        log = open(log_dir / "toxiproxy.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(binary), "-host", "127.0.0.1", "-port", self.api.rsplit(":", 1)[1]],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/version")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"toxiproxy did not start; see {log_dir}") from None
                time.sleep(0.1)

    def _call(self, method: str, path: str, body: object = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=5) as answer:
            answer.read()

    def link(self, name: str, listen: int, upstream: int) -> None:
        """Forward 127.0.0.1:``listen`` to 127.0.0.1:``upstream``."""
        self._call(
            "POST",
            "/proxies",
            {"name": name, "listen": f"127.0.0.1:{listen}", "upstream": f"127.0.0.1:{upstream}"},
        )

    def inject(self, name: str, fault: str) -> None:
        self._call("POST", f"/proxies/{name}/toxics", {"name": "fault", **TOXICS[fault]})

    def clear(self, name: str) -> None:
        self._call("DELETE", f"/proxies/{name}/toxics/fault")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class HotROD:
    """HotROD's four services as separate processes on loopback ports. The frontend
    reaches customer, driver and route through ``dialed`` ports (a fault proxy's), or
    directly."""

    def __init__(
        self, binary: Path, otlp_http: str, log_dir: Path, dialed: dict[str, int] | None = None
    ) -> None:
        self.binary = binary
        self.ports = {s: free_port() for s in SERVICES}
        self.dialed = {**self.ports, **(dialed or {})}
        self.env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _flags(self, service: str) -> list[str]:
        """Each process listens on its own port; the frontend dials its callees' ``dialed``
        ports (one flag per service sets both, and each service is its own process)."""
        ports = self.dialed if service == "frontend" else self.ports
        flags = []
        for name in SERVICES:
            flags += [f"--{name}-service-hostname", "127.0.0.1"]
        return [
            *flags,
            "-c",
            str(ports["customer"]),
            "-d",
            str(ports["driver"]),
            "-r",
            str(ports["route"]),
            "-f",
            str(ports["frontend"]),
        ]

    def start(self, service: str, *extra: str) -> None:
        log = open(self.log_dir / f"{service}.log", "ab")  # noqa: SIM115 - closed by stop()
        self.procs[service] = subprocess.Popen(
            [str(self.binary), service, *self._flags(service), *extra],
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


def drive(
    hotrod: HotROD, proxy: FaultProxy | None, args: argparse.Namespace
) -> list[tuple[str, int, int]]:
    """Send every request; return (phase, send ns, answer ns) per request, in order."""
    rng = random.Random(args.seed)
    sent: list[tuple[str, int, int]] = []

    def normal() -> None:
        _, start, end = _request(hotrod.url(rng.choice(CUSTOMERS)))
        sent.append(("normal", start, end))

    for _ in range(args.normal):
        normal()
    plan = []
    for fault in args.faults:
        if fault == "slow-query":
            continue  # restarts the customer service: last
        count = args.per_link if fault in TOXICS else args.per_fault
        plan += list(FAULT_TYPES[fault]) * count
    rng.shuffle(plan)
    for phase in plan:
        url = hotrod.url(rng.choice(CUSTOMERS))
        kind, service = phase.split("-", 1)
        if phase == "invalid-customer":
            _, start, end = _request(hotrod.url("999"))
        elif kind == "starve":
            _, start, end = _starved(hotrod.procs[service], url)
        elif kind == "pause":
            _, start, end = _paused(hotrod.procs[service], args.pause, url)
        else:
            assert proxy is not None
            proxy.inject(service, kind)
            try:
                _, start, end = _request(url)
            finally:
                proxy.clear(service)
            # A reset or closed gRPC connection (driver) reconnects with a backoff of
            # about 1 s: the next request is a normal one only once it has.
            time.sleep(args.settle)
        sent.append((phase, start, end))
        normal()
    if "slow-query" in args.faults:
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


Verdict = tuple[tuple[str, ...], str]
"""The services a verdict ranks (none for no fault) and the blame of its root cause."""


def _live_verdict(spans: list[SpanRecord]) -> Verdict:
    """The live collector's verdict, read from the forwarded spans: the candidates on the
    entry span, the blame on the root-cause span."""
    candidates: tuple[str, ...] = ()
    blame = ""
    for rec in spans:
        attrs = {kv.key: kv.value for kv in rec.span.attributes}
        if not rec.parent_id and "dl.fault.candidates" in attrs:
            values = attrs["dl.fault.candidates"].array_value.values
            candidates = tuple(v.string_value for v in values)
        if attrs.get("dl.fault.root_cause") is not None and "dl.fault.blame" in attrs:
            blame = attrs["dl.fault.blame"].string_value
    return candidates, blame


#: Run by ``python -c`` in the tree of BEFORE_REVISION: decide the traces of the raw OTLP
#: requests (length-prefixed, file argv[1]) in the order of argv[2] (trace ids, hex) with
#: that revision's attributor, and print {trace id: [candidates, blame]} as JSON.
_REPLAY = """
import json, struct, sys
from collections import defaultdict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from otel_dl.collector.assemble import flatten
from otel_dl.collector.attribute import Attributor
from otel_dl.collector.catalog import load_catalog

attributor = Attributor(load_catalog(None), 30)
spans = defaultdict(list)
data = open(sys.argv[1], "rb").read()
at = 0
while at < len(data):
    (size,) = struct.unpack_from(">I", data, at)
    request = ExportTraceServiceRequest.FromString(data[at + 4 : at + 4 + size])
    at += 4 + size
    for rec in flatten(request, attributor.wanted_attributes)[0]:
        spans[rec.trace_id].append(rec)
out = {}
for trace in json.load(open(sys.argv[2])):
    decision = attributor.decide(bytes.fromhex(trace), spans[bytes.fromhex(trace)])
    out[trace] = [list(decision.candidates), decision.blame] if decision.fault else [[], ""]
print(json.dumps(out))
"""


def replay_before(
    raw: list[bytes], matched: list[tuple[str, list[SpanRecord]]], work: Path
) -> list[Verdict]:
    """The verdicts of BEFORE_REVISION on the matched traces, in order: its tree is
    extracted once (``git archive``) under ``~/.cache/otel-dl`` and run in a subprocess."""
    tree = Path.home() / ".cache" / "otel-dl" / f"rev-{BEFORE_REVISION}"
    if not (tree / "collector" / "attribute.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", BEFORE_REVISION],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for package in ("instrumentors", "collector"):
        link = tree / "otel_dl" / package
        if not link.exists():
            link.symlink_to(Path("..") / package)
    (work / "raw.bin").write_bytes(b"".join(struct.pack(">I", len(r)) + r for r in raw))
    order = [spans[0].trace_id.hex() for _, spans in matched]
    (work / "order.json").write_text(json.dumps(order))
    done = subprocess.run(
        [sys.executable, "-c", _REPLAY, str(work / "raw.bin"), str(work / "order.json")],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    )
    verdicts = json.loads(done.stdout)
    return [(tuple(verdicts[t][0]), verdicts[t][1]) for t in order]


def _most_blamed(verdicts: list[Verdict]) -> str:
    tops = Counter(r[0] for r, _ in verdicts if r)
    return ", ".join(f"{service} {n}" for service, n in tops.most_common(2)) or "-"


def _row(label: str, rows: list[tuple[str, Verdict]]) -> str:
    """One line of the table over (phase, verdict) pairs of one phase or fault type."""
    n = max(1, len(rows))
    flagged = sum(bool(r) for _, (r, _) in rows)
    verdicts = [v for _, v in rows]
    if all(phase == "normal" for phase, _ in rows):
        return (
            f"{label:<18} {len(rows):>6} {flagged / n:>8.1%} {'':>6} {'':>6} {'':>9} {'':>5}"
            f"  {_most_blamed(verdicts)}"
        )
    ac1 = ac3 = caller = link = 0
    for phase, (ranked, blame) in rows:
        truth = TRUTH[phase]
        callers = frozenset().union(*(CALLERS.get(t, frozenset()) for t in truth)) - truth
        right = bool(ranked) and ranked[0] in truth
        ac1 += right
        ac3 += bool(truth & set(ranked[:3]))
        caller += bool(ranked) and ranked[0] in callers
        link += right and blame == "link"
    return (
        f"{label:<18} {len(rows):>6} {flagged / n:>8.1%} {ac1 / n:>6.2f} {ac3 / n:>6.2f} "
        f"{caller / n:>9.2f} {link / n:>5.2f}  {_most_blamed(verdicts)}"
    )


def score(verdicts: list[tuple[str, Verdict]]) -> None:
    """Per phase, then per fault type over its links or services. ``link``: right, with
    the blame on the link into the true service."""
    print(
        f"{'phase':<18} {'traces':>6} {'flagged':>8} {'AC@1':>6} {'AC@3':>6} {'caller@1':>9}"
        f" {'link':>5}  most blamed"
    )
    by_phase: dict[str, list[tuple[str, Verdict]]] = defaultdict(list)
    for phase, verdict in verdicts:
        by_phase[phase].append((phase, verdict))
    for phase, rows in by_phase.items():
        print(_row(phase, rows))
    for fault, phases in FAULT_TYPES.items():
        rows = [row for phase in phases for row in by_phase.get(phase, [])]
        if len(phases) > 1 and rows:
            print(_row(f"{fault} (all)", rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normal", type=int, default=200, help="fault-free requests first")
    parser.add_argument("--per-fault", type=int, default=8, help="requests per process fault")
    parser.add_argument(
        "--per-link", type=int, default=4, help="requests per network fault and link"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_TYPES),
        help=f"comma-separated fault types, of: {', '.join(FAULT_TYPES)} (default: all)",
    )
    parser.add_argument("--pause", type=float, default=1.0, help="seconds a process is stopped")
    parser.add_argument(
        "--settle", type=float, default=1.5, help="seconds after a network fault is removed"
    )
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--quick", action="store_true", help="40 normal, 3 per fault, 1 per link")
    args = parser.parse_args()
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(args.faults) - set(FAULT_TYPES))
    if unknown:
        parser.error(f"unknown fault types {unknown}: choose among {', '.join(FAULT_TYPES)}")
    if args.quick:
        args.normal, args.per_fault, args.per_link = 40, 3, 1
    binary = hotrod_binary()
    tmp = Path(tempfile.mkdtemp(prefix="otel-dl-rca-real-"))
    network = any(f in TOXICS for f in args.faults)
    proxy = FaultProxy(toxiproxy_binary(), tmp) if network else None
    sink = OtlpSink().start()
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
                "export_endpoint": f"127.0.0.1:{sink.port}",
            }
        )
    )
    collector.start()
    # Through the proxy, the frontend dials each callee on a port of its own link, always:
    # the links of the normal traffic are the ones the faults are injected into.
    dialed = {callee: free_port() for callee in ("customer", "driver", "route")} if proxy else {}
    hotrod = HotROD(binary, f"http://127.0.0.1:{collector.http_port}", tmp, dialed)
    if proxy is not None:
        for callee, port in dialed.items():
            proxy.link(callee, port, hotrod.ports[callee])
    began = time.monotonic()
    try:
        for service in SERVICES:
            hotrod.start(service)
        hotrod.wait_ready()
        sent = drive(hotrod, proxy, args)
    finally:
        hotrod.close()
        if proxy is not None:
            proxy.close()
    time.sleep(2.0)  # HotROD's exporters flushed at exit; let the collector decide
    collector.stop()
    sink.stop()
    raw = [r.SerializeToString() for r in sink.requests]
    wanted = Attributor(load_catalog()).wanted_attributes | {
        "dl.fault.candidates",
        "dl.fault.root_cause",
        "dl.fault.blame",
    }
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
    tables: list[tuple[str, list[Verdict]]] = [
        (f"before ({BEFORE_REVISION}, replayed)", replay_before(raw, matched, tmp))
    ]
    for label, attributor in (
        (
            "pre-symptom-first (symptom_first=False)",
            Attributor(load_catalog(), 30, symptom_first=False),
        ),
        ("after (replayed)", Attributor(load_catalog(), 30)),
    ):
        verdicts: list[Verdict] = []
        for _, spans in matched:
            decision = attributor.decide(spans[0].trace_id, spans)
            verdicts.append((decision.candidates, decision.blame) if decision.fault else ((), ""))
        tables.append((label, verdicts))
    tables.append(("live collector (after)", [_live_verdict(spans) for _, spans in matched]))
    for label, verdicts in tables:
        print(f"### {label}\n")
        score([(phase, v) for (phase, _), v in zip(matched, verdicts, strict=True)])
        print()
    windows: list[tuple[str, Verdict]] = []
    for phase, start, end in sent:
        found = query_incidents(tmp / "faults.sqlite", start / 1e9, end / 1e9, baseline=600)
        ranking = found[0].ranking if found else ()
        windows.append((phase, (tuple(r.service for r in ranking), "")))
    print("### live collector (after), incident ranking over each request's window\n")
    score(windows)
    print()


if __name__ == "__main__":
    main()
