"""Prometheus alerting rules and an Alertmanager configuration, generated from the catalog.

Every failure mode of the catalog becomes one alerting rule over the collector's
``otel_dl_collector_fault_modes_total{service_name,mode}`` counter: it fires, per
root-cause service, when a trace was attributed that mode in the last ``--window``
(summed over every collector instance), with the mode's ``owner``, ``severity``,
``kind``, ``mode`` and ``origin`` as labels and its runbook (``runbook_url``) and
mitigation as annotations. The Alertmanager configuration routes each owner's alerts to
that owner's receiver::

    python -m otel_dl.collector.alerts \\
        --runbook-base-url https://wiki.example.com/otel-dl/runbooks/ \\
        --rules examples/deploy/prometheus/otel-dl-alerts.yaml \\
        --alertmanager examples/deploy/alertmanager/alertmanager.yaml

The catalog and the runbook base URL come from the collector's own configuration
(``--config``, ``OTEL_DL_COLLECTOR_*``; ``--catalog`` and ``--runbook-base-url``
override them), so the rules name the same runbooks as the spans. Without ``--rules``
the rules are printed. Receivers are webhooks at ``--receiver-url`` with ``{owner}``
replaced; put your paging or chat integration in the generated receivers' place.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .catalog import Catalog, CatalogError, FailureMode, load_catalog
from .config import ConfigError, load_config

FAULT_MODES_METRIC = "otel_dl_collector_fault_modes_total"
RULE_GROUP = "otel-dl-failure-modes"
DEFAULT_WINDOW = "5m"
DEFAULT_RECEIVER_URL = "https://alerts.example.com/otel-dl/{owner}"
#: The receiver of alerts whose owner no route names.
UNROUTED_RECEIVER = "otel-dl-unrouted"
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_HEADER = (
    "# Generated from the otel-dl failure-mode catalog by `python -m otel_dl.collector.alerts`\n"
    "# {options}\n"
    "# Do not edit: change the catalog and regenerate (docs/alerts.md).\n"
)


def alert_name(mode: FailureMode) -> str:
    """The alert's name: ``OtelDl`` and the mode id in CamelCase (``OtelDlDataDrift``)."""
    parts = re.split(r"[^A-Za-z0-9]+", mode.id)
    return "OtelDl" + "".join(p[:1].upper() + p[1:] for p in parts if p)


def _string(value: str) -> str:
    """A double-quoted PromQL / Alertmanager matcher string (JSON escapes are Go's)."""
    return json.dumps(value)


def fault_expr(mode: FailureMode, window: str = DEFAULT_WINDOW) -> str:
    """PromQL: faults of ``mode`` in the last ``window``, by root-cause service.

    ``increase`` needs two samples of a series, and a counter series is born at its first
    fault; the ``unless ... offset`` term counts a series that did not exist a window ago.
    """
    selector = f"{FAULT_MODES_METRIC}{{mode={_string(mode.id)}}}"
    return (
        "sum by (service_name) (\n"
        f"  increase({selector}[{window}])\n"
        f"  or ({selector} unless {selector} offset {window})\n"
        ") > 0"
    )


def rule(mode: FailureMode, window: str = DEFAULT_WINDOW) -> dict[str, Any]:
    """The alerting rule of one failure mode."""
    return {
        "alert": alert_name(mode),
        "expr": fault_expr(mode, window),
        "labels": {
            "severity": mode.severity,
            "owner": mode.owner,
            "kind": mode.kind,
            "mode": mode.id,
            "origin": mode.origin,
        },
        "annotations": {
            "summary": (
                f"{{{{ $labels.service_name }}}}: {mode.id} ({mode.kind}) in "
                f'{{{{ printf "%.0f" $value }}}} trace(s) over {window}'
            ),
            "description": (
                f"The otel-dl collector attributed {mode.kind} faults of failure mode "
                f"{mode.id} ({mode.origin}) to {{{{ $labels.service_name }}}}. "
                f"Owner: {mode.owner}. Open the runbook, then the traces with "
                f'dl.fault.mode="{mode.id}".'
            ),
            "mitigation": mode.mitigation,
            "runbook_url": mode.runbook,
        },
    }


