"""Fault drills on the demo pipeline: every catalog mode, injected into its real parts.

The demo's parts run in one process, each passed through the drill's ``faults``: the
batch scorer's DataLoader over the transactions partition (watched with the training
partition as reference), the feature service's Feast repository on SQLite, the
inference service's torch model, and a ``requests`` session to the external API, which
runs as its own process on a loopback port, untraced, as a third party would be::

    python -m otel_dl.testing examples/pipeline/drills.py:DemoPipeline --collector

prints the catalog's coverage table (docs/testing.md shows it). The test suite runs the
same drills (tests/test_drills.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import requests
import torch
from batch_scorer import BATCH_ROWS, write_partitions
from common import CUSTOMER_FEATURES, TRANSACTION_COLUMNS, free_port, preprocess, wait_for_port
from feature_service import VIEW, build_repo
from inference_service import MODEL_NAME, MODEL_VERSION, new_model, train
from torch.utils.data import DataLoader, TensorDataset

import otel_dl
from otel_dl.testing import Faults

HERE = Path(__file__).resolve().parent
SERVICE = "payments-pipeline"


class DemoPipeline:
    """One pass = ``batches`` batches scored end to end, one trace each."""

    def __init__(self, batches: int = 2, work_dir: Path | None = None) -> None:
        self.batches = batches
        self.work_dir = work_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._api: subprocess.Popen[bytes] | None = None
        self._handle: otel_dl.Instrumentation | None = None

    def __enter__(self) -> DemoPipeline:
        if self.work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="otel-dl-demo-drills-")
            self.work_dir = Path(self._tmp.name)
        work = self.work_dir
        # As the batch scorer: a short drift window, so a drifted batch shows at once. A
        # binary model's top-1 probability is never under 0.5: low confidence is under 0.6.
        self._handle = otel_dl.instrument(
            SERVICE,
            drift_window_rows=2 * BATCH_ROWS,
            drift_min_rows=BATCH_ROWS,
            confidence_threshold=0.6,
            traces_exporter="none",
            metrics_exporter="none",
        )
        torch.set_num_threads(1)
        paths = write_partitions(work / "scorer", rows=self.batches * BATCH_ROWS)
        columns = list(TRANSACTION_COLUMNS)
        training = pd.read_parquet(paths["training"])[columns].to_numpy("float32")
        self.reference = otel_dl.Reference.fit(training)
        today = pd.read_parquet(paths["today"])
        self.source = str(paths["today"])
        self.dataset = TensorDataset(
            torch.from_numpy(today[columns].to_numpy("float32")),
            torch.from_numpy(today["customer_id"].to_numpy()),
        )
        self.store = build_repo(work / "feature_repo")
        model_path = work / "model.pt"
        if not model_path.exists():
            train(model_path, seed=0, flip_labels=False)
        self.model = new_model()
        self.model.load_state_dict(torch.load(model_path, weights_only=True))
        self.model.eval()
        otel_dl.watch(self.model, name=MODEL_NAME, version=MODEL_VERSION)
        self._start_api()
        self.http = requests.Session()
        return self

    def _start_api(self) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
        self._api = subprocess.Popen(
            [sys.executable, str(HERE / "external_api.py"), "--port", str(port)],
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        api = self._api
        wait_for_port(port, timeout=60.0, alive=lambda: api.poll() is None)
        self.api_url = f"http://127.0.0.1:{port}"

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._api is not None:
            self._api.terminate()
            try:
                self._api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._api.kill()
                self._api.wait()
        self.http.close()
        if self._handle is not None:
            self._handle.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()

    def merchant_risk(self, http: requests.Session, ids: list[int]) -> np.ndarray:
        """The external API's risk, or 0.5 when it fails (as the inference service does)."""
        try:
            reply = http.post(f"{self.api_url}/enrich", json={"customer_ids": ids}, timeout=5)
            reply.raise_for_status()
            return np.asarray(reply.json()["merchant_risk"], dtype=np.float64)
        except requests.RequestException:
            return np.full(len(ids), 0.5)

    def __call__(self, faults: Faults) -> Any:
        loader = otel_dl.watch(
            DataLoader(self.dataset, batch_size=BATCH_ROWS),
            source=self.source,
            version="2026-11-23",
            reference=self.reference,
        )
        loader = faults.batches(loader)
        store = faults.feature_store(self.store)
        model = faults.model(self.model)
        http = faults.http(self.http)
        refs = [f"{VIEW}:{name}" for name in CUSTOMER_FEATURES]
        batches = iter(loader)
        for _ in range(self.batches):
            with otel_dl.stage("score_batch", stage="inference", signals=False):
                x, ids = next(batches)
                customers = [int(i) for i in ids]
                found = store.get_online_features(
                    refs, [{"customer_id": i} for i in customers]
                ).to_dict()
                customer = np.column_stack(
                    [np.asarray(found[name], dtype=np.float64) for name in CUSTOMER_FEATURES]
                )
                tx = x.numpy().astype(np.float64)[:, : len(TRANSACTION_COLUMNS)]
                inputs = preprocess(tx, customer, self.merchant_risk(http, customers))
                with torch.no_grad():
                    model(torch.from_numpy(inputs))
