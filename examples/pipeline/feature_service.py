"""feature-service: customer features from a real Feast repository, served over HTTP.

At start it builds a Feast repository in ``--work-dir``: a parquet file source, the local
provider and a SQLite online store. It applies the ``customer_stats`` view and
materialises the latest values, which the hourly job wrote an hour ago. Then::

    POST /features  {"customer_ids": [...]}  ->  {"avg_amount_30d": [...], ...}

Faults (``--fault`` at start, or ``POST /admin/fault?name=...`` at run time):

- ``stale_features``: the materialisation job stopped three days ago. Rather than wait
  three days, the online store is rewritten with the values that job last wrote, whose
  event timestamps are three days old; Feast returns those timestamps, so freshness is
  what it would be.
- ``feature_exception``: every lookup raises.

Run it by hand with ``python examples/pipeline/feature_service.py --work-dir /tmp/fs``.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pandas as pd
import uvicorn
from common import CUSTOMER_FEATURES, FEATURES, customer_features
from fastapi import FastAPI
from feast import Entity, FeatureStore, FeatureView, Field, FileSource
from feast.types import Float32, Int64
from feast.value_type import ValueType

import otel_dl

VIEW = "customer_stats"
FRESH_AGE = pd.Timedelta(hours=1)
STALE_AGE = pd.Timedelta(days=3)


def build_repo(root: Path) -> FeatureStore:
    """Write the parquet source and repository config, apply the view, materialise."""
    root.mkdir(parents=True, exist_ok=True)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    values = customer_features()
    history = pd.concat(
        [
            values.assign(event_timestamp=now - STALE_AGE),
            values.assign(event_timestamp=now - FRESH_AGE),
        ]
    )
    history["created"] = history["event_timestamp"]
    history.to_parquet(root / "customer_stats.parquet")
    (root / "feature_store.yaml").write_text(
        f"project: payments\nregistry: {root / 'registry.db'}\nprovider: local\n"
        f"online_store:\n  type: sqlite\n  path: {root / 'online.db'}\n"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    store = FeatureStore(repo_path=str(root))
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    view = FeatureView(
        name=VIEW,
        entities=[customer],
        ttl=dt.timedelta(days=1),
        schema=[
            Field(name="avg_amount_30d", dtype=Float32),
            Field(name="chargeback_rate", dtype=Float32),
            Field(name="txn_count_7d", dtype=Int64),
        ],
        source=FileSource(
            path=str(root / "customer_stats.parquet"),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        ),
    )
    store.apply([customer, view])
    store.materialize((now - STALE_AGE * 2).to_pydatetime(), now.to_pydatetime(), [VIEW])
    return store


def make_stale(store: FeatureStore) -> None:
    """Put back the online values as the job left them three days ago."""
    stale = customer_features()
    stale["event_timestamp"] = pd.Timestamp.now(tz="UTC").floor("s") - STALE_AGE
    stale["created"] = stale["event_timestamp"]
    # SQLite's online store keeps one row per entity and feature, the last written.
    store.write_to_online_store(VIEW, stale)


def build_app(store: FeatureStore, fault: str) -> FastAPI:
    app = FastAPI(title=FEATURES)
    state = {"fault": ""}
    refs = [f"{VIEW}:{name}" for name in CUSTOMER_FEATURES]

    def set_fault(name: str = "") -> dict[str, str]:
        if name == "stale_features" and state["fault"] != name:
            make_stale(store)
        state["fault"] = name
        return state

    app.post("/admin/fault")(set_fault)

    @app.post("/features")
    def features(body: dict[str, list[int]]) -> dict[str, list[float | None]]:
        if state["fault"] == "feature_exception":
            raise RuntimeError("customer_stats lookup failed: online store schema out of sync")
        rows = [{"customer_id": int(i)} for i in body.get("customer_ids", [])]
        values = store.get_online_features(refs, rows).to_dict()
        return {name: values[name] for name in CUSTOMER_FEATURES}

    set_fault(fault)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--work-dir", type=Path, required=True, help="where the repo is built")
    parser.add_argument("--fault", default="", help="stale_features or feature_exception")
    args = parser.parse_args()
    otel_dl.instrument(FEATURES)
    store = build_repo(args.work_dir / "feature_repo")
    uvicorn.run(build_app(store, args.fault), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
