"""batch-scorer: reads a parquet partition with a torch DataLoader, scores it batch by batch.

Each batch is one trace: a ``score_batch`` span holds the ``dataloader.batch`` span of
the fetch and the HTTP call to the inference service (and, through it, the feature
service and the external API). The DataLoader is watched with a reference profile of
the training partition, so drift is measured against what the model was trained on::

    python examples/pipeline/batch_scorer.py --work-dir /tmp/scorer \\
        --inference-url http://127.0.0.1:8001 --batches 40

``--fault upstream_drift`` reads a partition in which the upstream reports distances in
metres instead of kilometres. It prints one line: batches scored, failed, and seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import requests
import torch
from common import SCORER, TRANSACTION_COLUMNS, transactions
from torch.utils.data import DataLoader, TensorDataset

import otel_dl

BATCH_ROWS = 256


def write_partitions(work_dir: Path, rows: int) -> dict[str, Path]:
    """The upstream's parquet partitions: training, today's, and today's drifted."""
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "training": work_dir / "transactions-training.parquet",
        "today": work_dir / "transactions-today.parquet",
        "drifted": work_dir / "transactions-today-drifted.parquet",
    }
    transactions(4096, seed=1).to_parquet(paths["training"])
    transactions(rows, seed=3).to_parquet(paths["today"])
    transactions(rows, seed=3, drifted=True).to_parquet(paths["drifted"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--inference-url", required=True)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="which slice of the partition")
    parser.add_argument("--fault", default="", help="upstream_drift")
    args = parser.parse_args()
    # A short drift window, reported from the first batch on, so a drifted partition
    # shows at once (the reference is fitted on the whole training partition).
    handle = otel_dl.instrument(SCORER, drift_window_rows=2 * BATCH_ROWS, drift_min_rows=BATCH_ROWS)
    torch.set_num_threads(1)
    paths = write_partitions(args.work_dir, rows=(args.seed + 1) * args.batches * BATCH_ROWS)
    source = paths["drifted" if args.fault == "upstream_drift" else "today"]

    columns = list(TRANSACTION_COLUMNS)
    # Fitted on the same form the DataLoader yields (a float32 matrix, columns by
    # position), so the reference's schema is the batches' schema.
    training = pd.read_parquet(paths["training"])[columns].to_numpy("float32")
    reference = otel_dl.Reference.fit(training)
    frame = pd.read_parquet(source).iloc[args.seed * args.batches * BATCH_ROWS :]
    dataset = TensorDataset(
        torch.from_numpy(frame[columns].to_numpy("float32")),
        torch.from_numpy(frame["customer_id"].to_numpy()),
    )
    loader = otel_dl.watch(
        DataLoader(dataset, batch_size=BATCH_ROWS),
        source=str(source),
        version="2026-11-23",
        reference=reference,
    )

    http = requests.Session()
    started, failed, scored = time.monotonic(), 0, 0
    batches = iter(loader)
    for _ in range(args.batches):
        # One trace per batch: the fetch and the call share this span as their parent.
        with otel_dl.stage("score_batch", stage="inference", signals=False):
            try:
                x, ids = next(batches)
            except StopIteration:
                break
            reply = http.post(
                f"{args.inference_url}/score",
                json={"customer_ids": ids.tolist(), "transactions": x.tolist()},
                timeout=30,
            )
        scored += 1
        failed += not reply.ok
    handle.shutdown()
    print(f"{SCORER}: {scored} batches scored, {failed} failed, {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
