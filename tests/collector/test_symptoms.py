"""Issue 17: symptom first, slow links blame the callee, baselines per operation.

Where the old behaviour (``symptom_first=False``) gets a case wrong, the test runs it on
the same traces too, to show the test can fail.
Traces are hand-built OTLP spans, shaped like Jaeger's HotROD demo: a frontend server
span, its client calls, and the callees' server spans.
"""

from __future__ import annotations

import random
from typing import Any

from otel_dl import semconv
from otel_dl.collector.attribute import Attributor
from otel_dl.collector.catalog import load_catalog
from otel_dl.collector.enrich import enrich
from otel_dl.collector.spans import operation
from tests.collector.test_attribute import _forwarded_span, _trace

Row = tuple[str, str, int | None, float, float, dict[str, Any]]


def _attributor(symptom_first: bool = True, fp_budget: float = 0.001) -> Attributor:
    attributor = Attributor(
        load_catalog(), min_baseline_samples=5, fp_budget=fp_budget, symptom_first=symptom_first
    )
    _trace.attributor = attributor  # type: ignore[attr-defined]
    return attributor


def _decide(attributor: Attributor, rows: list[Row]):
    _trace.attributor = attributor  # type: ignore[attr-defined]
    records = _trace(rows)
    return attributor.decide(records[0].trace_id, records)


def _dispatch(
    rng: random.Random,
    *,
    redis_error: bool = False,
    customer_gap: float = 0.0,
    customer_work: float = 0.0,
    entry_error: bool = False,
) -> list[Row]:
    """frontend /dispatch → client call to customer → customer server span → mysql;
    then driver → redis (a failed redis call is retried, as HotROD's driver does)."""
    j = rng.uniform(0.0, 0.002)
    server = 0.05 + customer_work + j
    call = server + 0.002 + customer_gap
    redis = 0.01 + j
    end = 0.01 + call + 0.01 + 2 * redis + 0.01
    url = "http://127.0.0.1:8081/customer?customer=123"
    rows: list[Row] = [
        ("frontend", "HTTP GET /dispatch", None, 0.0, end, {"error": True} if entry_error else {}),
        ("frontend", "HTTP GET", 0, 0.01, 0.01 + call, {"client": True, "url.full": url}),
        (
            "customer",
            "HTTP GET /customer",
            1,
            0.011 + customer_gap,
            0.011 + customer_gap + server,
            {},
        ),
        ("mysql", "SQL SELECT", 2, 0.012 + customer_gap, 0.012 + customer_gap + server - 0.002, {}),
        ("driver", "FindNearest", 0, 0.02 + call, 0.02 + call + 2 * redis, {}),
        (
            "redis-manual",
            "GetDriver",
            4,
            0.02 + call,
            0.02 + call + redis,
            {"error": True} if redis_error else {},
        ),
        ("redis-manual", "GetDriver", 4, 0.02 + call + redis, 0.02 + call + 2 * redis, {}),
    ]
    return rows


def _warm(attributor: Attributor, rng: random.Random, n: int = 60) -> None:
    for i in range(n):
        # Every 5th redis call fails and is retried, as in HotROD: part of normal traffic.
        decision = _decide(attributor, _dispatch(rng, redis_error=i % 5 == 0))
        if attributor.symptom_first:
            assert not decision.fault, (i, decision.evidence)


def test_a_retried_error_in_a_trace_whose_entry_succeeded_is_not_a_fault():
    rng = random.Random(1)
    new, old = _attributor(), _attributor(symptom_first=False)
    _warm(new, rng)
    _warm(old, rng)
    flagged = {"new": 0, "old": 0}
    for i in range(50):
        rows = _dispatch(rng, redis_error=i % 5 == 0)
        flagged["new"] += _decide(new, rows).fault
        flagged["old"] += _decide(old, rows).fault
    assert flagged == {"new": 0, "old": 10}


