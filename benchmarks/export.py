"""Span export cost: the official OTLP encoder against otel-dl's fast one, in one run.

Two cases, on realistic otel-dl spans (16 attributes with dl.* doubles, strings, ints, a
bool and a string array, one event, a five-attribute resource):

- CPU seconds per exported span (``time.process_time``), for encode + serialize alone
  and for a full ``export()`` through the real gRPC exporter to a loopback OTLP sink
  (the sink runs in a child process, so its CPU is not counted). Median of repeats.
- Spans/s one process can ship without drops: spans are produced at a fixed rate into a
  ``BatchSpanProcessor`` with the default queue and batch sizes, exporting to the
  loopback sink; the rate doubles until spans are dropped, then is bisected.

Run: ``.venv/bin/python benchmarks/export.py [--quick]``
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as official_encode_spans,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otel_dl.export import (
    DropCountingSpanProcessor,
    FastOTLPSpanExporter,
    encode_spans,
)

RESOURCE = {
    "service.name": "scorer",
    "service.version": "1.4.2",
    "host.name": "gpu-node-7",
    "deployment.environment": "prod",
    "process.pid": 4242,
}


def realistic_spans(count: int, seed: int = 1) -> list[ReadableSpan]:
    rnd = random.Random(seed)
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("otel_dl.instrumentors.dataloader", "0.3.0")
    with tracer.start_as_current_span("epoch"):
        for index in range(count):
            with tracer.start_as_current_span("dataloader.batch") as span:
                span.set_attributes(_attributes(rnd, index))
                span.add_event("drift.computed", {"dl.drift.score": rnd.random(), "rows": 256})
    return list(memory.get_finished_spans())


def _attributes(rnd: random.Random, index: int) -> dict[str, object]:
    return {
        "dl.stage": "dataloader",
        "dl.component": "torch.dataloader",
        "dl.data.source": "s3://bucket/2026-11-23.parquet",
        "dl.data.version": "2026-11-23",
        "dl.data.fingerprint": f"{rnd.getrandbits(64):016x}",
        "dl.batch.index": index,
        "dl.batch.size": 256,
        "dl.drift.score": rnd.random(),
        "dl.drift.method": "psi",
        "dl.drift.feature": f"f{rnd.randrange(32)}",
        "dl.drift.status": "ok",
        "dl.quality.nan_fraction": rnd.random() * 0.01,
        "dl.quality.out_of_range_fraction": rnd.random() * 0.05,
        "dl.quality.schema_mismatch": False,
        "dl.confidence.mean": rnd.random(),
        "dl.feature.views": ("user_stats", "item_stats"),
    }


def _sink(port_queue: multiprocessing.Queue, stop: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    from tests.otlp_sink import OtlpSink

    # Counting only: keeping every message would grow without bound over a long run.
    with OtlpSink(keep=False) as sink:
        port_queue.put(sink.endpoint)
        stop.wait()


def cpu_per_span(work: Callable[[], object], spans: int, repeats: int) -> float:
    """Median CPU seconds per span of ``work`` over ``repeats`` runs."""
    work()
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        samples.append((time.process_time() - start) / spans)
    return statistics.median(samples)


def ships_without_drops(
    make_exporter: Callable[[], SpanExporter], rate: float, seconds: float
) -> tuple[bool, float]:
    """Produce spans at ``rate``/s for ``seconds``: (none dropped, rate reached)."""
    processor = DropCountingSpanProcessor(make_exporter())
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("otel_dl.instrumentors.dataloader", "0.3.0")
    rnd = random.Random(2)
    total = int(rate * seconds)
    attributes = [_attributes(rnd, i) for i in range(256)]
    start = time.perf_counter()
    for index in range(total):
        due = start + index / rate
        while time.perf_counter() < due:
            time.sleep(max(0.0, min(0.001, due - time.perf_counter())))
        with tracer.start_as_current_span("dataloader.batch") as span:
            span.set_attributes(attributes[index % 256])
            span.add_event("drift.computed", {"dl.drift.score": 0.5, "rows": 256})
        if processor.dropped_spans:
            break
    reached = (index + 1) / (time.perf_counter() - start)
    provider.shutdown()
    return processor.dropped_spans == 0, reached


def max_rate(make_exporter: Callable[[], SpanExporter], seconds: float) -> tuple[float, bool]:
    """The highest drop-free rate, and whether the producer, not the export, was the limit."""
    low, high = 0.0, 1000.0
    while True:
        ok, reached = ships_without_drops(make_exporter, high, seconds)
        if not ok:
            break
        if reached < 0.9 * high:
            # This thread cannot make spans any faster, and all it made was shipped.
            return reached, True
        low, high = high, high * 2
    for _ in range(4):
        middle = (low + high) / 2
        if ships_without_drops(make_exporter, middle, seconds)[0]:
            low = middle
        else:
            high = middle
    return low, False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter runs")
    args = parser.parse_args(argv)
    # The rate search drops spans on purpose; the warnings would bury the table.
    logging.getLogger("otel_dl").setLevel(logging.ERROR)
    logging.getLogger("opentelemetry.sdk").setLevel(logging.ERROR)
    repeats = 5 if args.quick else 11
    seconds = 2.0 if args.quick else 4.0

    context = multiprocessing.get_context("spawn")
    endpoints: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    stop = context.Event()
    sink = context.Process(target=_sink, args=(endpoints, stop), daemon=True)
    sink.start()
    endpoint = endpoints.get(timeout=30)
    try:
        batch = realistic_spans(512)
        rows: list[tuple[str, float, float, str]] = []
        official = cpu_per_span(
            lambda: official_encode_spans(batch).SerializeToString(), len(batch), repeats
        )
        ours = cpu_per_span(lambda: encode_spans(batch).SerializeToString(), len(batch), repeats)
        rows.append(("CPU/span, encode + serialize (µs)", official * 1e6, ours * 1e6, "x"))

        official_exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
        fast_exporter = FastOTLPSpanExporter(endpoint=endpoint, insecure=True)
        official = cpu_per_span(lambda: official_exporter.export(batch), len(batch), repeats)
        ours = cpu_per_span(lambda: fast_exporter.export(batch), len(batch), repeats)
        rows.append(("CPU/span, export() to loopback gRPC (µs)", official * 1e6, ours * 1e6, "x"))
        official_exporter.shutdown()
        fast_exporter.shutdown()

        official_rate, official_bound = max_rate(
            lambda: OTLPSpanExporter(endpoint=endpoint, insecure=True), seconds
        )
        fast_rate, fast_bound = max_rate(
            lambda: FastOTLPSpanExporter(endpoint=endpoint, insecure=True), seconds
        )
        name = "spans/s shipped without drops"
        if official_bound or fast_bound:
            name += " (producer-bound)"
        rows.append((name, official_rate, fast_rate, "rate"))
    finally:
        stop.set()
        sink.join(10)

    print(f"{'case':<44} {'official':>10} {'otel-dl fast':>13} {'ratio':>7}")
    for name, official_value, ours_value, kind in rows:
        ratio = official_value / ours_value if kind == "x" else ours_value / official_value
        print(f"{name:<44} {official_value:>10.1f} {ours_value:>13.1f} {ratio:>6.2f}x")
    print(
        f"(medians of {repeats} repeats on batches of 512 spans; drop-free rate bisected"
        f" over {seconds:.0f} s runs)"
    )


if __name__ == "__main__":
    main()
