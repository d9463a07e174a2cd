"""The pieces the standard ``opentelemetry-instrument`` runner looks for.

``opentelemetry-instrument python app.py`` loads a distro (``opentelemetry_distro`` entry
point), a configurator (``opentelemetry_configurator``) and every
``opentelemetry_instrumentor`` entry point, the otel-dl ones among them. otel-dl's distro
gives the same defaults as ``otel_dl.instrument()`` (OTLP over gRPC for traces and
metrics) and loads otel-dl's configuration from the ``OTEL_DL_*`` variables, so the
instrumentors behave the same under the runner as under ``instrument()``.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.sdk._configuration import _OTelSDKConfigurator
from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_OTLP_PROTOCOL

from otel_dl._config import resolve_config, set_config


class OtelDlConfigurator(_OTelSDKConfigurator):  # type: ignore[misc]
    """The SDK's standard configurator: providers and exporters from ``OTEL_*``."""


class OtelDlDistro(BaseDistro):  # type: ignore[misc]
    """Defaults for the runner, and otel-dl's own configuration from ``OTEL_DL_*``."""

    def _configure(self, **kwargs: Any) -> None:
        os.environ.setdefault(OTEL_TRACES_EXPORTER, "otlp")
        os.environ.setdefault(OTEL_METRICS_EXPORTER, "otlp")
        os.environ.setdefault(OTEL_EXPORTER_OTLP_PROTOCOL, "grpc")
        # A bad OTEL_DL_* value stops the runner here with a message naming the variable.
        set_config(resolve_config())
