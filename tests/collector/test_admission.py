"""Admission: what the collector takes, holds back or refuses, and when it decides.

The memory guard judges memory in use, not the resident set a burst leaves behind.
CPython's small-object allocator keeps an arena resident while any object in it lives,
so after a burst is freed RSS stays near its peak. Judged on RSS alone, a collector
that had handed every span on went on refusing data (tests/reliability/
test_collector_overload.py saw it refuse in the first second after an overload, and
once take nothing again after its first refusal).

The receivers refuse a request as it arrives when it would wait longer than
max_request_wait for a worker (before a gRPC request message or an HTTP body is read),
hold a request back while memory in use is above the pace limit, and refuse it for
memory when that does not let memory fall. These tests use real collectors, real gRPC
and HTTP clients, the real allocator and the process's real ``/proc/self/statm``: no
mocks. A stalled pipeline is its lock held; memory pressure is memory allocated.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from otel_dl.collector import admission
from otel_dl.collector.pipeline import Collector
from otel_dl.collector.receive import WORKERS
from tests.collector.conftest import EXPORT_METHOD, retry_delay, span_request

MIB = 1 << 20
# Bytes objects of 56 payload bytes: pymalloc's 96-byte class, 170 to a 16 KiB pool.
_PAYLOAD = 48
_BURST = 600_000  # about 55 MiB of objects, like ~35k buffered spans
_KEEP_EVERY = 100  # one survivor in every pool keeps every arena resident


def _burst(tag: int) -> list[bytes]:
    return [bytes(_PAYLOAD) + (tag * _BURST + i).to_bytes(8, "big") for i in range(_BURST)]


@pytest.mark.skipif(
    admission._ALLOCATOR is None,
    reason="pymalloc statistics unreadable here (PYTHONMALLOC set, or no open_memstream)",
)
def test_freed_python_memory_is_free_for_the_guard_and_reused_before_rss_grows() -> None:
    gc.collect()
    before = admission.rss_bytes()
    data = _burst(1)
    peak = admission.rss_bytes()
    survivors = data[::_KEEP_EVERY]
    del data
    gc.collect()
    rss = admission.rss_bytes()
    free = admission.python_free_bytes()
    assert peak - before > 40 * MIB, "the burst did not take memory"
    # The premise: RSS stays high after the burst is freed, the memory is free inside
    # Python's allocator.
    assert rss - before > 0.8 * (peak - before), (before >> 20, peak >> 20, rss >> 20)
    assert free > 0.8 * (peak - before), (free >> 20, (peak - before) >> 20)

    # A soft limit between the memory in use and RSS: RSS alone would refuse.
    in_use = rss - free
    guard = admission.MemoryGuard(int((rss + in_use) / 2 / admission.SOFT_LIMIT_FRACTION))
    assert guard.soft_limit < rss
    assert guard.sample() is False
    assert guard.rss > guard.soft_limit > guard.in_use

    # And it is safe: a second burst of the same size reuses that memory first.
    again = _burst(2)
    grown = admission.rss_bytes() - rss
    assert grown < 0.2 * (peak - before), f"RSS grew {grown >> 20} MiB on reuse"
    assert guard.sample() is True  # now the memory is in use again: refuse
    assert guard.in_use > guard.soft_limit
    del again, survivors


# --- the receivers' queues: refused as they arrive -----------------------------------------
_PROTOBUF = {"Content-Type": "application/x-protobuf"}


def test_timed_executor_expects_the_wait_and_forgets_cancelled_tasks() -> None:
    pool = admission.TimedExecutor(1)
    release = threading.Event()
    try:
        pool.submit(release.wait)
        queued = [pool.submit(admission.waited) for _ in range(3)]
        time.sleep(0.3)
        assert pool.queued == 3 and pool.backlog == 3  # its one worker is busy
        assert 0.25 < pool.expected_wait() < 1.0  # the oldest has waited 0.3 s
        # A task cancelled before it starts (asyncio does it when a client goes away)
        # leaves the figures at once, wherever it stands in the queue.
        assert queued[0].cancel() and queued[2].cancel()
        assert pool.queued == 1
        release.set()
        assert queued[1].result(timeout=5) >= 0.3
        assert pool.queued == 0 and pool.expected_wait() == 0.0
    finally:
        release.set()
        pool.shutdown()


def test_timed_executor_backlog_counts_only_tasks_no_free_worker_can_start() -> None:
    pool = admission.TimedExecutor(3)
    release = threading.Event()
    try:
        busy = [pool.submit(release.wait) for _ in range(2)]
        time.sleep(0.2)
        assert pool.queued == 0 and pool.backlog == 0  # two busy, one free
        waiting = [pool.submit(release.wait) for _ in range(3)]
        time.sleep(0.2)
        assert pool.queued == 2 and pool.backlog == 2  # all three busy
        release.set()
        for future in busy + waiting:
            future.result(timeout=5)
        assert pool.queued == 0 and pool.backlog == 0
    finally:
        release.set()
        pool.shutdown()


def _throttled(collector: Collector, reason: str) -> float:
    return collector.metrics.requests_throttled.labels(reason)._value.get()


def _grpc_export(channel: grpc.Channel, body: bytes, timeout: float = 10.0) -> Any:
    return channel.unary_unary(
        EXPORT_METHOD, response_deserializer=ExportTraceServiceResponse.FromString
    ).future(body, timeout=timeout)


def _retry_seconds(error: grpc.RpcError) -> float:
    """The RetryInfo delay of a gRPC error, 0 without one."""
    return retry_delay(error.trailing_metadata())  # type: ignore[attr-defined]


def test_grpc_request_is_refused_as_it_arrives_when_it_would_wait_too_long(
    make_collector: Callable[..., Collector],
) -> None:
    """The pipeline stalls (its lock held, as by a long decision round): the receiver's
    workers block, requests queue behind them. Once the oldest has waited longer than
    max_request_wait, a new request is refused at once, without waiting for a worker,
    and those still queued are refused when a worker takes them; then requests are
    taken again."""
    collector = make_collector(max_request_wait=0.3)
    body = span_request(1, 0, 2)
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        _grpc_export(channel, body).result(timeout=10)  # connected, workers warm
        with collector._lock:
            stuck = [_grpc_export(channel, span_request(1, i, 2)) for i in range(1, WORKERS + 5)]
            time.sleep(0.6)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                _grpc_export(channel, span_request(1, 99, 2)).result(timeout=10)
            answered = time.monotonic() - started
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _retry_seconds(refused.value) == 1.0
            assert "max_request_wait" in refused.value.details()
            assert answered < 0.3, f"refused after {answered:.2f} s"
            assert _throttled(collector, "overload") == 1
        codes = []
        for future in stuck:
            try:
                future.result(timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        # The workers had each taken one before the stall; the four queued waited too long.
        assert codes.count(grpc.StatusCode.OK) == WORKERS
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4
        _grpc_export(channel, span_request(1, 100, 2)).result(timeout=10)
    assert _throttled(collector, "overload") == 5


def test_a_burst_of_grpc_calls_gets_back_pressure_not_cancelled(
    make_collector: Callable[..., Collector],
) -> None:
    """5,000 calls at once, faster than grpc's one Python serving thread picks them up.
    Each must get the collector's own answer, RESOURCE_EXHAUSTED with a RetryInfo while
    its disk budget is spent: with grpc's default limits on calls not picked up yet, its
    core cancelled the newest and their clients got CANCELLED, with no retry hint."""
    collector = make_collector(queue_max_bytes=1)
    address = f"127.0.0.1:{collector.grpc_port}"
    with grpc.insecure_channel(address) as channel:
        _grpc_export(channel, span_request(1, 0, 2)).result(timeout=10)  # spends the budget
    codes: Counter[grpc.StatusCode] = Counter()
    hints: Counter[float] = Counter()

    async def burst() -> None:
        channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
        calls = [ch.unary_unary(EXPORT_METHOD) for ch in channels]
        body = span_request(1, 1, 20)

        async def one(i: int) -> None:
            try:
                await calls[i % len(calls)](body, timeout=60)
                codes[grpc.StatusCode.OK] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code()] += 1
                hints[_retry_seconds(exc)] += 1

        tasks = []
        for i in range(5_000):
            tasks.append(asyncio.create_task(one(i)))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        for ch in channels:
            await ch.close()

    asyncio.run(burst())
    # A request whose turn came once the journal had handed data on may be taken.
    refused = codes.pop(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
    assert refused > 4_000 and set(codes) <= {grpc.StatusCode.OK}, codes
    assert hints == {1.0: refused}


def test_http_request_is_refused_before_its_body_is_read_when_it_would_wait_too_long(
    make_collector: Callable[..., Collector],
) -> None:
    collector = make_collector(max_request_wait=0.3)
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"

    def post(seq: int) -> requests.Response:
        return requests.post(url, data=span_request(2, seq, 2), headers=_PROTOBUF, timeout=10)

    assert post(0).status_code == 200
    with ThreadPoolExecutor(WORKERS + 4) as senders:
        with collector._lock:
            stuck = [senders.submit(post, i) for i in range(1, WORKERS + 5)]
            time.sleep(0.6)
            started = time.monotonic()
            refused = post(99)
            answered = time.monotonic() - started
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert "max_request_wait" in refused.text
            assert answered < 0.3, f"refused after {answered:.2f} s"
        statuses = sorted(f.result(timeout=10).status_code for f in stuck)
    assert statuses == [200] * WORKERS + [429] * 4
    assert post(100).status_code == 200
    assert _throttled(collector, "overload") == 5


# --- memory: held back above the pace limit, refused above the soft limit ------------------
def _memory_limited(make_collector: Callable[..., Collector], **flags: Any) -> Collector:
    """A collector whose pace limit is 40 MiB above the process's memory now."""
    gc.collect()
    limit_mib = int((admission.rss_bytes() + 40 * MIB) / admission.PACE_FRACTION / MIB) + 1
    collector = make_collector(memory_limit_mib=limit_mib, **flags)
    assert collector.memory is not None
    return collector


