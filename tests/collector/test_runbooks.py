"""Runbook pages: one per catalog mode, consistent with it, and links that resolve."""

from __future__ import annotations

import glob
import logging
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from otel_dl import semconv
from otel_dl.collector import catalog as catalog_module
from otel_dl.collector.alerts import alert_name
from otel_dl.collector.catalog import (
    CatalogError,
    default_runbook_base_url,
    load_catalog,
    resolve_runbook,
)
from otel_dl.collector.config import ConfigError, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"
SECTIONS = (
    "## Symptoms",
    "## Find it",
    "## First checks",
    "## Mitigation",
    "## Rollback",
    "## Escalation",
)
MODES = load_catalog().modes
# Jaeger's span tags besides otel-dl's: the error flag Jaeger derives from the status.
JAEGER_TAGS = {"error": "boolean"}
ALLOWED_VALUES = {
    semconv.DL_DRIFT_STATUS: set(semconv.DRIFT_STATUSES),
    semconv.DL_FAULT_KIND: set(semconv.FAULT_KINDS),
    semconv.DL_FAULT_MODE: {m.id for m in MODES},
}


def _path(url: str) -> Path:
    assert url.startswith("file:///"), url
    return Path(unquote(urlparse(url).path))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.id)
def test_every_default_mode_has_its_runbook_page(mode):
    page = _path(mode.runbook)
    assert page.is_file(), f"{mode.id}: no runbook page at {page}"
    assert page == RUNBOOKS / f"{mode.id}.md"


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.id)
def test_runbook_page_matches_its_catalog_entry(mode):
    text = (RUNBOOKS / f"{mode.id}.md").read_text(encoding="utf-8")
    assert text.startswith(f"# {mode.id}: ")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == list(SECTIONS), f"{mode.id}: sections {headings}"
    row = re.search(r"^\| `(\w+)` \| (\w+) \| (\w+) \| ([\w-]+) \|", text, re.MULTILINE)
    assert row, f"{mode.id}: no catalog entry table"
    assert row.groups() == (mode.kind, mode.origin, mode.severity, mode.owner)
    traceql = re.findall(r"```traceql\n(.*?)\n```", text, re.DOTALL)
    assert f'span.dl.fault.mode = "{mode.id}"' in traceql[0]
    jaeger = re.findall(r"```jaeger\n(.*?)\n```", text, re.DOTALL)
    assert f"dl.fault.mode={mode.id}" in jaeger[0].split()
    escalation = text.split("## Escalation", 1)[1]
    assert f"`{alert_name(mode)}`" in escalation, "the alert that pages is named"
    assert mode.owner in escalation


def _check_jaeger_tags(search: str) -> None:
    """Fail unless ``search`` is Jaeger's ``key=value ...`` with known, typed tags."""
    pairs = search.split()
    assert pairs, "empty tag search"
    for pair in pairs:
        key, sep, value = pair.partition("=")
        assert sep and key and value, f"{pair!r} is not key=value"
        kind = JAEGER_TAGS.get(key) or semconv.ATTRIBUTES[key].type
        if kind == "boolean":
            assert value in ("true", "false"), pair
        elif kind in ("int", "double"):
            float(value)
        if key in ALLOWED_VALUES:
            assert value in ALLOWED_VALUES[key], pair


def test_jaeger_tag_searches_use_known_tags():
    searches = [
        search
        for page in sorted(RUNBOOKS.glob("*.md"))
        for search in re.findall(r"```jaeger\n(.*?)\n```", page.read_text(), re.DOTALL)
    ]
    assert len(searches) >= len(MODES)
    for search in searches:
        _check_jaeger_tags(search)


@pytest.mark.parametrize(
    "search", ["dl.fault.mode=no-such-mode", "dl.drift.state=alert", "dl.fault.root_cause=yes"]
)
def test_jaeger_tag_check_refuses_wrong_searches(search):
    with pytest.raises((AssertionError, KeyError)):
        _check_jaeger_tags(search)


def test_index_lists_every_page():
    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    for mode in MODES:
        assert f"[{mode.id}.md]({mode.id}.md)" in index
    pages = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert pages == {m.id for m in MODES}, "a page without a mode, or a mode without a page"


