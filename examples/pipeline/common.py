"""What the demo pipeline's services share: the fault list, the synthetic data, the model.

The services (``batch_scorer.py``, ``feature_service.py``, ``inference_service.py``,
``external_api.py``) and the runner (``run.py``) import this module from their own
folder. Data is generated from fixed seeds, so every process sees the same customers,
the same training set and the same model inputs without passing files around.

``FAULTS`` is the one list of injectable faults: for each, the service it is injected
into and the root cause the otel-dl collector should name (service and
``dl.fault.kind``).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

SCORER = "batch-scorer"
FEATURES = "feature-service"
INFERENCE = "inference-service"
EXTERNAL = "external-api"
SERVICES = (SCORER, INFERENCE, FEATURES, EXTERNAL)


@dataclass(frozen=True)
class Fault:
    """One injectable fault and the attribution the collector should make for it."""

    name: str
    service: str
    kind: str
    description: str


FAULTS = {
    f.name: f
    for f in (
        Fault(
            "upstream_drift",
            SCORER,
            "data_drift",
            "the upstream partition reports distance in metres, not km",
        ),
        Fault(
            "preprocess_nan",
            INFERENCE,
            "data_quality",
            "a preprocessing release takes the log of a centred amount: NaNs",
        ),
        Fault(
            "stale_features",
            FEATURES,
            "stale_features",
            "the materialisation job stopped three days ago",
        ),
        Fault(
            "model_swap",
            INFERENCE,
            "model_change",
            "the model file is replaced by another model under the same name",
        ),
        Fault(
            "external_slowdown",
            EXTERNAL,
            "latency",
            "the enrichment API answers 400 ms slower",
        ),
        Fault(
            "external_outage",
            EXTERNAL,
            "error",
            "the enrichment API answers 503 to every call",
        ),
        Fault(
            "feature_exception",
            FEATURES,
            "error",
            "the feature service raises on every lookup",
        ),
    )
}

CUSTOMERS = 500
#: Columns of a transaction the batch scorer sends, in this order.
TRANSACTION_COLUMNS = ("amount", "distance_km", "hour", "items")
#: Feature-store features of a customer, in Feast's name order.
CUSTOMER_FEATURES = ("avg_amount_30d", "chargeback_rate", "txn_count_7d")
MODEL_INPUTS = len(TRANSACTION_COLUMNS) + len(CUSTOMER_FEATURES) + 1  # + merchant risk


def transactions(rows: int, seed: int, drifted: bool = False) -> pd.DataFrame:
    """A partition of card transactions, as the upstream source writes it."""
    rng = np.random.default_rng(seed)
    distance = rng.exponential(5.0, rows)
    if drifted:
        distance = distance * 1000.0  # the upstream switched the unit to metres
    return pd.DataFrame(
        {
            "customer_id": rng.integers(0, CUSTOMERS, rows).astype(np.int64),
            "amount": rng.lognormal(3.5, 0.8, rows),
            "distance_km": distance,
            "hour": rng.integers(0, 24, rows).astype(np.float64),
            "items": (rng.poisson(2.0, rows) + 1).astype(np.float64),
        }
    )


def customer_features() -> pd.DataFrame:
    """The feature values of every customer (without timestamps)."""
    rng = np.random.default_rng(11)
    return pd.DataFrame(
        {
            "customer_id": np.arange(CUSTOMERS, dtype=np.int64),
            "avg_amount_30d": rng.lognormal(3.5, 0.5, CUSTOMERS).astype(np.float32),
            "chargeback_rate": rng.beta(1.0, 40.0, CUSTOMERS).astype(np.float32),
            "txn_count_7d": rng.poisson(10.0, CUSTOMERS).astype(np.int64),
        }
    )


def merchant_risk(customer_ids: np.ndarray) -> np.ndarray:
    """The external API's risk score of each customer's merchant: fixed per customer."""
    return ((customer_ids * 2654435761) % 1000) / 1000.0


def preprocess(
    tx: np.ndarray, customer: np.ndarray, risk: np.ndarray, broken: bool = False
) -> np.ndarray:
    """Model inputs from transaction columns, customer features and merchant risk."""
    amount = tx[:, 0]
    scaled_amount = np.log1p(amount)
    if broken:
        # The faulty release logs the amount centred on the customer's average: every
        # transaction below the average becomes NaN.
        with np.errstate(invalid="ignore"):
            scaled_amount = np.log(amount - customer[:, 0])
    return np.column_stack(
        [
            scaled_amount,
            np.log1p(tx[:, 1]),
            tx[:, 2] / 23.0,
            tx[:, 3] / 3.0,
            np.log1p(customer[:, 0]),
            customer[:, 1] * 20.0,
            customer[:, 2] / 10.0,
            risk,
        ]
    ).astype(np.float32)


def training_set(rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed inputs and fraud labels the model is trained on."""
    tx = transactions(rows, seed=1)
    ids = tx["customer_id"].to_numpy()
    customers = customer_features().set_index("customer_id").loc[ids]
    x = preprocess(
        tx[list(TRANSACTION_COLUMNS)].to_numpy(),
        customers[list(CUSTOMER_FEATURES)].to_numpy(dtype=np.float64),
        merchant_risk(ids),
    )
    logit = 2.0 * x[:, 5] + 1.5 * x[:, 7] + 0.8 * x[:, 1] - 3.0
    y = (logit + np.random.default_rng(2).normal(0, 0.5, rows) > 0).astype(np.int64)
    return x, y


def free_port() -> int:
    """A free loopback TCP port (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 90.0, alive: object = None) -> None:
    """Wait until something listens on 127.0.0.1:``port``; ``alive()`` false aborts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise RuntimeError(f"the process meant to listen on port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
