"""The pytest plugin of otel-dl's fault drills: the ``fault_drills`` fixture.

Load it with ``-p otel_dl.testing.plugin`` (or ``pytest_plugins`` in a top-level
conftest.py); it imports the drills only when a test asks for the fixture::

    def test_monitoring_catches_the_catalog(fault_drills):
        report = fault_drills(pipeline, collector=True)
        report.assert_detected(attribution=True)

Every report made through the fixture is printed, as the catalog's coverage table, in
the terminal summary at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

_REPORTS = pytest.StashKey[list[tuple[str, Any]]]()


@pytest.fixture
def fault_drills(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``fault_drills(pipeline, **options)``: :func:`otel_dl.testing.run_drills`, with the
    report kept for the session's summary."""
    from otel_dl.testing.drills import run_drills

    reports = request.config.stash.setdefault(_REPORTS, [])

    def run(pipeline: Callable[..., Any], **options: Any) -> Any:
        report = run_drills(pipeline, **options)
        reports.append((request.node.nodeid, report))
        return report

    return run


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for nodeid, report in config.stash.get(_REPORTS, []):
        terminalreporter.section(f"otel-dl fault drills: {nodeid}")
        terminalreporter.write_line(report.table())
