"""The ``otel-dl`` command: reports over the collector's fault store.

``otel-dl report`` prints the top root causes over a time window (service × kind ×
count, with what the root cause stands for and the latest trace ids), then the
incidents of the window: faulty traces grouped in time, each with its services ranked
over all its traces against the healthy traffic before it (see incidents.py).
``--html PATH`` also writes a self-contained HTML report with the same tables, a service
graph (root-cause services highlighted), drift and confidence timelines per service,
and the latest faults with owners and runbooks::

    otel-dl report --store otel-dl.sqlite --since 24h
    otel-dl report --since 1h --gap 120 --html faults.html
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from otel_dl import semconv

from .api import parse_since
from .incidents import DEFAULT_GAP, Incident, query_incidents
from .store import FaultRow, query_edges, query_faults, query_signals
from .tracelink import check_trace_link_template, render_trace_link

TRACE_LINK_ENV = "OTEL_DL_COLLECTOR_TRACE_LINK_TEMPLATE"
"""The collector's own setting, which the report reads too."""


@dataclass
class RootCauseRow:
    """One line of the report: faults of one kind rooted in one service."""

    service: str
    kind: str
    count: int
    modes: tuple[str, ...]
    owner: str
    runbook: str
    latest_traces: tuple[str, ...]
    #: ``dl.fault.blame`` values of the faults, most frequent first.
    blames: tuple[str, ...] = ()


def summarise(faults: Sequence[FaultRow], latest: int = 3) -> list[RootCauseRow]:
    """Group faults (newest first) by service and kind, most frequent first."""
    groups: dict[tuple[str, str], list[FaultRow]] = {}
    for row in faults:
        groups.setdefault((row.service, row.kind), []).append(row)
    rows = [
        RootCauseRow(
            service=service,
            kind=kind,
            count=len(items),
            modes=tuple(dict.fromkeys(r.mode for r in items)),
            owner=items[0].owner,
            runbook=items[0].runbook,
            latest_traces=tuple(r.trace_id for r in items[:latest]),
            blames=tuple(b for b, _ in Counter(r.blame for r in items).most_common()),
        )
        for (service, kind), items in groups.items()
    ]
    rows.sort(key=lambda r: (-r.count, r.service, r.kind))
    return rows


def format_table(rows: Sequence[RootCauseRow]) -> str:
    """A plain-text table of root causes."""
    if not rows:
        return "no faults in this window"
    header = ("service", "kind", "count", "blame", "mode", "owner", "latest trace ids")
    body = [
        (
            r.service,
            r.kind,
            str(r.count),
            ",".join(r.blames),
            ",".join(r.modes),
            r.owner,
            " ".join(r.latest_traces),
        )
        for r in rows
    ]
    return _columns(header, body)


def _columns(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=False)) for b in body]
    return "\n".join(lines)


def _utc(seconds: float) -> str:
    return f"{datetime.fromtimestamp(seconds, timezone.utc):%Y-%m-%d %H:%M:%S}"


def _ranking(incident: Incident, top: int = 3) -> str:
    return ", ".join(f"{r.service} {r.score:.2f}" for r in incident.ranking[:top])


def format_incidents(incidents: Sequence[Incident]) -> str:
    """A plain-text table of incidents, newest first, with their top-ranked services."""
    if not incidents:
        return "no incidents in this window"
    header = ("start (UTC)", "seconds", "faulty", "healthy", "ranked services", "kinds")
    body = [
        (
            _utc(i.start),
            f"{i.end - i.start:.0f}",
            str(i.faulty),
            str(i.healthy),
            _ranking(i),
            ",".join(i.kinds),
        )
        for i in incidents
    ]
    return _columns(header, body)


#: A gap longer than this many median sample intervals breaks a timeline's line.
_GAP_INTERVALS = 3


