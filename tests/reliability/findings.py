"""What a reliability test tried, what held and what did not, for docs/reliability.md.

Every reliability test runs at two scales. ``make test`` runs the fast one (a few
seconds each); ``make reliability`` (``python -m tests.reliability``) sets
``OTEL_DL_RELIABILITY=full`` and runs the counts and durations the report quotes::

    n = scale(fast=500, full=10_000)
    ...
    record(
        "sdk-adversarial",
        tried=[f"{n:,} inputs to ..."],
        held=["0 exceptions escaped ..."],
        did_not_hold=[],
        table=[["entry point", "inputs"], ["DataLoader", "1,200"]],
    )

``record`` appends one JSON line to the file named by ``OTEL_DL_RELIABILITY_OUT`` (the
runner sets it) and prints the finding, so ``pytest -s`` shows the figures too. A test
asserts what must hold *after* recording, so a failure still leaves its figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

FULL = os.environ.get("OTEL_DL_RELIABILITY") == "full"


def scale(fast: int | float, full: int | float) -> int | float:
    """``full`` under ``make reliability``, ``fast`` otherwise."""
    return full if FULL else fast


def record(
    section: str,
    *,
    tried: Sequence[str],
    held: Sequence[str],
    did_not_hold: Sequence[str] = (),
    table: Sequence[Sequence[str]] | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Record one test's figures under ``section`` (an id from ``SECTIONS`` in runner)."""
    finding = {
        "section": section,
        "tried": list(tried),
        "held": list(held),
        "did_not_hold": list(did_not_hold),
        "table": [list(map(str, row)) for row in table] if table else None,
        "notes": list(notes),
        "scale": "full" if FULL else "fast",
    }
    path = os.environ.get("OTEL_DL_RELIABILITY_OUT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(finding) + "\n")
    print(f"\n[{section}] " + json.dumps(finding, indent=1))
