"""Scale-out: an OpenTelemetry Collector routes whole traces by trace id to three otel-dl
collectors (its ``loadbalancing`` exporter, static resolver), all real processes on
loopback.

The simulated six-service system of ``tests/faultsim.py`` sends its traces, faults mixed
in, through the real SDK exporter to the OpenTelemetry Collector, which fans every trace
out twice: to the three-member cluster and, unchanged, to one otel-dl collector alone.
Both answers are compared on the very same spans. Run with ``-s`` to see the figures
that docs/deploy.md quotes.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from otel_dl import semconv
from tests.collector.conftest import CollectorProcess
from tests.e2e.binaries import NoGoToolchain, free_port, otelcol_binary
from tests.e2e.processes import OtelCol
from tests.faultsim import TRUTH, System, collector_ranking
from tests.otlp_sink import OtlpSink

pytestmark = pytest.mark.timeout(900)

MEMBERS = 3
SPANS_PER_TRACE = 6
WARMUP = 240  # normal traces first: 80 per member, over min_baseline_samples (30)
SHORT_WARMUP = 60  # 20 per member: the members have not learned their baselines yet
PER_KIND = 6
NORMAL = 60
# Attribution that depends on what one collector has seen before: learned baselines
# (duration, freshness, an operation's usual spread of confidence) and `changed` signals
# (model and schema fingerprints). A low-confidence call is a fault only below its
# operation's usual spread once that is learned (collector/detect_signals.py): a member
# that has not learned it yet names a fault the collector alone, which has, does not.
STATEFUL_KINDS = {
    semconv.FAULT_KIND_LATENCY,
    semconv.FAULT_KIND_LOW_CONFIDENCE,
    semconv.FAULT_KIND_STALE_FEATURES,
    semconv.FAULT_KIND_MODEL_CHANGE,
    semconv.FAULT_KIND_SCHEMA_MISMATCH,
    semconv.FAULT_KIND_DEPENDENCY_OUTAGE,
}


@pytest.fixture(scope="module")
def otelcol() -> Path:
    try:
        return otelcol_binary()
    except NoGoToolchain as exc:
        pytest.skip(str(exc))


def _front_config(port: int, members: list[str], single: str | None) -> dict[str, Any]:
    otlp = {
        "tls": {"insecure": True},
        "timeout": "5s",
        # A member that is down keeps its share queued and retried until it is back.
        "retry_on_failure": {
            "enabled": True,
            "max_elapsed_time": "0s",
            "initial_interval": "200ms",
            "max_interval": "1s",
        },
        "sending_queue": {"enabled": True, "queue_size": 100_000},
    }
    exporters: dict[str, Any] = {
        "loadbalancing": {
            "routing_key": "traceID",
            "protocol": {"otlp": otlp},
            "resolver": {"static": {"hostnames": members}},
        }
    }
    if single is not None:
        exporters["otlp/single"] = {"endpoint": single, **otlp}
    return {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}}},
        "exporters": exporters,
        "service": {
            "telemetry": {"logs": {"level": "warn"}, "metrics": {"level": "none"}},
            "pipelines": {"traces": {"receivers": ["otlp"], "exporters": list(exporters)}},
        },
    }


def _wait_spans(sinks: list[OtlpSink], total: int, seconds: float = 120) -> None:
    """Until ``sinks`` hold ``total`` spans together, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while sum(sink.spans for sink in sinks) < total and time.monotonic() < deadline:
        time.sleep(0.1)


def _verdicts(sink: OtlpSink) -> dict[str, tuple[str | None, str | None]]:
    """Per trace: (the service blamed first, the root-cause span id), or (None, None)."""
    out = {}
    for trace_id, spans in sink.traces().items():
        ranked, span_id = collector_ranking(spans)
        out[trace_id] = (ranked[0] if ranked else None, span_id)
    return out


def _ac1(verdicts: dict[str, tuple[str | None, str | None]], truth: dict[str, Any]) -> float:
    faults = [(t, kind) for t, (kind, _) in truth.items() if kind is not None]
    hits = sum(verdicts.get(t, (None, None))[0] == TRUTH[kind][0] for t, kind in faults)
    return hits / len(faults)


def _member(stack: ExitStack, directory: Path, sink_port: int) -> CollectorProcess:
    """One otel-dl collector CLI exporting to the sink on ``sink_port``, started."""
    member = stack.enter_context(
        CollectorProcess(
            directory, export_endpoint=f"127.0.0.1:{sink_port}", decision_wait=2.0, store="none"
        )
    )
    member.start()
    return member


