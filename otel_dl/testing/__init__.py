"""Fault drills: prove that a pipeline's monitoring catches every failure mode of the
catalog, in CI, before an incident does.

A drill injects each mode of the failure-mode catalog (``collector/catalog.yaml``, or
yours) into your own pipeline, then checks that otel-dl flags it on the spans and, with
the collector, that the collector names the right service and kind::

    from otel_dl.testing import Faults, run_drills

    def pipeline(faults: Faults) -> None:
        loader = faults.batches(DataLoader(dataset, batch_size=64))   # drift, NaNs, schema
        model = faults.model(model)                                   # swap, slow, failing
        http = faults.http(session)                                   # slow or failing API
        for x, _ in loader:
            model(x, risk=http.post(url, json=...).json())

    report = run_drills(pipeline, collector=True)
    print(report.table())          # the catalog's coverage: drilled, detected, attributed
    report.assert_detected()

With pytest, the ``fault_drills`` fixture (load ``-p otel_dl.testing.plugin``) runs
drills and prints every coverage table at the end of the session.
From a shell, ``python -m otel_dl.testing path/to/pipeline.py:pipeline --collector``.
Needs an SDK tracer provider (``otel_dl.instrument()``) and the ``collector`` extra.
"""

from otel_dl.testing.drills import (
    DrillError,
    DrillReport,
    DrillResult,
    fault_for,
    run_drills,
)
from otel_dl.testing.faults import Fault, Faults, InjectedFault

__all__ = [
    "DrillError",
    "DrillReport",
    "DrillResult",
    "Fault",
    "Faults",
    "InjectedFault",
    "fault_for",
    "run_drills",
]
