"""inference-service: a torch fraud model over HTTP, fed by the feature service and the API.

``POST /score`` with ``{"customer_ids": [...], "transactions": [[amount, distance_km,
hour, items], ...]}`` looks up the customers' features in the feature service, their
merchant risk in the external API (falling back to 0.5 when it fails, as a real service
would rather than fail the request), preprocesses, runs the model and answers
``{"fraud_probability": [...]}``.

The model lives in ``<work-dir>/model.pt`` (a state dict). At first start the service
trains it, and a second model (``model-next.pt``, trained on other labels) that a bad
deploy will put in its place. The file is reloaded when its modification time changes.

Faults (``--fault`` at start, or ``POST /admin/fault?name=...`` at run time):

- ``preprocess_nan``: preprocessing starts emitting NaNs;
- ``model_swap``: ``model-next.pt`` is copied over ``model.pt``, and is picked up by the
  next request.

Run it by hand with ``python examples/pipeline/inference_service.py --work-dir /tmp/inf
--features-url http://127.0.0.1:8002 --external-url http://127.0.0.1:8003``.
"""

from __future__ import annotations

import argparse
import shutil
import threading
from pathlib import Path

import numpy as np
import requests
import torch
import uvicorn
from common import CUSTOMER_FEATURES, INFERENCE, MODEL_INPUTS, preprocess, training_set
from fastapi import FastAPI, HTTPException

import otel_dl

MODEL_NAME = "fraud-mlp"
MODEL_VERSION = "2026-11-01"
TIMEOUT = 5.0


def new_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(MODEL_INPUTS, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )


def train(path: Path, seed: int, flip_labels: bool) -> None:
    """Train the small model on the synthetic training set and save its state dict."""
    torch.manual_seed(seed)
    x, y = training_set()
    if flip_labels:
        y = 1 - y
    model = new_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        optimiser.step()
    torch.save(model.state_dict(), path)


class ModelFile:
    """The served model, reloaded from its file when the file changes."""

    def __init__(self, path: Path, reference: otel_dl.Reference) -> None:
        self.path = path
        self.reference = reference
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._model = new_model()

    def get(self) -> torch.nn.Module:
        with self._lock:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._model.load_state_dict(torch.load(self.path, weights_only=True))
                self._model.eval()
                otel_dl.watch(
                    self._model, name=MODEL_NAME, version=MODEL_VERSION, reference=self.reference
                )
                self._mtime = mtime
            return self._model


def build_app(work_dir: Path, features_url: str, external_url: str, fault: str) -> FastAPI:
    model_path, next_path = work_dir / "model.pt", work_dir / "model-next.pt"
    if not model_path.exists():
        train(model_path, seed=0, flip_labels=False)
        train(next_path, seed=1, flip_labels=True)
    reference = otel_dl.Reference.fit(training_set()[0])
    model = ModelFile(model_path, reference)
    model.get()
    http = requests.Session()
    app = FastAPI(title=INFERENCE)
    state = {"fault": ""}

    def set_fault(name: str = "") -> dict[str, str]:
        if name == "model_swap" and state["fault"] != name:
            shutil.copyfile(next_path, model_path)
        state["fault"] = name
        return state

    app.post("/admin/fault")(set_fault)

    @otel_dl.stage("preprocess")
    def prepare(tx: np.ndarray, customer: np.ndarray, risk: np.ndarray) -> np.ndarray:
        return preprocess(tx, customer, risk, broken=state["fault"] == "preprocess_nan")

    def merchant_risk(ids: list[int]) -> np.ndarray:
        try:
            reply = http.post(f"{external_url}/enrich", json={"customer_ids": ids}, timeout=TIMEOUT)
            reply.raise_for_status()
            return np.asarray(reply.json()["merchant_risk"], dtype=np.float64)
        except requests.RequestException:
            return np.full(len(ids), 0.5)

    @app.post("/score")
    def score(body: dict[str, list]) -> dict[str, list[float | None]]:
        ids = [int(i) for i in body["customer_ids"]]
        tx = np.asarray(body["transactions"], dtype=np.float64)
        reply = http.post(f"{features_url}/features", json={"customer_ids": ids}, timeout=TIMEOUT)
        if not reply.ok:
            raise HTTPException(502, f"feature service answered {reply.status_code}")
        found = reply.json()
        customer = np.column_stack(
            [np.asarray(found[name], dtype=np.float64) for name in CUSTOMER_FEATURES]
        )
        x = prepare(tx, customer, merchant_risk(ids))
        with torch.no_grad():
            probability = torch.softmax(model.get()(torch.from_numpy(x)), dim=1)[:, 1].numpy()
        return {"fraud_probability": [None if np.isnan(p) else float(p) for p in probability]}

    set_fault(fault)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--work-dir", type=Path, required=True, help="where model files live")
    parser.add_argument("--features-url", required=True)
    parser.add_argument("--external-url", required=True)
    parser.add_argument("--fault", default="", help="preprocess_nan or model_swap")
    args = parser.parse_args()
    otel_dl.instrument(INFERENCE)
    torch.set_num_threads(1)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(args.work_dir, args.features_url, args.external_url, args.fault)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