class Topology:
    """The OpenTelemetry Collector in front of three members, plus one collector alone."""

    def __init__(self, otelcol: Path, tmp: Path, stack: ExitStack, alone: bool) -> None:
        # One sink per member, so each trace's owner is known; cluster_sink merges them.
        self.member_sinks: list[OtlpSink] = []
        self.members: list[CollectorProcess] = []
        for i in range(MEMBERS):
            sink = stack.enter_context(OtlpSink())
            self.member_sinks.append(sink)
            self.members.append(_member(stack, tmp / f"member-{i}", sink.port))
        self.single: CollectorProcess | None = None
        if alone:
            self.single_sink = stack.enter_context(OtlpSink())
            self.single = _member(stack, tmp / "single", self.single_sink.port)
        config = _front_config(
            free_port(),
            [m.otlp_grpc for m in self.members],
            self.single.otlp_grpc if self.single else None,
        )
        self.front = stack.enter_context(OtelCol(otelcol, config, tmp / "front"))
        self.system = System(self.front.otlp_grpc, random.Random(20261123))
        stack.callback(self.system.shutdown)
        self.t0 = time.time_ns()
        self.traces = 0

    def send(self, plan: list[str | None]) -> dict[str, Any]:
        truth = {}
        for kind in plan:
            trace_id, ids = self.system.request(kind, self.t0)
            truth[trace_id] = (kind, ids)
            self.t0 += 50_000_000
        self.traces += len(plan)
        return truth

    @property
    def cluster_sink(self) -> OtlpSink:
        """What the members forwarded, all together (a sink that never listens)."""
        merged = OtlpSink()
        for sink in self.member_sinks:
            with sink.lock:
                merged.requests += sink.requests
                merged.spans += sink.spans
        return merged

    def owners(self) -> dict[str, set[int]]:
        """Trace id -> the members that forwarded any of its spans (one, if routing holds)."""
        out: dict[str, set[int]] = {}
        for i, sink in enumerate(self.member_sinks):
            for trace_id in sink.traces():
                out.setdefault(trace_id, set()).add(i)
        return out

    def member_totals(self, name: str) -> list[float]:
        return [m.metric(name) for m in self.members]

    def member_sums(self, name: str) -> Counter[frozenset[tuple[str, str]]]:
        """Samples of ``name`` summed over the members by their labels, as Prometheus
        ``sum by`` every label would give."""
        out: Counter[frozenset[tuple[str, str]]] = Counter()
        for member in self.members:
            out.update(member.series(name))
        return out


# The per-service series a dashboard sums over the members.
SIGNAL_SERIES = (
    "otel_dl_collector_drift_score_count",
    "otel_dl_collector_drift_score_bucket",
    "otel_dl_collector_drift_status_total",
    "otel_dl_collector_confidence_mean_count",
    "otel_dl_collector_confidence_mean_bucket",
)


def _root_causes(sink: OtlpSink) -> Counter[frozenset[tuple[str, str]]]:
    """Root-cause spans a sink received, counted under the labels of ``faults_total``."""
    return Counter(
        frozenset({("service_name", s["service"]), ("kind", s["attrs"][semconv.DL_FAULT_KIND])})
        for spans in sink.traces().values()
        for s in spans
        if s["attrs"].get(semconv.DL_FAULT_ROOT_CAUSE) is True
    )


def _plan(rng: random.Random) -> list[str | None]:
    plan: list[str | None] = [k for k in semconv.FAULT_KINDS for _ in range(PER_KIND)]
    plan += [None] * NORMAL
    rng.shuffle(plan)
    return plan


