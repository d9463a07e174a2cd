"""Alerting rules and Alertmanager routes generated from the catalog.

The committed files under examples/deploy are what the generator makes now. They are
checked by Prometheus' and Alertmanager's own tools, built once from their Go modules
and cached by tests/e2e/binaries.py (``promtool check rules`` and ``promtool test
rules`` with fault series, ``amtool check-config`` and ``amtool config routes test``),
and, without a Go toolchain, by the Python checks below: the rule-file structure, every
expression through ``promql_parser``, every selector against the metrics and labels
``CollectorMetrics`` exports, and the Alertmanager route tree's receivers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from otel_dl.collector import alerts
from otel_dl.collector.catalog import Catalog, load_catalog
from otel_dl.collector.metrics import CollectorMetrics
from tests.e2e.binaries import (
    BUILD_TIMEOUT_SECONDS,
    NoGoToolchain,
    amtool_binary,
    promtool_binary,
)
from tests.support import promql_parts

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "examples" / "deploy" / "prometheus" / "otel-dl-alerts.yaml"
ALERTMANAGER = ROOT / "examples" / "deploy" / "alertmanager" / "alertmanager.yaml"
PROMETHEUS = ROOT / "examples" / "deploy" / "prometheus" / "prometheus.yaml"
RULES_MOUNT = "/etc/prometheus/rules"
#: The options the committed files were generated with (docs/alerts.md shows the command).
EXAMPLE_BASE_URL = "https://runbooks.example.com/otel-dl/"
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


def _tool(build: Any) -> Path:
    try:
        return Path(build())
    except NoGoToolchain as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def promtool() -> Path:
    return _tool(promtool_binary)


@pytest.fixture(scope="module")
def amtool() -> Path:
    return _tool(amtool_binary)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(runbook_base_url=EXAMPLE_BASE_URL)


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


# --- the committed files are the generator's output --------------------------------------


def test_committed_files_are_what_the_catalog_generates(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("OTEL_DL_COLLECTOR_"):
            monkeypatch.delenv(key)
    rules, routes = tmp_path / "rules.yaml", tmp_path / "am.yaml"
    args = ["--runbook-base-url", EXAMPLE_BASE_URL, "--rules", rules, "--alertmanager", routes]
    assert alerts.main([str(a) for a in args]) == 0
    assert rules.read_text() == RULES.read_text(), (
        f"{RULES} is out of date; regenerate it (docs/alerts.md)"
    )
    assert routes.read_text() == ALERTMANAGER.read_text(), (
        f"{ALERTMANAGER} is out of date; regenerate it (docs/alerts.md)"
    )


def test_one_rule_per_mode_with_owner_severity_and_runbook(catalog):
    rules = _rules()
    assert len(rules) == len(catalog.modes)
    for mode, rule in zip(catalog.modes, rules, strict=True):
        assert set(rule) <= RULE_KEYS and rule["alert"] == alerts.alert_name(mode)
        assert rule["labels"] == {
            "severity": mode.severity,
            "owner": mode.owner,
            "kind": mode.kind,
            "mode": mode.id,
            "origin": mode.origin,
        }
        assert rule["annotations"]["runbook_url"] == EXAMPLE_BASE_URL + f"{mode.id}.md"
        assert rule["annotations"]["mitigation"] == mode.mitigation
    assert len({r["alert"] for r in rules}) == len(rules)


def _exported_labels() -> dict[str, set[str]]:
    """Counter series the collector serves, with their labels (from a real exposition)."""
    metrics = CollectorMetrics()
    metrics.count_fault("batch-scorer", "data_drift", "data-drift")
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_expressions_parse_and_select_exported_series():
    exported = _exported_labels()
    for rule in _rules():
        selectors, groupings = promql_parts(promql_parser.parse(rule["expr"]))
        assert groupings == {"service_name"}, rule["alert"]
        assert selectors, rule["alert"]
        for selector in selectors:
            assert selector.name in exported, f"{rule['alert']}: {selector.name}"
            for matcher in selector.matchers.matchers:
                assert matcher.name in exported[selector.name], f"{rule['alert']}: {matcher}"
                assert matcher.value == rule["labels"]["mode"]


def test_a_counted_fault_matches_its_modes_rule_only(catalog):
    """The series count_fault makes is selected by its mode's rule and no other."""
    metrics = CollectorMetrics()
    metrics.count_fault("ranker", "low_confidence", "low-confidence")
    samples = [
        s
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if s.name == alerts.FAULT_MODES_METRIC
    ]
    assert len(samples) == 1
    matching = [
        rule["alert"]
        for rule in _rules()
        if re.search(r'\{mode="([^"]+)"\}', rule["expr"]).group(1) == samples[0].labels["mode"]
    ]
    assert matching == [alerts.alert_name(catalog.by_id("low-confidence"))]