def test_installed_packages_ship_the_pages():
    """pyproject.toml installs the pages where default_runbook_base_url looks for them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data_files = pyproject["tool"]["setuptools"]["data-files"]
    shipped = {
        Path(p).name
        for pattern in data_files["share/otel-dl/runbooks"]
        for p in glob.glob(str(ROOT / pattern))
    }
    assert shipped == {p.name for p in RUNBOOKS.glob("*.md")}
    assert catalog_module.RUNBOOK_DIRS[-1].parts[-3:] == ("share", "otel-dl", "runbooks")


def test_default_base_is_the_first_runbook_folder_that_exists(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "otel-dl" / "runbooks"
    installed.mkdir(parents=True)
    (installed / "data-drift.md").write_text("# data-drift\n")
    monkeypatch.setattr(catalog_module, "RUNBOOK_DIRS", (tmp_path / "missing", installed))
    assert default_runbook_base_url() == installed.as_uri() + "/"
    drift = load_catalog().by_id("data-drift")
    assert _path(drift.runbook) == installed / "data-drift.md"


@pytest.mark.parametrize("base", ["https://wiki.example.com/rb/", "https://wiki.example.com/rb"])
def test_base_url_from_the_configuration(base):
    config = load_config(env={"OTEL_DL_COLLECTOR_RUNBOOK_BASE_URL": base})
    catalog = load_catalog(runbook_base_url=config.runbook_base_url)
    for mode in catalog.modes:
        assert mode.runbook == f"https://wiki.example.com/rb/{mode.id}.md"


def test_user_catalogs_keep_absolute_urls_and_resolve_page_names(tmp_path, caplog):
    extra = tmp_path / "modes.yaml"
    extra.write_text(
        "modes:\n"
        "  - id: data-drift\n    kind: data_drift\n    origin: internal\n"
        "    detect: [{signal: dl.drift.score, above: 0.5}]\n    severity: low\n"
        "    owner: me\n    mitigation: m\n    runbook: https://elsewhere.example.org/drift\n"
        "  - id: my-mode\n    kind: latency\n    origin: internal\n"
        "    detect: [{signal: duration, above: 5}]\n    severity: low\n"
        "    owner: me\n    mitigation: m\n    runbook: teams/me/my-mode.md\n"
    )
    catalog = load_catalog(extra, "https://wiki.example.com/rb/")
    assert catalog.by_id("data-drift").runbook == "https://elsewhere.example.org/drift"
    assert catalog.by_id("my-mode").runbook == "https://wiki.example.com/rb/teams/me/my-mode.md"
    # Against the shipped pages, a page otel-dl does not ship is reported.
    with caplog.at_level(logging.WARNING, logger="otel_dl.collector.catalog"):
        load_catalog(extra)
    assert "no runbook page for mode(s) my-mode" in caplog.text


def test_resolution_rules():
    assert resolve_runbook("x.md", "file:///srv/rb") == "file:///srv/rb/x.md"
    assert resolve_runbook("x.md", "https://w/a/b/") == "https://w/a/b/x.md"
    assert resolve_runbook("http://other/x", "https://w/") == "http://other/x"


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("wiki.example.com/runbooks", "must be an http(s):// URL with a host"),
        ("ftp://wiki.example.com/runbooks/", "must be an http(s):// URL with a host"),
        ("file:runbooks", "file:/// URL of a folder"),
        ("https:///runbooks", "must be an http(s):// URL with a host"),
    ],
)
def test_bad_base_url_is_refused_with_the_fix(value, needle):
    with pytest.raises(ConfigError) as caught:
        load_config(env={"OTEL_DL_COLLECTOR_RUNBOOK_BASE_URL": value})
    message = str(caught.value)
    assert "OTEL_DL_COLLECTOR_RUNBOOK_BASE_URL" in message and needle in message
    assert "e.g. https://" in message


@pytest.mark.parametrize(
    ("runbook", "needle"),
    [
        ("/docs/x.md", "neither an absolute URL nor a page name"),
        ("//host/x.md", "neither an absolute URL nor a page name"),
        ("mailto:oncall", "not a URL with a host"),
    ],
)
def test_bad_runbook_in_a_catalog_names_the_mode_and_the_fix(tmp_path, runbook, needle):
    extra = tmp_path / "modes.yaml"
    extra.write_text(
        "modes:\n  - id: m\n    kind: latency\n    origin: internal\n"
        "    detect: [{signal: duration, above: 5}]\n    severity: low\n"
        f"    owner: me\n    mitigation: m\n    runbook: '{runbook}'\n"
    )
    with pytest.raises(CatalogError, match="mode 'm' field 'runbook'") as caught:
        load_catalog(extra)
    assert needle in str(caught.value)