@pytest.mark.parametrize("warmup", [WARMUP, SHORT_WARMUP], ids=["warm", "short-warmup"])
def test_members_attribute_each_trace_once_like_one_collector(
    warmup: int, otelcol: Path, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        top = Topology(otelcol, tmp_path, stack, alone=True)
        assert top.single is not None
        top.send([None] * warmup)
        top.system.flush()
        _wait_spans([top.single_sink], warmup * SPANS_PER_TRACE)
        _wait_spans(top.member_sinks, warmup * SPANS_PER_TRACE)
        time.sleep(3)  # every member decides its warm-up traces before a fault arrives
        truth = top.send(_plan(random.Random(1)))
        top.system.flush()
        total = top.traces * SPANS_PER_TRACE
        _wait_spans([top.single_sink], total)
        _wait_spans(top.member_sinks, total)
        time.sleep(3)  # the last decisions
        received = top.member_totals("otel_dl_collector_spans_received_total")
        assembled = top.member_totals("otel_dl_collector_traces_assembled_total")
        single_assembled = top.single.metric("otel_dl_collector_traces_assembled_total")
        faults = top.member_sums("otel_dl_collector_faults_total")
        single_faults = Counter(top.single.series("otel_dl_collector_faults_total"))
        signals = {name: top.member_sums(name) for name in SIGNAL_SERIES}
        single_signals = {name: Counter(top.single.series(name)) for name in SIGNAL_SERIES}

    cluster, single = _verdicts(top.cluster_sink), _verdicts(top.single_sink)
    span_ids = Counter(s["span_id"] for spans in top.cluster_sink.traces().values() for s in spans)
    root_causes = Counter(
        t
        for t, spans in top.cluster_sink.traces().items()
        for s in spans
        if s["attrs"].get(semconv.DL_FAULT_ROOT_CAUSE) is True
    )
    differ = {
        t: (kind, single.get(t), cluster.get(t))
        for t, (kind, _) in truth.items()
        if single.get(t) != cluster.get(t)
    }
    ac1_single, ac1_cluster = _ac1(single, truth), _ac1(cluster, truth)
    share = [r / sum(received) for r in received]
    print(
        f"\nscale-out, {warmup} warm-up traces: {top.traces} traces, {total} spans; "
        f"spans per member {received} "
        f"(shares {', '.join(f'{s:.0%}' for s in share)}); traces decided by the members "
        f"{sum(assembled):.0f}, by the collector alone {single_assembled:.0f}; "
        f"AC@1 alone {ac1_single:.3f}, three members {ac1_cluster:.3f}; verdicts that "
        f"differ {len(differ)}/{len(truth)}: {Counter(k for k, _, _ in differ.values())}; "
        f"faults_total summed over the members: {sum(faults.values()):.0f} in {len(faults)} "
        f"series, alone {sum(single_faults.values()):.0f} in {len(single_faults)}"
    )

    assert sum(received) == total and len(span_ids) == total
    assert max(span_ids.values()) == 1, "a span was forwarded twice"
    assert sum(assembled) == top.traces == single_assembled, "a trace was split or lost"
    assert max(root_causes.values(), default=1) == 1, "a trace has two root causes"
    # The loadbalancing exporter's hash ring is placed by the members' endpoints, which
    # are random ports here: the shares it gives vary from run to run (19 %, 45 % and
    # 35 % in one run), so "split" means every member gets a real share, not a third.
    assert min(share) > 0.1, f"load not split across the members: {received}"
    # Stateless failure modes get the very same verdict; baselines and `changed` signals
    # are learned per member, so those may differ (docs/deploy.md gives the figures).
    assert not {t: d for t, d in differ.items() if d[0] not in STATEFUL_KINDS}
    # The per-service Prometheus series: summed over the members, fault counts are the
    # root causes the members wrote into the traces, and the drift and confidence series,
    # which need no learned state, are exactly those of the collector alone.
    assert faults == _root_causes(top.cluster_sink) and sum(faults.values()) > 0
    assert single_faults == _root_causes(top.single_sink)
    for name in SIGNAL_SERIES:
        assert signals[name] == single_signals[name] and signals[name], name
    if warmup == WARMUP:
        assert ac1_cluster >= ac1_single - 0.05


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
def test_member_restart_mid_run(otelcol: Path, tmp_path: Path, how: signal.Signals) -> None:
    with ExitStack() as stack:
        top = Topology(otelcol, tmp_path, stack, alone=False)
        rng = random.Random(2)
        top.send([None] * WARMUP)
        truth: dict[str, Any] = {}
        for part in range(3):
            truth |= top.send(_plan(rng))
            if part == 0:
                time.sleep(1)  # some spans of the last traces are still in flight
                if how is signal.SIGKILL:
                    top.members[1].kill()
                else:
                    assert top.members[1].stop() == 0
                down = time.monotonic()
            if part == 1:
                time.sleep(max(0.0, 5 - (time.monotonic() - down)))
                top.members[1].start()
        top.system.flush()
        total = top.traces * SPANS_PER_TRACE
        _wait_spans(top.member_sinks, total, seconds=180)
        time.sleep(3)
        assembled = top.member_totals("otel_dl_collector_traces_assembled_total")
        late = top.member_totals("otel_dl_collector_spans_late_total")

    traces = top.cluster_sink.traces()
    owners = top.owners()
    span_ids = Counter(s["span_id"] for spans in traces.values() for s in spans)
    verdicts = _verdicts(top.cluster_sink)
    # The restarted member relearns its baselines, so stateful faults routed to it just
    # after the restart can be missed, and spans that arrive after their trace was decided
    # (late) split it: docs/deploy.md gives the figures. The other members' traces must
    # not notice: nothing lost, every trace at one member, every fault of theirs attributed.
    at = {
        "restarted member": {t: v for t, v in truth.items() if owners.get(t) == {1}},
        "other members": {t: v for t, v in truth.items() if owners.get(t) != {1}},
    }
    figures = {}
    for group, part in at.items():
        faults = [t for t, (kind, _) in part.items() if kind is not None]
        stateless = [t for t in faults if part[t][0] not in STATEFUL_KINDS]
        figures[group] = (
            sum(verdicts.get(t, (None, None))[0] is not None for t in faults),
            len(faults),
            sum(verdicts.get(t, (None, None))[0] is None for t in stateless),
            len(stateless),
            _ac1(verdicts, part),
        )
    duplicates = sum(n - 1 for n in span_ids.values())
    print(
        f"\nmember {how.name} and restart: {top.traces} traces, {total} spans sent; "
        f"{len(span_ids)} distinct spans forwarded, {duplicates} forwarded twice; "
        f"member 1 decided {assembled[1]:.0f} traces after its restart; late spans "
        f"{late}; "
        + "; ".join(
            f"{group}: fault traces attributed {a}/{n}, rule-based faults missed {m}/{r}, "
            f"AC@1 {ac1:.3f}"
            for group, (a, n, m, r, ac1) in figures.items()
        )
    )
    assert len(span_ids) == total, f"spans lost: {total - len(span_ids)}"
    assert all(len(members) == 1 for members in owners.values()), "a trace was split"
    attributed, faults, *_ = figures["other members"]
    assert attributed == faults > 0, "a member that did not restart missed a fault"