def test_a_burst_of_errors_behind_a_fallback_is_a_fault():
    """The customer service fails every call, but the frontend answers with a default:
    no entry fails, yet this is an outage. One error is not a burst; many are."""
    rng = random.Random(9)
    attributor = _attributor()
    _warm(attributor, rng)
    verdicts = []
    for _ in range(10):
        rows = _dispatch(rng)
        rows[1] = (*rows[1][:5], {**rows[1][5], "error": True})
        rows[2] = (*rows[2][:5], {"error": True})
        verdicts.append(_decide(attributor, rows))
    assert not verdicts[0].fault
    last = verdicts[-1]
    assert last.fault and last.root.service == "customer"
    assert last.mode.kind == semconv.FAULT_KIND_ERROR
    # Once the customer service recovers, its traces are healthy again.
    for _ in range(25):
        decision = _decide(attributor, _dispatch(rng))
    assert not decision.fault


def test_a_background_error_is_not_blamed_when_the_entry_fails_elsewhere():
    rng = random.Random(2)
    attributor = _attributor()
    _warm(attributor, rng)
    rows = _dispatch(rng, redis_error=True, entry_error=True)
    # The customer call failed and so did the request; redis failed as usual and recovered.
    rows[1] = (*rows[1][:5], {**rows[1][5], "error": True})
    rows[2] = (*rows[2][:5], {"error": True})
    decision = _decide(attributor, rows)
    assert decision.fault and decision.root.service == "customer"
    assert "redis-manual" not in decision.candidates
    # An error the operation never makes in healthy traffic still counts, off the chain.
    rows[3] = (*rows[3][:5], {"error": True})
    assert "mysql" in _decide(attributor, rows).candidates


def test_a_slow_link_blames_the_callee_not_the_caller():
    rng = random.Random(3)
    new, old = _attributor(), _attributor(symptom_first=False)
    _warm(new, rng)
    _warm(old, rng)
    # The customer's server span is normal; its caller's client span waits 0.4 s longer:
    # a paused customer process (the request waits in its socket) or a slow network.
    rows = _dispatch(rng, customer_gap=0.4)
    decision = _decide(new, rows)
    assert decision.fault and decision.mode.kind == semconv.FAULT_KIND_LATENCY
    assert decision.root.service == "customer"
    assert decision.root.name == "HTTP GET /customer"
    assert decision.blame == semconv.FAULT_BLAME_LINK
    assert decision.candidates[0] == "customer"
    assert "link" in decision.evidence
    assert any(s.service == "frontend" and s.name == "HTTP GET" for s in decision.symptoms)
    enrich(decision)
    written = {kv.key: kv.value for kv in _forwarded_span(decision.root).attributes}
    assert written[semconv.DL_FAULT_BLAME].string_value == semconv.FAULT_BLAME_LINK
    before = _decide(old, rows)
    assert before.root.service == "frontend"


def test_a_slow_callee_is_blamed_for_its_own_work():
    rng = random.Random(4)
    attributor = _attributor()
    _warm(attributor, rng)
    decision = _decide(attributor, _dispatch(rng, customer_work=0.4))
    assert decision.fault and decision.root.service in ("customer", "mysql")
    assert decision.blame == semconv.FAULT_BLAME_SELF
    assert "frontend" not in decision.candidates[:1]


def _with_untraced_call(rows: list[Row], *, error: bool, entry_error: bool) -> list[Row]:
    """Add a client call to an external API with no traced callee (a refused connection
    or a 404 when ``error``)."""
    peer = {"client": True, "server.address": "api.partner.example"}
    rows = list(rows)
    if entry_error:
        rows[0] = (*rows[0][:5], {"error": True})
    rows.append(
        ("frontend", "HTTP POST", 0, 0.005, 0.006, {**peer, **({"error": True} if error else {})})
    )
    return rows


def test_an_untraced_call_that_failed_without_failing_the_entry_is_not_an_outage():
    rng = random.Random(5)
    new, old = _attributor(), _attributor(symptom_first=False)
    _warm(new, rng)
    _warm(old, rng)
    rows = _with_untraced_call(_dispatch(rng), error=True, entry_error=False)
    assert not _decide(new, rows).fault
    assert _decide(old, rows).mode.id == "external-dependency-error"
    # When the failed call did fail the request, it is the dependency's outage.
    rows = _with_untraced_call(_dispatch(rng), error=True, entry_error=True)
    decision = _decide(new, rows)
    assert decision.mode.id == "external-dependency-error"
    assert decision.blame == semconv.FAULT_BLAME_DEPENDENCY


