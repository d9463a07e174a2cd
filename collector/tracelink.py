"""Links from a fault to its trace in the user's Jaeger or Grafana Tempo.

The ``trace_link_template`` option is a URL with placeholders in ``str.format`` syntax:
``{trace_id}`` (32 hex digits), and optionally ``{span_id}`` (16 hex digits, the
root-cause span) and ``{service}`` (its service, URL-encoded). Literal braces, as in a
Grafana Explore URL, are doubled: ``{{`` and ``}}``::

    check_trace_link_template("http://jaeger:16686/trace/{trace_id}")   # at config load
    render_trace_link("http://jaeger:16686/trace/{trace_id}?uiFind={span_id}",
                      trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7")

Templates that work as they are:

- Jaeger: ``http://jaeger:16686/trace/{trace_id}`` (add ``?uiFind={span_id}`` to
  highlight the root-cause span);
- Grafana with a Tempo data source: ``http://grafana:3000/explore?left=...`` with the
  Tempo query ``{trace_id}``, braces of the JSON doubled;
- Tempo's own API: ``http://tempo:3200/api/traces/{trace_id}``.
"""

from __future__ import annotations

import string
from urllib.parse import quote, urlparse

#: Placeholders a template may use.
PLACEHOLDERS = ("trace_id", "span_id", "service")


class TraceLinkError(ValueError):
    """A trace link template that cannot be rendered; the message names the fix."""


def check_trace_link_template(template: str) -> None:
    """Raise :class:`TraceLinkError` unless ``template`` renders an http(s) URL."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TraceLinkError(
            f"is not a valid template ({exc}); write placeholders as {{trace_id}} and "
            "literal braces as {{ and }}"
        ) from exc
    names = set()
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise TraceLinkError(
                f"has the unknown placeholder {{{name}}}; use {{trace_id}}, {{span_id}} or "
                "{service}, and double literal braces ({{ and }})"
            )
        if spec or conversion:
            raise TraceLinkError(f"formats the placeholder {{{name}}}; write it plain")
        names.add(name)
    if "trace_id" not in names:
        raise TraceLinkError("has no {trace_id} placeholder; a link must name the trace")
    sample = _render(template, "0" * 32, "0" * 16, "service")
    parsed = urlparse(sample)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TraceLinkError(
            "must be an http(s):// URL with a host, e.g. http://jaeger:16686/trace/{trace_id}"
        )


def render_trace_link(
    template: str | None, trace_id: str, span_id: str = "", service: str = ""
) -> str | None:
    """The link to ``trace_id`` by a checked ``template``; None when no template is set."""
    if template is None:
        return None
    return _render(template, trace_id, span_id, service)


def _render(template: str, trace_id: str, span_id: str, service: str) -> str:
    return template.format(
        trace_id=quote(trace_id, safe=""),
        span_id=quote(span_id, safe=""),
        service=quote(service, safe=""),
    )
