"""Overload: senders offer three times what the collector was measured to sustain.

The collector runs as its CLI with a data directory and ``memory_limit_mib`` set,
exporting to a real OTLP/gRPC sink on loopback. Its capacity is measured first in the
same run: closed-loop senders (each sends its next request once the last is answered)
over OTLP/gRPC and OTLP/HTTP, spans acknowledged per second. Then an open-loop client
offers three times that, on schedule whatever the answers. The collector must answer
the excess with back-pressure (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED with
a RetryInfo), keep its peak RSS (``VmHWM``) under the limit, deliver every span it
acknowledged, and take a closed-loop burst right after the overload without refusing
any of it. Its goodput, spans acknowledged per second while overloaded (measured after
a warm-up, as the capacity is), is reported against the target of 90 % of the
capacity. A second test holds traces in memory so that only the memory limit can stop
RSS from growing; a third checks the option itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from otel_dl.collector.admission import PRESS_SECONDS
from otel_dl.collector.config import load_config
from tests.collector.conftest import (
    BACKPRESSURE,
    OK,
    TOO_MANY_IN_FLIGHT,
    CollectorProcess,
    Traffic,
    time_until,
)
from tests.otlp_sink import OtlpSink
from tests.reliability.findings import record, scale

LIMIT_MIB = 256
SENDERS = 8
WARMUP = scale(1.0, 3.0)
MEASURE = scale(2.5, 20.0)
OVERLOAD_WARMUP = scale(1.0, 5.0)
OVERLOAD = scale(4.0, 60.0)
FACTOR = 3
# Goodput under overload, as a share of the capacity, that a server shedding load well
# keeps: reported, not asserted (see the note in the figures).
GOODPUT_TARGET = 0.9
DRAIN_SECONDS = scale(60, 180)
_THROTTLED = "otel_dl_collector_requests_throttled_total"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class _Watch(threading.Thread):
    """Samples the collector's RSS and throttling every 0.2 s; can switch the traffic's
    phase when the first refusal for memory is seen."""

    def __init__(self, collector: CollectorProcess, traffic: Traffic | None = None) -> None:
        super().__init__(name="collector-watch", daemon=True)
        self.collector = collector
        self.traffic = traffic
        self.halt = threading.Event()
        self.peak_rss = 0
        self.memory_refusals_seen = False

    def run(self) -> None:
        while not self.halt.wait(0.2):
            try:
                rss, _ = self.collector.memory()
                self.peak_rss = max(self.peak_rss, rss)
                if self.traffic is not None and not self.memory_refusals_seen:
                    memory = self.collector.metrics().get(f'{_THROTTLED}{{reason="memory"}}', 0)
                    if memory:
                        self.memory_refusals_seen = True
                        self.traffic.phase = "after the first refusal"
            except (OSError, KeyError):
                continue

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


def _latency(seconds: list[float]) -> str:
    """``p50 / p99 / max`` of answer times."""
    if not seconds:
        return "none"
    ordered = sorted(seconds)
    p50, p99 = (ordered[int(q * (len(ordered) - 1))] for q in (0.5, 0.99))
    return f"{p50:.2f} / {p99:.2f} / {ordered[-1]:.2f} s"


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}"


def test_overload_at_three_times_capacity_gets_back_pressure_within_the_memory_limit(
    tmp_path: Path,
) -> None:
    with (
        OtlpSink(keep=False, track_ids=True) as backend,
        CollectorProcess(
            tmp_path / "data",
            export_endpoint=f"127.0.0.1:{backend.port}",
            memory_limit_mib=LIMIT_MIB,
        ) as collector,
    ):
        collector.start()
        idle_rss, _ = collector.memory()
        watch = _Watch(collector)
        watch.start()
        try:
            # 1. capacity: spans acknowledged per second to closed-loop senders.
            with Traffic(collector, senders=SENDERS, traces_per_request=20) as closed:
                time.sleep(WARMUP)
                acked0, delivered0 = closed.acked_spans(), backend.unique()
                cpu0 = collector.cpu_seconds()
                time.sleep(MEASURE)
                acked1, delivered1 = closed.acked_spans(), backend.unique()
                capacity_cpu = (collector.cpu_seconds() - cpu0) / MEASURE
            capacity_rss = watch.peak_rss
            acked_rate = (acked1 - acked0) / MEASURE
            delivered_rate = (delivered1 - delivered0) / MEASURE
            capacity = acked_rate
            time_until(lambda: backend.missing(closed.acked_keys()) == 0, 30, 0.2)
            throttled_before = collector.metrics()

            # 2. three times that, open loop.
            rate = FACTOR * capacity / 100  # requests/s of 100 spans
            watch.peak_rss = 0
            with Traffic(
                collector, senders=SENDERS, traces_per_request=20, rate=rate, first_index=101
            ) as flood:
                flood.phase = "overload"
                time.sleep(OVERLOAD_WARMUP)
                acked0, delivered0 = flood.acked_spans(), backend.unique()
                cpu0 = collector.cpu_seconds()
                time.sleep(OVERLOAD)
                acked_in_overload = flood.acked_spans() - acked0
                delivered_in_overload = backend.unique() - delivered0
                overload_cpu = (collector.cpu_seconds() - cpu0) / OVERLOAD
            overload_rss = watch.peak_rss
            metrics = collector.metrics()
            drained = time_until(
                lambda: backend.missing(flood.acked_keys()) == 0, DRAIN_SECONDS, 0.2
            )

            # 3. afterwards: a closed-loop burst is taken with no refusal.
            throttled_after = collector.metrics()
            with Traffic(collector, senders=4, first_index=201) as after:
                time.sleep(1.0)
            time_until(lambda: backend.missing(after.acked_keys()) == 0, 30, 0.2)
            after_metrics = collector.metrics()
        finally:
            watch.stop()
        _, peak_rss = collector.memory()
        missing = sum(backend.missing(t.acked_keys()) for t in (closed, flood, after))
        exit_status = collector.stop()

    not_sent = flood.answers()[TOO_MANY_IN_FLIGHT]
    offered = (flood.offered_requests() - not_sent) * flood.spans_per_request
    flood_seconds = OVERLOAD_WARMUP + OVERLOAD
    answers = flood.answers()
    grpc, http = flood.answers(protocol="grpc"), flood.answers(protocol="http")
    others = {a: n for a, n in answers.items() if a not in (OK, BACKPRESSURE)}

    def refusals(before: dict[str, float], now: dict[str, float]) -> dict[str, int]:
        return {
            reason: int(now.get(f'{_THROTTLED}{{reason="{reason}"}}', 0))
            - int(before.get(f'{_THROTTLED}{{reason="{reason}"}}', 0))
            for reason in ("overload", "memory", "disk")
        }

    reasons = refusals(throttled_before, metrics)
    after_reasons = refusals(throttled_after, after_metrics)
    after_answers = after.answers()
    limit = LIMIT_MIB << 20
    factor = offered / flood_seconds / capacity
    share = acked_in_overload / OVERLOAD / capacity
    table = [
        ["phase", "seconds", "offered spans/s", "acknowledged spans/s", "delivered spans/s",
         "back-pressure answers", "collector CPU", "peak RSS"],
        ["capacity (closed loop)", f"{MEASURE:g}", "as answered", f"{acked_rate:,.0f}",
         f"{delivered_rate:,.0f}", f"{closed.answers()[BACKPRESSURE]:,}",
         f"{capacity_cpu:.0%} of a core", _mib(capacity_rss)],
        [f"{FACTOR}x (open loop)", f"{OVERLOAD:g}", _rate(offered, flood_seconds),
         _rate(acked_in_overload, OVERLOAD), _rate(delivered_in_overload, OVERLOAD),
         f"{answers[BACKPRESSURE]:,} (gRPC {grpc[BACKPRESSURE]:,}, HTTP {http[BACKPRESSURE]:,})",
         f"{overload_cpu:.0%} of a core", _mib(overload_rss)],
    ]  # fmt: skip
    held, did_not_hold = [], []
    (held if factor >= 0.9 * FACTOR else did_not_hold).append(
        f"The open-loop client offered {factor:.2f}x the measured capacity of "
        f"{capacity:,.0f} spans/s ({SENDERS} senders, half OTLP/gRPC, half OTLP/HTTP, "
        f"{flood.offered_requests() - not_sent:,} requests of 100 spans in "
        f"{flood_seconds:.0f} s)."
    )
    (held if answers[BACKPRESSURE] and not flood.no_retry_hint() else did_not_hold).append(
        f"The collector acknowledged {answers[OK]:,} requests and refused "
        f"{answers[BACKPRESSURE]:,} with back-pressure, {flood.no_retry_hint()} of them "
        "without a retry hint (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED with a "
        f"RetryInfo); by reason: {reasons['overload']:,} would have waited, or had waited, "
        f"over max_request_wait (2 s), {reasons['memory']:,} memory, {reasons['disk']:,} disk."
    )
    (held if share >= GOODPUT_TARGET else did_not_hold).append(
        f"Overloaded, the collector acknowledged {share:.0%} of its closed-loop capacity "
        f"({acked_in_overload / OVERLOAD:,.0f} spans/s over {OVERLOAD:g} s after a "
        f"{OVERLOAD_WARMUP:g} s warm-up) and delivered {delivered_in_overload / OVERLOAD:,.0f} "
        f"spans/s, with {overload_cpu:.0%} of a core busy ({capacity_cpu:.0%} at capacity); "
        f"it refused {answers[BACKPRESSURE] / flood_seconds:,.0f} requests/s, and the client "
        f"offering the load shared the machine's {os.cpu_count()} cores with it. The "
        f"target is {GOODPUT_TARGET:.0%}."
    )
    if capacity_cpu < 0.8:
        did_not_hold.append(
            f"The collector used only {capacity_cpu:.0%} of a core while its capacity was "
            "measured: the closed-loop senders, or other work on the machine, limited the "
            "figure, so the load offered was less than three times what the collector "
            "could take."
        )
    (held if flood.peak_in_flight < flood.max_in_flight else did_not_hold).append(
        f"Answer times (p50 / p99 / max), accepted: {_latency(flood.latencies.get(OK, []))}; "
        f"back-pressure: {_latency(flood.latencies.get(BACKPRESSURE, []))}. At most "
        f"{flood.peak_in_flight:,} requests were in flight at once (the client holds "
        f"requests back past {flood.max_in_flight:,}, 11 s of the offered rate)."
    )
    (did_not_hold if others else held).append(
        "No request got any other answer (no timeout, no 5xx, none held back)."
        if not others
        else f"Requests got other answers: {others}."
    )
    (held if peak_rss < limit else did_not_hold).append(
        f"Peak RSS over the whole run (VmHWM) was {_mib(peak_rss)}, under memory_limit_mib "
        f"{LIMIT_MIB} (idle {_mib(idle_rss)}; {_mib(overload_rss)} at most while overloaded)."
    )
    (did_not_hold if missing else held).append(
        f"{flood.acked_spans() + closed.acked_spans() + after.acked_spans() - missing:,} of "
        f"{flood.acked_spans() + closed.acked_spans() + after.acked_spans():,} acknowledged "
        "spans reached the backend"
        + (f"; those of the overload all {drained:.1f} s after it ended." if drained else ".")
    )
    (did_not_hold if after_answers[BACKPRESSURE] or not after_answers[OK] else held).append(
        f"Right after the overload a 1 s closed-loop burst got {after_answers[OK]:,} requests "
        f"accepted and {after_answers[BACKPRESSURE]:,} refused"
        + (
            f" (by reason: {', '.join(f'{r} {n}' for r, n in after_reasons.items() if n)})."
            if after_answers[BACKPRESSURE]
            else "."
        )
    )
    record(
        "collector-overload",
        tried=[
            f"The collector CLI with memory_limit_mib {LIMIT_MIB}, exporting to an OTLP/gRPC "
            f"sink on loopback: its capacity measured with {SENDERS} closed-loop senders for "
            f"{MEASURE:.0f} s, then {FACTOR}x that offered for {OVERLOAD:.0f} s by an "
            "open-loop client (requests on schedule whatever the answers, each with a 10 s "
            "timeout, not sent again when refused).",
        ],
        table=table,
        held=held,
        did_not_hold=did_not_hold,
        notes=[
            "**Found and fixed by this test.** Overloaded, the collector answered nothing with "
            "back-pressure. Every request was queued for a worker thread and answered "
            "after up to 8 s (1,000 in flight at 3x), close to the senders' 10 s timeout, "
            "after which a sender sends its request again. A request that waited longer "
            "than max_request_wait (2 s by default) for a worker is now refused before it "
            "is decoded, which costs the collector almost nothing.",
            "**Found and fixed by this test.** The memory limit was judged on RSS, which "
            "does not fall when spans are handed on: CPython's small-object allocator "
            "keeps an arena resident while any object in it lives (after a 3x overload, "
            "62 MiB of a 160 MiB RSS was free inside it). Once overloaded, the collector "
            "went on refusing 'for memory' with the spans long handed on: at full scale it "
            "acknowledged 48 to 57 % of its capacity, with 33,000 to 36,000 requests "
            "refused for memory, and it still refused 4 requests in the first second after "
            "the overload. It now judges memory in use: RSS less what that allocator holds "
            "free for reuse (collector/admission.py).",
            "**Found and fixed by this test.** Overloaded at 3x, a request was refused only "
            "once it had waited max_request_wait (2 s) for a worker thread: 1,500 to 2,600 "
            "requests sat in the receivers' queues, accepted ones were answered after up "
            "to 7 s, some got gRPC CANCELLED instead of an answer (145 in a full-scale "
            "run, which fails this test), and "
            "between bursts of refusals for memory (14,000 of them) the receivers took "
            "spans faster than the decision thread hands them on, so a burst after the "
            "overload could fill memory past the soft limit before the first trace was "
            "decided. A request is now refused as it arrives when the queue ahead of it "
            "would make it wait longer than max_request_wait (on OTLP/gRPC in grpc's "
            "serving thread, before the request message is read; on OTLP/HTTP before "
            "the body is read), and while memory in use is between 75 % and 80 % of the "
            "limit a request is held back, not refused, until the data in memory has "
            "been handed on (collector/receive.py, collector/admission.py). Back to back "
            "at full scale on the same machine: goodput 68 % before, 72 % after; no "
            "refusal for memory, no CANCELLED answer, accepted answers p99 2.5 s instead "
            "of 6.3 s, at most 1,131 requests in flight instead of 2,205, peak RSS 218 MiB "
            "instead of 243 MiB.",
            "**Found and fixed by this test.** In 4 of 6 full-scale runs, 4 to 229 gRPC "
            "requests got CANCELLED, each within 18 ms of being sent: grpc's core cancels "
            "the newest calls its one Python serving thread has not picked up yet, past "
            "1,000 of them (and at random up to 3,000). The gRPC server now lets it hold "
            "20,000 (collector/receive.py, GRPC_SERVER_OPTIONS), so each call gets the "
            "collector's own answer with a RetryInfo.",
            "**Not yet at the target.** Where goodput goes, from the collector's CPU time "
            "per thread over a 60 s overload (46 ms of CPU per 1,000 acknowledged spans at "
            "capacity, 61 overloaded): answering the three refused requests that come "
            "with each accepted one costs 10 ms (aiohttp's event loop 3.8, grpc's serving "
            "thread 3.9, grpc's C core 2.2), about 0.3 ms per refusal, in the same "
            "interpreter as the decision thread; the worker threads' ingest takes 4 ms "
            "more per 1,000 spans with more threads busy. A cheaper pipeline raises the "
            "capacity and with it the refusals per second, so this share grows.",
        ],
    )
    assert factor >= 0.9 * FACTOR, f"offered only {factor:.2f}x capacity"
    assert answers[BACKPRESSURE] > 0
    assert flood.no_retry_hint() == 0
    assert not others, others
    assert peak_rss < limit, f"peak RSS {peak_rss >> 20} MiB"
    assert missing == 0, f"{missing} acknowledged spans lost"
    assert after_answers[OK] > 0 and after_answers[BACKPRESSURE] == 0
    assert exit_status == 0


def test_memory_limit_refuses_data_before_rss_reaches_it(tmp_path: Path) -> None:
    """Traces held in memory for their decision: only the limit stops RSS growing."""
    limit_mib = int(scale(160, 256))  # idle RSS is about 80 MiB
    hold = scale(4.0, 10.0)
    seconds = scale(6.0, 30.0)
    with (
        OtlpSink(keep=False, track_ids=True) as backend,
        CollectorProcess(
            tmp_path / "data",
            export_endpoint=f"127.0.0.1:{backend.port}",
            memory_limit_mib=limit_mib,
            decision_wait=hold,
            early_grace=hold,
        ) as collector,
    ):
        collector.start()
        idle_rss, _ = collector.memory()
        with Traffic(collector, senders=4, traces_per_request=20) as traffic:
            watch = _Watch(collector, traffic)
            watch.start()
            try:
                time.sleep(seconds)
            finally:
                watch.stop()
        drained = time_until(lambda: backend.missing(traffic.acked_keys()) == 0, DRAIN_SECONDS, 0.2)
        _, peak_rss = collector.memory()
        memory_refusals = collector.metrics().get(f'{_THROTTLED}{{reason="memory"}}', 0)
        missing = backend.missing(traffic.acked_keys())
        exit_status = collector.stop()

    limit = limit_mib << 20
    later = traffic.answers("after the first refusal")
    held, did_not_hold = [], []
    (held if memory_refusals and peak_rss < limit else did_not_hold).append(
        f"With traces held {hold:.0f} s for their decision and 4 closed-loop senders for "
        f"{seconds:.0f} s, the collector refused {memory_refusals:,.0f} requests for memory "
        f"(memory in use over the soft limit, {_mib(limit * 0.8)}, 80 % of memory_limit_mib "
        f"{limit_mib}, or still over 75 % after requests were held back for "
        f"{PRESS_SECONDS:g} s); peak RSS (VmHWM) was {_mib(peak_rss)}, idle {_mib(idle_rss)}."
    )
    (held if later[OK] else did_not_hold).append(
        f"It took data again as held traces were handed on: after the first refusal, "
        f"{later[OK]:,} requests were accepted and {later[BACKPRESSURE]:,} refused."
    )
    (did_not_hold if missing else held).append(
        f"{traffic.acked_spans() - missing:,} of {traffic.acked_spans():,} acknowledged "
        "spans reached the backend"
        + (f", all {drained:.1f} s after the senders stopped." if drained is not None else ".")
    )
    record(
        "collector-overload",
        tried=[
            f"The memory limit alone: the collector CLI with memory_limit_mib {limit_mib} and "
            f"decision_wait = early_grace = {hold:.0f} s, so that every span is held in "
            f"memory that long; 4 closed-loop senders for {seconds:.0f} s.",
        ],
        held=held,
        did_not_hold=did_not_hold,
    )
    assert memory_refusals > 0, "memory in use never reached the soft limit"
    assert peak_rss < limit, f"peak RSS {peak_rss >> 20} MiB"
    assert later[OK] > 0
    assert missing == 0
    assert exit_status == 0


def test_memory_limit_option_from_file_environment_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "collector.yaml"
    path.write_text("memory_limit_mib: 300\nmax_request_wait: 1.5\n")
    env = {"OTEL_DL_COLLECTOR_MEMORY_LIMIT_MIB": "400"}
    from_file = load_config(path)
    from_env = load_config(path, env)
    from_flag = load_config(path, env, {"memory_limit_mib": "500", "max_request_wait": "0"})
    resolved = (from_file.memory_limit_mib, from_env.memory_limit_mib, from_flag.memory_limit_mib)
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_DL_COLLECTOR_")}
    too_low = subprocess.run(
        [
            sys.executable,
            "-m",
            "otel_dl.collector",
            "--memory-limit-mib",
            "64",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--api-port",
            "0",
            "--store",
            "none",
        ],
        cwd=tmp_path,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    message = too_low.stderr.strip().splitlines()[-1] if too_low.stderr.strip() else ""
    held = []
    if resolved == (300, 400, 500) and from_flag.max_request_wait == 0:
        held.append(
            "memory_limit_mib resolves flag over environment over file (300 from the file, "
            "400 from OTEL_DL_COLLECTOR_MEMORY_LIMIT_MIB, 500 from --memory-limit-mib); "
            "max_request_wait likewise, 0 turning the wait bound off."
        )
    if too_low.returncode == 2 and "memory_limit_mib 64" in message:
        held.append(f"A limit under the collector's own start-up memory stops it: `{message}`.")
    record(
        "collector-overload",
        tried=["The memory_limit_mib option from a file, the environment and a flag."],
        held=held,
        did_not_hold=[] if len(held) == 2 else [f"Resolved {resolved}; CLI said {message!r}."],
    )
    assert resolved == (300, 400, 500)
    assert from_file.max_request_wait == 1.5 and from_flag.max_request_wait == 0
    assert too_low.returncode == 2, too_low.stderr
    assert "give at least" in message