def test_a_latency_spike_that_made_nothing_slow_is_not_a_fault():
    rng = random.Random(6)
    new, old = _attributor(), _attributor(symptom_first=False)

    def trace(spike: bool) -> list[Row]:
        # A background refresh runs beside the request's own work, off its critical path.
        side = 0.3 if spike else 0.02 + rng.uniform(0, 0.002)
        return [
            ("api", "POST /predict", None, 0.0, 0.5, {}),
            ("api", "model.forward", 0, 0.01, 0.45 + rng.uniform(0, 0.01), {}),
            ("cache", "refresh", 0, 0.01, 0.01 + side, {}),
        ]

    for _ in range(40):
        assert not _decide(new, trace(False)).fault
        _decide(old, trace(False))
    rows = trace(True)
    assert not _decide(new, rows).fault
    assert _decide(old, rows).mode.id == "slow-operation"


def test_healthy_entries_breach_the_slo_at_about_the_budget():
    """Spikes of one step that stay inside the request's usual latency are not faults:
    how many healthy traces are flagged is bounded by ``fp_budget`` on the entry's own
    learned distribution, not by each span's."""
    rng = random.Random(7)
    strict, loose = _attributor(fp_budget=0.001), _attributor(fp_budget=0.05)
    old = _attributor(symptom_first=False)

    def trace() -> list[Row]:
        step = 0.08 if rng.random() < 0.03 else rng.lognormvariate(-3.9, 0.05)
        work = rng.lognormvariate(-0.7, 0.1)
        return [
            ("api", "GET /score", None, 0.0, work + step + 0.002, {}),
            ("api", "model.forward", 0, 0.001, 0.001 + work, {}),
            ("scorer", "lookup", 0, 0.001 + work, 0.001 + work + step, {}),
        ]

    warm, measured = 500, 2000
    for _ in range(warm):
        rows = trace()
        for attributor in (strict, loose, old):
            _decide(attributor, rows)
    flagged = {"strict": 0, "loose": 0, "old": 0}
    for _ in range(measured):
        rows = trace()
        for name, attributor in (("strict", strict), ("loose", loose), ("old", old)):
            flagged[name] += _decide(attributor, rows).fault
    # The old rule flags every spike of the step (about 3 %); the entry's SLO quantile
    # keeps the calibrated rule near its budget, and a larger budget flags more.
    assert flagged["old"] > 0.02 * measured, flagged
    assert flagged["strict"] <= 0.004 * measured, flagged
    assert flagged["strict"] < flagged["loose"], flagged


def test_baselines_are_kept_per_operation_not_per_span_name():
    rng = random.Random(8)
    new, old = _attributor(), _attributor(symptom_first=False)

    def trace(route_seconds: float) -> list[Row]:
        # HotROD names its customer call (~300 ms) and its route calls (~50 ms) both
        # "HTTP GET"; only the URL tells them apart. Neither callee is traced here.
        customer = 0.3 + rng.uniform(0, 0.01)
        route = route_seconds + rng.uniform(0, 0.002)
        peer = "http://127.0.0.1:{}/{}?id={}"
        return [
            ("frontend", "HTTP GET /dispatch", None, 0.0, customer + route + 0.02, {}),
            (
                "frontend",
                "HTTP GET",
                0,
                0.005,
                0.005 + customer,
                {"client": True, "url.full": peer.format(8081, "customer", 123)},
            ),
            (
                "frontend",
                "HTTP GET",
                0,
                0.01 + customer,
                0.01 + customer + route,
                {"client": True, "url.full": peer.format(8083, "route", rng.randint(1, 999))},
            ),
        ]

    for _ in range(40):
        assert not _decide(new, trace(0.05)).fault
        _decide(old, trace(0.05))
    rows = trace(0.25)  # 5x the route's usual time, still under the customer call's
    decision = _decide(new, rows)
    assert decision.fault and decision.mode.id == "external-dependency-timeout"
    assert decision.root.attrs["url.full"].startswith("http://127.0.0.1:8083/route")
    before = _decide(old, rows)
    assert not before.fault or not before.root.attrs.get("url.full", "").count("/route")


