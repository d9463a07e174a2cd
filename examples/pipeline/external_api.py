"""external-api: a stand-in third-party enrichment API whose latency and errors are injectable.

``POST /enrich`` with ``{"customer_ids": [...]}`` answers ``{"merchant_risk": [...]}``
after ``--latency`` seconds. ``--fault external_slowdown`` adds 400 ms to each call and
``--fault external_outage`` answers 503 to every call; ``POST /admin/fault?name=...``
switches the fault at run time (``name=`` with no value clears it)::

    python examples/pipeline/external_api.py --port 8003
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import uvicorn
from common import EXTERNAL, merchant_risk
from fastapi import FastAPI, HTTPException

import otel_dl

SLOWDOWN_SECONDS = 0.4


def build_app(latency: float, fault: str) -> FastAPI:
    app = FastAPI(title=EXTERNAL)
    state = {"fault": fault}

    @app.post("/admin/fault")
    def set_fault(name: str = "") -> dict[str, str]:
        state["fault"] = name
        return state

    @app.post("/enrich")
    def enrich(body: dict[str, list[int]]) -> dict[str, list[float]]:
        delay = latency + (SLOWDOWN_SECONDS if state["fault"] == "external_slowdown" else 0.0)
        time.sleep(delay)
        if state["fault"] == "external_outage":
            raise HTTPException(503, "enrichment backend unavailable")
        ids = np.asarray(body.get("customer_ids", []), dtype=np.int64)
        return {"merchant_risk": merchant_risk(ids).tolist()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--latency", type=float, default=0.005, help="seconds per call")
    parser.add_argument("--fault", default="", help="external_slowdown or external_outage")
    args = parser.parse_args()
    otel_dl.instrument(EXTERNAL)
    app = build_app(args.latency, args.fault)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
