"""Overhead of the Feast and dataset-reader instrumentors, instrumented vs bare, same run.

    .venv/bin/python benchmarks/ingest.py [--repeats 7]

Cases: ``FeatureStore.get_online_features`` for 100 entities x 10 features from a real
SQLite online store (a Feast repository built in a temporary directory), and
``pandas.read_parquet`` of a 10 MB file. Bare and instrumented blocks alternate in one
process (bare runs under ``suppress_instrumentation()``, which every wrapper honours) and
the table reports medians over the repeats. Spans go through a BatchSpanProcessor to an
exporter that discards them, so export cost is not counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from timing import Discard, per_call

import otel_dl

ENTITIES = 100
FEATURES = 10
PARQUET_BYTES = 10 << 20


def _paired(fn: Callable[[], Any], calls: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of ``fn`` bare and instrumented, alternating blocks."""

    def bare() -> Any:
        with suppress_instrumentation():
            return fn()

    for warm in (bare, fn):
        per_call(warm, max(calls // 5, 1))
    b, t = [], []
    for _ in range(repeats):
        b.append(per_call(bare, calls))
        t.append(per_call(fn, calls))
    return statistics.median(b), statistics.median(t)


def _feast_case(root: Path, repeats: int) -> tuple[float, float]:
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.types import Float32
    from feast.value_type import ValueType

    now = pd.Timestamp.now(tz="UTC").floor("s")
    rng = np.random.default_rng(0)
    data = {f"f{i}": rng.random(ENTITIES).astype("float32") for i in range(FEATURES)}
    pd.DataFrame(
        {"entity_id": np.arange(ENTITIES), **data, "event_timestamp": [now] * ENTITIES}
    ).to_parquet(root / "features.parquet")
    (root / "feature_store.yaml").write_text(
        f"project: bench\nregistry: {root / 'registry.db'}\nprovider: local\n"
        f"online_store:\n  type: sqlite\n  path: {root / 'online.db'}\n"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    store = FeatureStore(repo_path=str(root))
    entity = Entity(name="entity", join_keys=["entity_id"], value_type=ValueType.INT64)
    view = FeatureView(
        name="stats",
        entities=[entity],
        ttl=dt.timedelta(days=1),
        schema=[Field(name=f"f{i}", dtype=Float32) for i in range(FEATURES)],
        source=FileSource(path=str(root / "features.parquet"), timestamp_field="event_timestamp"),
    )
    with suppress_instrumentation():
        store.apply([entity, view])
        store.materialize(
            (now - pd.Timedelta(days=1)).to_pydatetime(), (now + pd.Timedelta(seconds=1))
        )
    refs = [f"stats:f{i}" for i in range(FEATURES)]
    rows = {"entity_id": list(range(ENTITIES))}
    return _paired(lambda: store.get_online_features(refs, rows), 40, repeats)


def _parquet_case(root: Path, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    # Uncompressed parquet stores float64 with some overhead: 5/6 of the raw rows fill 10 MB.
    rows = PARQUET_BYTES * 5 // (6 * 8 * 8)
    frame = pd.DataFrame({f"c{i}": rng.normal(size=rows) for i in range(8)})
    path = root / "ten_mb.parquet"
    frame.to_parquet(path, compression=None)
    return _paired(lambda: pd.read_parquet(path), 10, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    repeats = parser.parse_args().repeats
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=100_000))
    trace.set_tracer_provider(provider)
    handle = otel_dl.instrument(metrics_exporter="none", include=["feast", "ingest"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [
            (
                f"get_online_features, {ENTITIES} entities x {FEATURES} features",
                *_feast_case(root, repeats),
            ),
            ("read_parquet, 10 MB file", *_parquet_case(root, repeats)),
        ]
        size = (root / "ten_mb.parquet").stat().st_size
    handle.shutdown()
    print(f"repeats: {repeats}, parquet file: {size / 2**20:.1f} MiB\n")
    print(f"{'case':<50} {'bare':>10} {'instrumented':>13} {'ratio':>7}")
    for name, bare, traced in rows:
        print(f"{name:<50} {bare * 1e3:>8.2f}ms {traced * 1e3:>11.2f}ms {traced / bare:>7.3f}")


if __name__ == "__main__":
    main()