def test_operation_names_the_route_and_the_peer():
    _attributor()
    records = _trace(
        [
            ("a", "HTTP GET", None, 0.0, 1.0, {"http.route": "/users/{id}"}),
            (
                "a",
                "HTTP GET",
                0,
                0.0,
                1.0,
                {"client": True, "url.full": "http://10.0.0.7:8081/users/4711/orders?x=1"},
            ),
            ("a", "work", 0, 0.0, 1.0, {}),
        ]
    )
    assert operation(records[0]) == "HTTP GET /users/{id}"
    assert operation(records[1]) == "HTTP GET /users/{}/orders @10.0.0.7:8081"
    assert operation(records[2]) == "work"


def _batches(rng: random.Random, alerts: set[int], n: int = 8) -> list[Row]:
    """A scoring request reading ``n`` batches from a loader; batches in ``alerts`` carry
    a drift score past the alert threshold."""
    rows: list[Row] = [("scorer", "POST /score", None, 0.0, 0.05 * n + 0.02, {})]
    for i in range(n):
        drift = 0.4 if i in alerts else rng.uniform(0.01, 0.08)
        status = semconv.DRIFT_STATUS_ALERT if i in alerts else semconv.DRIFT_STATUS_OK
        start = 0.01 + 0.05 * i
        rows.append(
            (
                "loader",
                "dataloader.next",
                0,
                start,
                start + 0.04 + rng.uniform(0, 0.002),
                {semconv.DL_DRIFT_SCORE: drift, semconv.DL_DRIFT_STATUS: status},
            )
        )
    return rows


def test_one_isolated_drift_alert_on_one_batch_is_not_a_fault():
    rng = random.Random(10)
    new, old = _attributor(), _attributor(symptom_first=False)
    for _ in range(20):
        rows = _batches(rng, set())
        assert not _decide(new, rows).fault
        _decide(old, rows)
    blip = _batches(rng, {5})
    assert not _decide(new, blip).fault
    assert _decide(old, blip).mode.id == "data-drift"
    # A healthy trace in between: the next blip is isolated again.
    assert not _decide(new, _batches(rng, set())).fault
    assert not _decide(new, _batches(rng, {2})).fault
    # A drifted source shows on batch after batch...
    decision = _decide(new, _batches(rng, {3, 4, 5, 6, 7}))
    assert decision.fault and decision.mode.id == "data-drift"
    assert decision.root.service == "loader"
    # ...or trace after trace, even on one batch each.
    assert not _decide(new, _batches(rng, set())).fault
    assert not _decide(new, _batches(rng, {7})).fault
    decision = _decide(new, _batches(rng, {7}))
    assert decision.fault and decision.mode.id == "data-drift"


def test_transient_noise_earlier_in_a_faulty_trace_does_not_outrank_the_fault():
    """The request failed because the customer service failed. Before that, a redis call
    failed and was retried, an external API answered 404 to a call whose answer is
    optional, and one loader batch drifted: none of them may be the root cause."""
    rng = random.Random(11)
    attributor = _attributor()
    _warm(attributor, rng)
    for _ in range(3):
        rows = _dispatch(rng)
        rows.append(
            ("frontend", "HTTP GET", 0, 0.001, 0.002, {"client": True, "server.address": "api.x"})
        )
        _decide(attributor, rows)

    rows = _dispatch(rng, redis_error=True, entry_error=True)
    rows[1] = (*rows[1][:5], {**rows[1][5], "error": True})
    rows[2] = (*rows[2][:5], {"error": True})
    # Noise, all starting before the customer call.
    rows.append(
        (
            "frontend",
            "HTTP GET",
            0,
            0.001,
            0.002,
            {
                "client": True,
                "server.address": "api.x",
                "error": True,
                "http.response.status_code": 404,
            },
        )
    )
    for i in range(4):
        status = semconv.DRIFT_STATUS_ALERT if i == 0 else semconv.DRIFT_STATUS_OK
        rows.append(
            (
                "loader",
                "dataloader.next",
                0,
                0.001 + 0.001 * i,
                0.0015 + 0.001 * i,
                {semconv.DL_DRIFT_SCORE: 0.4 if i == 0 else 0.02, semconv.DL_DRIFT_STATUS: status},
            )
        )
    # Move the retried redis call before the customer call too.
    rows[5] = (rows[5][0], rows[5][1], rows[5][2], 0.003, 0.004, rows[5][5])
    decision = _decide(attributor, rows)
    assert decision.fault and decision.root.service == "customer", decision.evidence
    assert decision.candidates[0] == "customer", decision.candidates
    assert not {"redis-manual", "loader"} & set(decision.candidates), decision.candidates
    assert decision.ranked_spans[-1].attrs.get("server.address") == "api.x"