def plural(count: int, noun: str) -> str:
    """``"1 fault"``, ``"2 faults"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def break_gaps(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """The series with a NaN point inside every gap over a few sample intervals, so the
    plotted line stops there instead of suggesting a steady change across missing data."""
    if len(xs) < 3:
        return list(xs), list(ys)
    steps = sorted(b - a for a, b in itertools.pairwise(xs))
    limit = _GAP_INTERVALS * max(steps[len(steps) // 2], 1e-9)
    out_x, out_y = [xs[0]], [ys[0]]
    for (x0, x1), y in zip(itertools.pairwise(xs), ys[1:], strict=False):
        if x1 - x0 > limit:
            out_x.append((x0 + x1) / 2)
            out_y.append(math.nan)
        out_x.append(x1)
        out_y.append(y)
    return out_x, out_y


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def _service_graph(edges: Sequence[tuple[str, str, int]], causes: dict[str, int]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    services = sorted({s for e in edges for s in e[:2]} | set(causes))
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.set_axis_off()
    if not services:
        plt.close(fig)
        return ""
    pos = {
        s: (math.cos(2 * math.pi * i / len(services)), math.sin(2 * math.pi * i / len(services)))
        for i, s in enumerate(services)
    }
    for caller, callee, count in edges:
        (x0, y0), (x1, y1) = pos[caller], pos[callee]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={"arrowstyle": "->", "color": "#888", "lw": 1 + math.log10(1 + count)},
        )
    for s, (x, y) in pos.items():
        hit = causes.get(s, 0)
        ax.scatter([x], [y], s=900, color="#d62728" if hit else "#1f77b4", zorder=3)
        ax.text(
            x, y - 0.2, f"{s}" + (f"\n{plural(hit, 'fault')}" if hit else ""), ha="center", va="top"
        )
    ax.set_title("Service graph (red: root-cause services)")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.6, 1.4)
    out = _png(fig)
    plt.close(fig)
    return out


def _timelines(samples: Sequence[tuple[float, str, str, float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return ""
    signals = (semconv.DL_DRIFT_SCORE, semconv.DL_CONFIDENCE_MEAN)
    fig, axes = plt.subplots(len(signals), 1, figsize=(8, 5), sharex=True)
    for ax, signal in zip(axes, signals, strict=False):
        series: dict[str, tuple[list[float], list[float]]] = {}
        for t, service, sig, value in samples:
            if sig == signal:
                xs, ys = series.setdefault(service, ([], []))
                xs.append(t - samples[0][0])
                ys.append(value)
        for service, (xs, ys) in sorted(series.items()):
            ax.plot(*break_gaps(xs, ys), ".-", label=service, markersize=3)
        ax.set_ylabel(signal)
        if series:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("seconds since the window start")
    out = _png(fig)
    plt.close(fig)
    return out


def render_html(
    rows: Sequence[RootCauseRow],
    faults: Sequence[FaultRow],
    edges: Sequence[tuple[str, str, int]],
    samples: Sequence[tuple[float, str, str, float]],
    window: str,
    incidents: Sequence[Incident] = (),
    trace_link: str | None = None,
) -> str:
    """A self-contained HTML report (images embedded as data URIs); with ``trace_link``
    (a template, see collector/tracelink.py), each trace id links to the trace."""
    causes: dict[str, int] = {}
    for r in rows:
        causes[r.service] = causes.get(r.service, 0) + r.count
    graph, timelines = _service_graph(edges, causes), _timelines(samples)
    esc = html.escape

    def trace(trace_id: str, span_id: str = "", service: str = "") -> str:
        href = render_trace_link(trace_link, trace_id, span_id, service)
        code = f"<code>{esc(trace_id)}</code>"
        return f'<a href="{esc(href)}">{code}</a>' if href else code

    table = "".join(
        f"<tr><td>{esc(r.service)}</td><td>{esc(r.kind)}</td><td>{r.count}</td>"
        f"<td>{esc(', '.join(r.blames))}</td>"
        f"<td>{esc(', '.join(r.modes))}</td><td>{esc(r.owner)}</td>"
        f'<td><a href="{esc(r.runbook)}">{esc(r.runbook)}</a></td>'
        f"<td>{'<br>'.join(trace(t) for t in r.latest_traces)}</td></tr>"
        for r in rows
    )
    recent = "".join(
        f"<tr><td>{_utc(f.time)}</td>"
        f"<td>{trace(f.trace_id, f.span_id, f.service)}</td><td>{esc(f.service)}</td>"
        f"<td>{esc(f.span_name)}</td><td>{esc(f.mode)}</td><td>{esc(f.blame)}</td>"
        f"<td>{f.score:.2f}</td><td>{esc(f.evidence)}</td></tr>"
        for f in faults[:50]
    )
    incident_rows = "".join(
        f"<tr><td>{_utc(i.start)}</td><td>{i.end - i.start:.0f}</td><td>{i.faulty}</td>"
        f"<td>{i.healthy}</td><td>{esc(_ranking(i, 5))}</td>"
        f"<td>{esc(', '.join(i.kinds))}</td>"
        f"<td>{'<br>'.join(trace(t) for t in i.latest_traces[:3])}</td></tr>"
        for i in incidents
    )
    count = plural(len(faults), "attributed fault")
    img = lambda data, alt: f'<img alt="{alt}" src="data:image/png;base64,{data}">' if data else ""  # noqa: E731
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>otel-dl fault report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}}
th{{background:#eee}}</style></head><body>
<h1>otel-dl fault report</h1><p>Window: {esc(window)}. {count}.</p>
<h2>Top root causes</h2>
<table><tr><th>service</th><th>kind</th><th>count</th><th>blame</th><th>mode</th>
<th>owner</th><th>runbook</th><th>latest traces</th></tr>{table}</table>
<h2>Incidents</h2>
<table><tr><th>start (UTC)</th><th>seconds</th><th>faulty traces</th>
<th>healthy traces</th><th>ranked services (score)</th><th>kinds</th>
<th>latest traces</th></tr>{incident_rows}</table>
<h2>Service graph</h2>{img(graph, "service graph")}
<h2>Drift and confidence per service</h2>{img(timelines, "timelines")}
<h2>Latest faults</h2>
<table><tr><th>time (UTC)</th><th>trace</th><th>service</th><th>span</th><th>mode</th>
<th>blame</th><th>score</th><th>evidence</th></tr>{recent}</table>
</body></html>
"""