def _fill_to(guard: admission.MemoryGuard, level: int) -> list[bytearray]:
    """Memory, allocated and touched, that brings the guard's memory in use to ``level``.

    Topped up until it does: a sample may hand freed heap pages back to the system
    (``malloc_trim``, once memory is past the guard's trim level), and memory in use then
    falls by what earlier tests left freed but resident."""
    blobs = []
    for _ in range(5):
        guard.sample()
        if guard.in_use >= level:
            break
        blobs.append(bytearray(b"\x01") * (level - guard.in_use))
    guard.sample()
    return blobs


@pytest.mark.skipif(not admission.rss_supported(), reason="needs /proc/self/statm")
def test_request_is_held_back_while_memory_is_above_the_pace_limit_then_taken(
    make_collector: Callable[..., Collector],
) -> None:
    """Memory in use between the pace and the soft limit: a request is neither taken nor
    refused; it waits, and is taken once memory falls (as when buffered spans are handed
    on), within max_request_wait. Closed-loop senders slow down instead of being refused."""
    collector = _memory_limited(make_collector, max_request_wait=5)
    guard = collector.memory
    assert guard is not None
    middle = (guard.pace_limit + guard.soft_limit) // 2
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    with (
        grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel,
        ThreadPoolExecutor(1) as sender,
    ):
        _grpc_export(channel, span_request(3, 0, 2)).result(timeout=10)
        blob = _fill_to(guard, middle)
        assert guard.pressing and not guard.over, (guard.in_use >> 20, guard.pace_limit >> 20)
        held_grpc = _grpc_export(channel, span_request(3, 1, 2))
        held_http = sender.submit(
            requests.post, url, data=span_request(3, 2, 2), headers=_PROTOBUF, timeout=10
        )
        time.sleep(0.5)
        assert not held_grpc.done() and not held_http.done()
        received = collector.metrics.spans_received._value.get()
        del blob
        held_grpc.result(timeout=5)
        assert held_http.result(timeout=5).status_code == 200
    assert collector.metrics.spans_received._value.get() == received + 20
    assert sum(_throttled(collector, r) for r in ("memory", "overload", "disk")) == 0