def test_a_4xx_answer_at_the_entry_is_not_a_fault():
    rng = random.Random(12)
    new, old = _attributor(), _attributor(symptom_first=False)
    _warm(new, rng)
    _warm(old, rng)
    rows = _dispatch(rng)
    # Some servers mark their 4xx answers as errors; a bad request is the client's fault.
    rows[0] = (*rows[0][:5], {"error": True, "http.response.status_code": 404})
    assert not _decide(new, rows).fault
    assert _decide(old, rows).fault
    rows[0] = (*rows[0][:5], {"error": True, "http.response.status_code": 503})
    decision = _decide(new, rows)
    assert decision.fault and decision.root.service == "frontend"


def test_a_sub_millisecond_callee_whose_spans_double_is_the_root_cause():
    """CPU contention on a pricing service doubles its ~1.05 ms spans. The catalog's 10 ms
    floor hid it; its own floor (half its median) does not, once it is slow in more than
    one trace: a single doubled span is as likely jitter."""
    rng = random.Random(13)
    new, old = _attributor(), _attributor(symptom_first=False)

    def trace(work: float) -> list[Row]:
        url = "http://127.0.0.1:8085/price?item=7"
        return [
            ("frontend", "GET /quote", None, 0.0, work + 0.0004, {}),
            ("frontend", "HTTP GET", 0, 0.0001, 0.0003 + work, {"client": True, "url.full": url}),
            ("pricing", "GET /price", 1, 0.0002, 0.0002 + work, {}),
        ]

    for _ in range(60):
        rows = trace(rng.uniform(1.0e-3, 1.1e-3))
        assert not _decide(new, rows).fault
        _decide(old, rows)
    slow = [trace(rng.uniform(2.25e-3, 2.35e-3)) for _ in range(6)]
    assert not _decide(new, slow[0]).fault
    for rows in slow[1:]:
        decision = _decide(new, rows)
        assert decision.fault and decision.mode.kind == semconv.FAULT_KIND_LATENCY
        assert decision.root.service == "pricing" and decision.blame == semconv.FAULT_BLAME_SELF
    assert not any(_decide(old, rows).fault for rows in slow)
    # Back to normal: healthy again.
    assert not _decide(new, trace(rng.uniform(1.0e-3, 1.1e-3))).fault


def test_a_moderate_slow_link_that_breaches_the_slo_is_blamed_on_the_callee():
    """+40 ms on a 50 ms call stays under twice the client span's p99, so no span's own
    rule fires; but it is why the request breached its SLO, and the callee's span is
    normal: a slow link into the callee (HotROD's customer link under a +200 ms toxic)."""
    rng = random.Random(11)
    attributor = _attributor()
    _warm(attributor, rng, n=200)
    decision = _decide(attributor, _dispatch(rng, customer_gap=0.04))
    assert decision.fault and decision.mode.kind == semconv.FAULT_KIND_LATENCY
    assert decision.root.service == "customer"
    assert decision.blame == semconv.FAULT_BLAME_LINK
    assert "of the slow entry's excess" in decision.evidence
    # The same request without the delay is no fault.
    assert not _decide(attributor, _dispatch(rng)).fault