def test_alertmanager_routes_every_owner_to_a_receiver(catalog):
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    receivers = {r["name"]: r for r in config["receivers"]}
    assert len(receivers) == len(config["receivers"])
    route = config["route"]
    assert route["receiver"] in receivers and "service_name" in route["group_by"]
    routed: dict[str, str] = {}

    def walk(node: dict[str, Any]) -> None:
        for child in node.get("routes", []):
            assert child["receiver"] in receivers, child
            for matcher in child.get("matchers", []):
                assert re.fullmatch(r'[a-z_]+="[^"]*"', matcher), matcher
                if matcher.startswith("owner="):
                    routed[matcher[len('owner="') : -1]] = child["receiver"]
            walk(child)

    walk(route)
    assert set(routed) == {m.owner for m in catalog.modes}
    for owner, receiver in routed.items():
        (hook,) = receivers[receiver]["webhook_configs"]
        assert hook["url"].endswith("/" + owner)


# --- Prometheus' and Alertmanager's own tools ---------------------------------------------


@pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 120)
def test_promtool_checks_the_rules(promtool):
    proc = _run(promtool, "check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout


@pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 120)
def test_promtool_checks_the_prometheus_config_with_the_rules(promtool, tmp_path):
    """prometheus.yaml loads the rules from the folder docs/alerts.md mounts them in."""
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert config["rule_files"] == [f"{RULES_MOUNT}/*.yaml"]
    (tmp_path / "rules").mkdir()
    shutil.copy(RULES, tmp_path / "rules" / RULES.name)
    config["rule_files"] = [str(tmp_path / "rules" / "*.yaml")]
    path = tmp_path / "prometheus.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _run(promtool, "check", "config", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout
    assert f"{RULES_MOUNT}/{RULES.name}" in (ROOT / "docs" / "alerts.md").read_text()


def _annotations(rule: dict[str, Any], service: str, value: int) -> dict[str, str]:
    """The rule's annotations as Prometheus expands them for one alert."""
    out = {}
    for key, text in rule["annotations"].items():
        text = text.replace("{{ $labels.service_name }}", service)
        out[key] = text.replace('{{ printf "%.0f" $value }}', str(value))
    return out


@pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 120)
def test_promtool_fires_the_rule_of_a_counted_mode(promtool, catalog, tmp_path):
    """Series as the collector exports them: a counter born at its first fault (the
    ``increase`` needs two samples, the rule counts it anyway), one that keeps counting,
    and one that does not move."""
    by_alert = {r["alert"]: r for r in _rules()}
    drift, low = catalog.by_id("data-drift"), catalog.by_id("low-confidence")
    drift_rule, low_rule = by_alert[alerts.alert_name(drift)], by_alert[alerts.alert_name(low)]
    nan_rule = by_alert[alerts.alert_name(catalog.by_id("data-quality-nan"))]

    def series(service: str, mode: Any) -> str:
        return (
            f'{alerts.FAULT_MODES_METRIC}{{service_name="{service}",mode="{mode.id}",'
            f'instance="collector-1:8889",job="otel-dl-collector"}}'
        )

    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # Born at 30 s with one fault, then quiet.
                    {"series": series("batch-scorer", drift), "values": "_ _ 1x40"},
                    # Counting from 0: 0 0 1 2 3 at 0..60 s.
                    {"series": series("ranker", low), "values": "0 0 1 2 3 3x40"},
                    {
                        "series": series("ranker", catalog.by_id("data-quality-nan")),
                        "values": "0x40",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "30s",
                        "alertname": drift_rule["alert"],
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "service_name": "batch-scorer",
                                    **drift_rule["labels"],
                                },
                                "exp_annotations": _annotations(drift_rule, "batch-scorer", 1),
                            }
                        ],
                    },
                    {"eval_time": "8m", "alertname": drift_rule["alert"], "exp_alerts": []},
                    {
                        "eval_time": "60s",
                        "alertname": low_rule["alert"],
                        "exp_alerts": [
                            {
                                "exp_labels": {"service_name": "ranker", **low_rule["labels"]},
                                "exp_annotations": _annotations(low_rule, "ranker", 3),
                            }
                        ],
                    },
                    {"eval_time": "60s", "alertname": nan_rule["alert"], "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = _run(promtool, "test", "rules", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 120)
def test_amtool_checks_the_config_and_routes_by_owner(amtool, catalog):
    proc = _run(amtool, "check-config", ALERTMANAGER)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    for mode in catalog.modes:
        proc = _run(
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER}",
            f"owner={mode.owner}",
            f"severity={mode.severity}",
            f"alertname={alerts.alert_name(mode)}",
        )
        assert proc.stdout.split() == [alerts.receiver_name(mode.owner)], proc.stderr
    proc = _run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", "owner=x")
    assert proc.stdout.split() == [alerts.UNROUTED_RECEIVER]


@pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 120)
def test_amtool_refuses_a_broken_config(amtool, tmp_path):
    """The check can fail: a route to a receiver that does not exist."""
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    config["route"]["routes"][0]["receiver"] = "nobody"
    path = tmp_path / "am.yaml"
    path.write_text(yaml.safe_dump(config))
    assert _run(amtool, "check-config", path).returncode != 0


# --- the generator's own errors ------------------------------------------------------------


def test_a_user_catalog_gets_its_own_rules_and_routes(tmp_path, capsys):
    extra = tmp_path / "modes.yaml"
    extra.write_text(
        "modes:\n  - id: feast-materialization-stalled\n    kind: stale_features\n"
        "    origin: internal\n    detect: [{signal: dl.feature.stale, equals: true}]\n"
        "    severity: critical\n    owner: feature-store-team\n    mitigation: m\n"
        "    runbook: https://wiki.example.com/feast/materialization\n"
    )
    assert alerts.main(["--catalog", str(extra), "--window", "10m"]) == 0
    rules = yaml.safe_load(capsys.readouterr().out)["groups"][0]["rules"]
    (rule,) = [r for r in rules if r["labels"]["mode"] == "feast-materialization-stalled"]
    assert rule["alert"] == "OtelDlFeastMaterializationStalled"
    assert rule["annotations"]["runbook_url"] == "https://wiki.example.com/feast/materialization"
    assert "[10m]" in rule["expr"] and rule["labels"]["owner"] == "feature-store-team"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--window", "5 minutes"], "not a Prometheus duration"),
        (["--receiver-url", "https://alerts/x"], "{owner} placeholder"),
        (["--runbook-base-url", "wiki/runbooks"], "flag --runbook-base-url"),
        (["--catalog", "/nonexistent.yaml"], "is not a file"),
    ],
)
def test_bad_options_exit_2_with_the_cause(args, needle, capsys):
    assert alerts.main(args) == 2
    assert needle in capsys.readouterr().err


def test_clashing_alert_names_are_refused(tmp_path):
    extra = tmp_path / "modes.yaml"
    extra.write_text(
        "modes:\n  - id: data_drift\n    kind: data_drift\n    origin: internal\n"
        "    detect: [{signal: dl.drift.score, above: 0.5}]\n    severity: low\n"
        "    owner: me\n    mitigation: m\n    runbook: x.md\n"
    )
    with pytest.raises(ValueError, match="same alert name OtelDlDataDrift"):
        alerts.rules_document(load_catalog(extra))