def report(
    store: Path,
    since: str,
    html_path: Path | None,
    out: TextIO = sys.stdout,
    gap: float = DEFAULT_GAP,
    trace_link: str | None = None,
) -> int:
    """Print the root-cause and incident tables; write the HTML report when ``html_path``
    is given. ``gap``: seconds between two faulty traces of one incident; ``trace_link``:
    a template that links each trace to Jaeger or Tempo (the latest faults' links are
    printed, and every trace id of the HTML report links)."""
    start = parse_since(since)
    faults = query_faults(store, since=start, limit=100_000)
    rows = summarise(faults)
    incidents = query_incidents(store, since=start, gap=gap)
    print(format_table(rows), file=out)
    print(f"\nincidents\n{format_incidents(incidents)}", file=out)
    if trace_link is not None and faults:
        print("\nlatest faults' traces", file=out)
        for f in faults[:10]:
            link = render_trace_link(trace_link, f.trace_id, f.span_id, f.service)
            print(f"  {f.service:<20} {f.mode:<28} {link}", file=out)
    if html_path is not None:
        page = render_html(
            rows,
            faults,
            query_edges(store),
            query_signals(store, start),
            since,
            incidents,
            trace_link,
        )
        html_path.write_text(page, encoding="utf-8")
        print(f"wrote {html_path}", file=out)
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-dl", description="otel-dl tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="top root causes from the collector's fault store")
    rep.add_argument("--store", type=Path, default=Path("otel-dl.sqlite"), help="SQLite store")
    rep.add_argument(
        "--since", default="24h", help="window start: 15m, 2h, 7d or unix seconds (24h)"
    )
    rep.add_argument("--html", type=Path, help="also write a self-contained HTML report here")
    rep.add_argument(
        "--gap",
        type=_positive,
        default=DEFAULT_GAP,
        help=f"seconds between two faulty traces of one incident ({DEFAULT_GAP:g})",
    )
    rep.add_argument(
        "--trace-link-template",
        default=os.environ.get(TRACE_LINK_ENV),
        help="link each trace, e.g. http://jaeger:16686/trace/{trace_id}"
        f" (default: ${TRACE_LINK_ENV})",
    )
    args = parser.parse_args(argv)
    if args.trace_link_template is not None:
        try:
            check_trace_link_template(args.trace_link_template)
        except ValueError as exc:
            print(f"otel-dl: --trace-link-template: {exc}", file=sys.stderr)
            return 2
    try:
        return report(
            args.store, args.since, args.html, gap=args.gap, trace_link=args.trace_link_template
        )
    except FileNotFoundError as exc:
        print(f"otel-dl: {exc}", file=sys.stderr)
        return 2
    except ValueError:
        print("otel-dl: --since must be like 15m, 2h, 7d or unix seconds", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