def rules_document(catalog: Catalog, window: str = DEFAULT_WINDOW) -> dict[str, Any]:
    """The Prometheus rule file: one group, one rule per mode, in catalog order."""
    if not _DURATION.match(window):
        raise ValueError(f"window {window!r} is not a Prometheus duration such as 5m or 1h")
    names: dict[str, str] = {}
    for mode in catalog.modes:
        name = alert_name(mode)
        if name in names:
            raise ValueError(
                f"modes {names[name]!r} and {mode.id!r} give the same alert name {name}; "
                "rename one of them"
            )
        names[name] = mode.id
    return {"groups": [{"name": RULE_GROUP, "rules": [rule(m, window) for m in catalog.modes]}]}


def receiver_name(owner: str) -> str:
    """The Alertmanager receiver of one owner."""
    return f"owner-{owner}"


def alertmanager_document(
    catalog: Catalog, receiver_url: str = DEFAULT_RECEIVER_URL
) -> dict[str, Any]:
    """The Alertmanager configuration: one route and one webhook receiver per owner."""
    if "{owner}" not in receiver_url:
        raise ValueError(f"receiver URL {receiver_url!r} needs an {{owner}} placeholder")
    owners = list(dict.fromkeys(m.owner for m in catalog.modes))
    routes = [
        {
            "receiver": receiver_name(owner),
            "matchers": [f"owner={_string(owner)}"],
            # A critical mode pages without waiting for more alerts of the group.
            "routes": [
                {
                    "receiver": receiver_name(owner),
                    "matchers": ['severity="critical"'],
                    "group_wait": "0s",
                    "repeat_interval": "1h",
                }
            ],
        }
        for owner in owners
    ]
    receivers = [
        {
            "name": name,
            "webhook_configs": [
                {"url": receiver_url.replace("{owner}", target), "send_resolved": True}
            ],
        }
        for name, target in [
            (UNROUTED_RECEIVER, "unrouted"),
            *((receiver_name(o), o) for o in owners),
        ]
    ]
    return {
        "route": {
            "receiver": UNROUTED_RECEIVER,
            "group_by": ["alertname", "service_name"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
            "routes": routes,
        },
        "receivers": receivers,
    }


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the PromQL) as literal blocks, as people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(document: dict[str, Any], options: str) -> str:
    """YAML text of ``document`` under a header naming the command and ``options``."""
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return _HEADER.format(options=options) + body


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m otel_dl.collector.alerts",
        description="Generate Prometheus alerting rules and an Alertmanager configuration "
        "from the failure-mode catalog.",
    )
    p.add_argument("--config", type=Path, help="the collector's YAML configuration file")
    p.add_argument("--catalog", help="YAML file with extra or overriding failure modes")
    p.add_argument("--runbook-base-url", dest="runbook_base_url", help="runbook base URL")
    p.add_argument("--window", default=DEFAULT_WINDOW, help="look-back of each rule (5m)")
    p.add_argument("--rules", type=Path, help="write the rule file here (default: print it)")
    p.add_argument("--alertmanager", type=Path, help="write the Alertmanager configuration here")
    p.add_argument(
        "--receiver-url",
        dest="receiver_url",
        default=DEFAULT_RECEIVER_URL,
        help="webhook URL of each owner's receiver, with {owner} (%(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            os.environ,
            {"catalog": args.catalog, "runbook_base_url": args.runbook_base_url},
        )
        catalog = load_catalog(
            Path(config.catalog) if config.catalog else None, config.runbook_base_url
        )
        base = config.runbook_base_url or "the shipped runbook pages"
        catalog_name = config.catalog or "the shipped catalog"
        rules = render(
            rules_document(catalog, args.window),
            f"catalog: {catalog_name}; runbooks: {base}; window: {args.window}.",
        )
        alertmanager = render(
            alertmanager_document(catalog, args.receiver_url),
            f"catalog: {catalog_name}; receivers: {args.receiver_url}.",
        )
    except (ConfigError, CatalogError, ValueError) as exc:
        print(f"otel-dl alerts: {exc}", file=sys.stderr)
        return 2
    if args.rules is None:
        sys.stdout.write(rules)
    else:
        args.rules.write_text(rules, encoding="utf-8")
    if args.alertmanager is not None:
        args.alertmanager.write_text(alertmanager, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
