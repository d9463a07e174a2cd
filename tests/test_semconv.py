"""docs/semantic-conventions.md and otel_dl.semconv must agree, name by name."""

from __future__ import annotations

import re
from pathlib import Path

from otel_dl import semconv

DOC = Path(__file__).parents[1] / "docs" / "semantic-conventions.md"
_ROW = re.compile(r"^\|\s*`([a-z_][\w.]*)`\s*\|\s*([^|]+?)\s*\|\s*([^|]*?)\s*\|", re.M)


def _doc_rows(section: str) -> dict[str, tuple[str, str]]:
    text = DOC.read_text()
    start = text.index("\n", text.index(f"## {section}"))
    # The section's own table ends at the next heading of any level.
    following = re.search(r"^#", text[start:], flags=re.M)
    body = text[start : start + following.start() if following else None]
    return {
        name: (kind.strip("` "), unit.strip("` ").replace("—", ""))
        for name, kind, unit in _ROW.findall(body)
    }


def test_every_attribute_is_documented_with_its_type_and_unit() -> None:
    documented = _doc_rows("Attributes")
    in_code = {a.name: (a.type, a.unit) for a in semconv.ATTRIBUTES.values()}
    assert documented == in_code


def test_every_metric_is_documented_with_its_instrument_and_unit() -> None:
    documented = _doc_rows("Metrics")
    in_code = {m.name: (m.instrument, m.unit) for m in semconv.METRICS.values()}
    assert documented == in_code


def test_contract_names_from_the_design_are_present() -> None:
    fixed = {
        "dl.stage",
        "dl.component",
        "dl.data.source",
        "dl.data.version",
        "dl.data.fingerprint",
        "dl.data.schema.fingerprint",
        "dl.batch.index",
        "dl.batch.size",
        "dl.model.name",
        "dl.model.version",
        "dl.model.fingerprint",
        "dl.model.framework",
        "dl.feature.views",
        "dl.feature.freshness",
        "dl.drift.score",
        "dl.drift.method",
        "dl.drift.feature",
        "dl.drift.status",
        "dl.quality.nan_fraction",
        "dl.quality.out_of_range_fraction",
        "dl.quality.schema_mismatch",
        "dl.confidence.mean",
        "dl.confidence.min",
        "dl.confidence.margin.mean",
        "dl.confidence.entropy.mean",
        "dl.confidence.low_fraction",
        "dl.prediction.count",
        "dl.fault.root_cause",
        "dl.fault.kind",
        "dl.fault.origin",
        "dl.fault.mode",
        "dl.fault.score",
        "dl.fault.symptom",
        "dl.fault.root_cause.service",
        "dl.fault.root_cause.span_id",
        "dl.fault.candidates",
    }
    assert fixed <= set(semconv.ATTRIBUTES)


def test_metric_names_follow_opentelemetry_rules() -> None:
    units_in_names = ("seconds", "_ms", "bytes", "percent", "_total")
    for metric in semconv.METRICS.values():
        assert not any(u in metric.name for u in units_in_names), metric.name
        assert metric.unit, f"{metric.name} needs a UCUM unit"
