"""``make reliability``: run every reliability test at full scale, write docs/reliability.md.

    .venv/bin/python -m tests.reliability            # all sections, about N minutes
    .venv/bin/python -m tests.reliability sdk-processes collector-kill   # print only these

Each section's tests run in their own pytest process with ``OTEL_DL_RELIABILITY=full``;
their figures come from ``tests.reliability.findings.record`` and their outcomes from
pytest's JUnit XML. A test that fails is reported under "Did not hold" with its message,
so the page always says what happened, not what was hoped for.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reliability.md"
SECTION_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class Section:
    id: str
    heading: str
    targets: tuple[str, ...]
    about: str


SECTIONS = (
    Section(
        "sdk-adversarial",
        "SDK: adversarial inputs",
        ("tests/reliability/test_sdk_inputs.py",),
        "Property-based tests feed every instrumented entry point and every signal function "
        "inputs chosen to break them; the instrumented call must return exactly what the "
        "uninstrumented call returns, or raise exactly the same exception.",
    ),
    Section(
        "sdk-exporter",
        "SDK: exporter failure",
        ("tests/reliability/test_sdk_exporter.py",),
        "The backend is down, slow or answering errors while the application runs; the "
        "application's added latency and memory must stay bounded, with no exception.",
    ),
    Section(
        "sdk-processes",
        "SDK: processes",
        ("tests/reliability/test_sdk_processes.py",),
        "Spans made in DataLoader workers and pre-fork server workers reach the backend.",
    ),
    Section(
        "collector-fuzz",
        "Collector: malformed input",
        ("tests/collector/test_fuzz.py",),
        "Both receivers of one running collector are fed malformed payloads.",
    ),
    Section(
        "collector-kill",
        "Collector: kill -9 mid-stream, then restart",
        ("tests/reliability/test_collector_crash.py",),
        "Every span acknowledged before a SIGKILL must be exported after the restart.",
    ),
    Section(
        "collector-outage",
        "Collector: backend outage",
        ("tests/reliability/test_collector_outage.py",),
        "The backend goes away for a minute under steady traffic and comes back.",
    ),
    Section(
        "collector-overload",
        "Collector: overload at 3x measured capacity",
        ("tests/reliability/test_collector_overload.py",),
        "Senders offer three times what the collector was measured to sustain.",
    ),
    Section(
        "collector-security",
        "Collector: security",
        ("tests/collector/test_security.py",),
        "Authentication, TLS, logs, file modes and the report's content.",
    ),
)


def _run(section: Section, findings: Path, junit: Path) -> tuple[float, int]:
    env = {
        **os.environ,
        "OTEL_DL_RELIABILITY": "full",
        "OTEL_DL_RELIABILITY_OUT": str(findings),
    }
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "--timeout",
        str(SECTION_TIMEOUT_SECONDS),
        *section.targets,
    ]
    start = time.monotonic()
    try:
        code = subprocess.run(
            argv, cwd=ROOT, env=env, timeout=SECTION_TIMEOUT_SECONDS + 120
        ).returncode
    except subprocess.TimeoutExpired:
        code = -1
    return time.monotonic() - start, code


def _outcomes(junit: Path) -> list[tuple[str, str, str]]:
    """(test name, passed|failed|skipped|error, message) from a JUnit XML file."""
    if not junit.exists():
        return []
    out = []
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("name", "?")
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed"}.get(tag, tag)
                message = (
                    (node.get("message") or "").strip().splitlines()[0][:300]
                    if node.get("message")
                    else ""
                )
                break
        out.append((name, status, message))
    return out


def _table(rows: list[list[str]]) -> list[str]:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _render(results: list[tuple[Section, float, list[dict], list[tuple[str, str, str]]]]) -> str:
    total = sum(r[1] for r in results)
    lines = [
        "# Reliability and security: what was tried, what held, what did not",
        "",
        "This page is written by `make reliability` (`python -m tests.reliability`), which",
        "runs the tests below at full scale on loopback, each bounded in time, and stops by",
        "itself. `make test` runs the same tests at a smaller scale. Do not edit it by hand.",
        "",
        f"Last run: {date.today().isoformat()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, {total / 60:.1f} minutes in all.",
        "",
    ]
    for section, seconds, findings, outcomes in results:
        lines += [
            f"## {section.heading}",
            "",
            f"`{' '.join(section.targets)}` ({seconds:.0f} s). {section.about}",
            "",
        ]
        failed = [o for o in outcomes if o[1] in ("failed", "error")]
        passed = sum(o[1] == "passed" for o in outcomes)
        skipped = [o for o in outcomes if o[1] == "skipped"]
        for finding in findings:
            if finding["tried"]:
                lines += ["**Tried.**", ""] + [f"- {t}" for t in finding["tried"]] + [""]
            if finding["table"]:
                lines += [*_table(finding["table"]), ""]
            if finding["held"]:
                lines += ["**Held.**", ""] + [f"- {t}" for t in finding["held"]] + [""]
            if finding["did_not_hold"]:
                lines += (
                    ["**Did not hold.**", ""] + [f"- {t}" for t in finding["did_not_hold"]] + [""]
                )
            lines += [n + "\n" for n in finding["notes"]]
        summary = f"Tests: {passed} passed, {len(failed)} failed, {len(skipped)} skipped."
        if not outcomes:
            summary = "Tests: none ran (pytest could not collect or start them)."
        lines += [summary, ""]
        for name, status, message in failed + skipped:
            lines.append(f"- **{status}**: `{name}`: {message or 'see the pytest output'}")
        if failed or skipped:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    chosen = [s for s in SECTIONS if not argv or s.id in argv]
    unknown = set(argv) - {s.id for s in SECTIONS}
    if unknown:
        print(f"unknown section(s) {sorted(unknown)}; choose from {[s.id for s in SECTIONS]}")
        return 2
    results = []
    worst = 0
    with tempfile.TemporaryDirectory(prefix="otel-dl-reliability-") as tmp:
        for section in chosen:
            findings_path = Path(tmp) / f"{section.id}.jsonl"
            junit = Path(tmp) / f"{section.id}.xml"
            print(f"== {section.heading}", flush=True)
            seconds, code = _run(section, findings_path, junit)
            worst = worst or code
            findings = (
                [json.loads(line) for line in findings_path.read_text().splitlines()]
                if findings_path.exists()
                else []
            )
            results.append((section, seconds, findings, _outcomes(junit)))
    page = _render(results)
    if len(chosen) == len(SECTIONS):
        PAGE.write_text(page, encoding="utf-8")
        print(f"wrote {PAGE}")
    else:  # a partial run does not replace the page
        print(page)
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
