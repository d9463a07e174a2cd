"""Signal-aware sampling on the collector's fault-injection suite.

    .venv/bin/python benchmarks/sampling.py [--every 10] [--per-kind 40] [--normal 400]

The simulated six-service system of ``tests/faultsim.py`` (the one the collector's accuracy
benchmark uses) exports through ``SignalAwareSpanProcessor(BatchSpanProcessor(OTLP),
every)`` in each service to an in-process OTLP sink. After warm-up traffic, every fault
kind is injected ``--per-kind`` times at random magnitudes, mixed with ``--normal``
normal traces. It prints, per kind, the share of fault traces whose root-cause span (the
span the fault was injected in) was exported, and the share of normal otel-dl spans
exported (expected: about 1 / every).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor

from otel_dl import semconv
from otel_dl.sampling import SignalAwareSpanProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.faultsim import TRUTH, System
from tests.otlp_sink import OtlpSink

# The otel-dl spans of one simulated trace (the others are SERVER/CLIENT spans, never dropped).
DL_SPANS = ("ingest.read", "feature_store.get", "preprocess.transform", "inference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--normal", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sink = OtlpSink().start()
    processors: list[SignalAwareSpanProcessor] = []

    def wrap(inner: SpanProcessor) -> SpanProcessor:
        processors.append(SignalAwareSpanProcessor(inner, args.every))
        return processors[-1]

    system = System(f"127.0.0.1:{sink.port}", rng, wrap)
    t0 = time.time_ns()
    for _ in range(args.warmup):
        system.request(None, t0)
        t0 += 50_000_000
    plan = [kind for kind in semconv.FAULT_KINDS for _ in range(args.per_kind)]
    plan += [None] * args.normal
    rng.shuffle(plan)
    sent: list[tuple[str | None, str, dict[str, str]]] = []
    for kind in plan:
        trace_id, ids = system.request(kind, t0)
        sent.append((kind, trace_id, ids))
        t0 += 50_000_000
    system.flush()
    system.shutdown()
    sink.stop()

    exported = {(t, s["span_id"]) for t, spans in sink.traces().items() for s in spans}

    print(f"signal-aware sampling, 1 in {args.every} normal spans kept\n")
    print(f"{'fault kind':<20} {'traces':>7} {'root cause kept':>16}")
    total_faults = kept_faults = 0
    for kind in semconv.FAULT_KINDS:
        runs = [(t, ids) for k, t, ids in sent if k == kind]
        span_name = TRUTH[kind][1]
        kept = sum((t, ids[span_name]) in exported for t, ids in runs)
        total_faults += len(runs)
        kept_faults += kept
        print(f"{kind:<20} {len(runs):>7} {kept / len(runs):>16.3f}")
    share = kept_faults / total_faults
    print(f"{'all faults':<20} {total_faults:>7} {share:>16.3f}  (target >= 0.99)")
    normal = [(t, ids) for k, t, ids in sent if k is None]
    emitted = len(normal) * len(DL_SPANS)
    kept_normal = sum((t, ids[name]) in exported for t, ids in normal for name in DL_SPANS)
    print(
        f"\nnormal otel-dl spans exported: {kept_normal}/{emitted} = {kept_normal / emitted:.3f}"
        f"  (about {1 / args.every:.3f} expected)"
    )
    kept = sum(p.kept for p in processors)
    dropped = sum(p.dropped for p in processors)
    print(f"all spans seen by the processors: {kept + dropped}, exported {kept}, dropped {dropped}")


if __name__ == "__main__":
    main()