@pytest.mark.skipif(not admission.rss_supported(), reason="needs /proc/self/statm")
def test_while_requests_are_held_back_one_more_may_queue_and_later_ones_are_refused_at_once(
    make_collector: Callable[..., Collector],
) -> None:
    """Held requests keep their bodies in memory, and memory that holding does not bring
    down (calls not yet answered, the allocators' free space) is not brought down by
    queueing more behind them. While memory is above the pace limit, every worker may
    hold a request and one more may wait for a busy worker; a request arriving while one
    waits is refused for memory at once, before it is read."""
    collector = _memory_limited(make_collector, max_request_wait=5)
    guard = collector.memory
    assert guard is not None
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        _grpc_export(channel, span_request(7, 0, 2)).result(timeout=10)
        blob = _fill_to(guard, (guard.pace_limit + guard.soft_limit) // 2)
        assert guard.pressing and not guard.over
        calls = []
        for seq in range(1, WORKERS + 4):
            calls.append(_grpc_export(channel, span_request(7, seq, 2)))
            time.sleep(0.05)  # each one arrives after the one before has a worker or waits
        refused = [c for c in calls if c.done() and c.exception() is not None]
        assert len(refused) == 2, [c.done() for c in calls]
        for call in refused:
            assert call.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "memory" in call.exception().details()
            assert _retry_seconds(call.exception()) == 1.0
        assert not any(c.done() for c in calls if c not in refused)
        del blob
        for call in calls[: WORKERS + 1]:
            call.result(timeout=5)
    assert _throttled(collector, "memory") == 2
    assert _throttled(collector, "overload") == 0


@pytest.mark.skipif(not admission.rss_supported(), reason="needs /proc/self/statm")
def test_request_held_back_longer_than_max_request_wait_is_refused(
    make_collector: Callable[..., Collector],
) -> None:
    collector = _memory_limited(make_collector, max_request_wait=0.5)
    guard = collector.memory
    assert guard is not None
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        _grpc_export(channel, span_request(4, 0, 2)).result(timeout=10)
        blob = _fill_to(guard, (guard.pace_limit + guard.soft_limit) // 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_export(channel, span_request(4, 1, 2)).result(timeout=10)
        held = time.monotonic() - started
        del blob
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_seconds(refused.value) == 1.0
    assert 0.5 <= held < 2.0
    assert _throttled(collector, "overload") == 1


@pytest.mark.skipif(not admission.rss_supported(), reason="needs /proc/self/statm")
def test_request_is_refused_as_it_arrives_while_memory_is_over_the_soft_limit(
    make_collector: Callable[..., Collector],
) -> None:
    collector = _memory_limited(make_collector)
    guard = collector.memory
    assert guard is not None
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        _grpc_export(channel, span_request(5, 0, 2)).result(timeout=10)
        blob = _fill_to(guard, guard.soft_limit + 8 * MIB)
        assert guard.over
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_export(channel, span_request(5, 1, 2)).result(timeout=10)
        answer = requests.post(url, data=span_request(5, 2, 2), headers=_PROTOBUF, timeout=10)
        del blob
        deadline = time.monotonic() + 5
        while guard.pressing and time.monotonic() < deadline:
            time.sleep(admission._SAMPLE_SECONDS)
        _grpc_export(channel, span_request(5, 3, 2)).result(timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_seconds(refused.value) == 1.0
    assert "memory" in refused.value.details()
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    assert _throttled(collector, "memory") == 2


@pytest.mark.skipif(not admission.rss_supported(), reason="needs /proc/self/statm")
def test_guard_refuses_once_memory_stays_above_the_pace_limit_until_it_falls_below_it() -> None:
    """Holding requests back must let memory fall: memory in use still above the pace
    limit after PRESS_SECONDS means the data in memory is not being handed on (traces
    held for their decision), and new data is refused. Refusing then stops only below
    the pace limit, so it does not flap as single requests come and go."""
    gc.collect()
    guard = admission.MemoryGuard(int((admission.rss_bytes() + 40 * MIB) / admission.PACE_FRACTION))
    middle = (guard.pace_limit + guard.soft_limit) // 2
    blob = _fill_to(guard, middle)
    assert guard.sample() is False and guard.pressing
    time.sleep(admission.PRESS_SECONDS)
    assert guard.sample() is True, "still pressing after PRESS_SECONDS"
    more = _fill_to(guard, guard.soft_limit + 8 * MIB)
    assert guard.sample() is True
    del more  # back between the limits: still refusing
    assert guard.sample() is True and guard.pressing
    del blob
    # Freed heap pages go back to the system when the guard trims, at most once a second;
    # whether the blob was mmapped (freed at once) depends on what this process freed before.
    deadline = time.monotonic() + 2.5
    while guard.sample() and time.monotonic() < deadline:
        time.sleep(admission._SAMPLE_SECONDS)
    assert guard.sample() is False and not guard.pressing


@pytest.mark.skipif(not admission.rss_supported(), reason="needs /proc/self/statm")
def test_request_held_back_while_memory_does_not_fall_is_refused_for_memory(
    make_collector: Callable[..., Collector],
) -> None:
    collector = _memory_limited(make_collector, max_request_wait=5)
    guard = collector.memory
    assert guard is not None
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        _grpc_export(channel, span_request(6, 0, 2)).result(timeout=10)
        blob = _fill_to(guard, (guard.pace_limit + guard.soft_limit) // 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_export(channel, span_request(6, 1, 2)).result(timeout=10)
        held = time.monotonic() - started
        answer = requests.post(url, data=span_request(6, 2, 2), headers=_PROTOBUF, timeout=10)
        del blob
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory" in refused.value.details()
    assert held < admission.PRESS_SECONDS + 1.0
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    assert _throttled(collector, "memory") == 2
    assert _throttled(collector, "overload") == 0
