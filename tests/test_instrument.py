"""otel_dl.instrument(): providers, discovery, idempotence, include/exclude, shutdown."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opentelemetry import trace
from torch.utils.data import DataLoader, TensorDataset

import otel_dl
from otel_dl import semconv
from otel_dl._config import get_config
from tests.otlp_sink import OtlpSink
from tests.support import TRACER_PROVIDER, SpanList

ROOT = Path(__file__).parents[1]


@pytest.fixture
def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(40, 4)), batch_size=10)


@pytest.fixture
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


def test_uses_the_application_providers(handle: otel_dl.Instrumentation) -> None:
    assert handle.tracer_provider is None and handle.meter_provider is None
    assert trace.get_tracer_provider() is TRACER_PROVIDER
    assert "otel_dl_dataloader" in handle.instrumented


def test_second_call_returns_same_handle_and_no_duplicate_spans(
    handle: otel_dl.Instrumentation, loader: DataLoader, spans: SpanList
) -> None:
    assert otel_dl.instrument(service_name="other") is handle
    list(loader)
    assert len(spans.get(semconv.SPAN_DATALOADER_BATCH)) == 4


def test_a_second_call_checks_its_options_and_names_those_not_applied(
    handle: otel_dl.Instrumentation, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(otel_dl.ConfigError, match="signals_delay_ms"):
        otel_dl.instrument(signals_delay_ms="soon")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otel_dl"):
        again = otel_dl.instrument(
            signals_delay_ms=handle.config.signals_delay_ms + 5,
            drift_method=handle.config.drift_method,  # as active: not named
            request_hook=lambda span, call: None,
        )
    assert again is handle
    assert get_config().signals_delay_ms == handle.config.signals_delay_ms
    (record,) = [r for r in caplog.records if "called again" in r.getMessage()]
    message = record.getMessage()
    assert f"signals_delay_ms={handle.config.signals_delay_ms + 5}" in message
    assert "request_hook" in message and "drift_method" not in message
    assert "shutdown()" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otel_dl"):
        assert otel_dl.instrument() is handle  # nothing asked: nothing to say
    assert not [r for r in caplog.records if "called again" in r.getMessage()]


def test_shutdown_uninstruments(loader: DataLoader, spans: SpanList) -> None:
    h = otel_dl.instrument()
    h.shutdown()
    list(loader)
    assert spans.get() == []
    again = otel_dl.instrument()
    try:
        assert again is not h
        list(loader)
        assert len(spans.get(semconv.SPAN_DATALOADER_BATCH)) == 4
    finally:
        again.shutdown()


@pytest.mark.parametrize("exclude", [["dataloader"], ["otel_dl_dataloader"]])
def test_exclude_by_short_or_full_name(
    exclude: list[str], loader: DataLoader, spans: SpanList
) -> None:
    h = otel_dl.instrument(exclude=exclude)
    try:
        assert "otel_dl_dataloader" in h.skipped
        list(loader)
        assert spans.get() == []
    finally:
        h.shutdown()


def test_disabled_instrumentations_variable(
    monkeypatch: pytest.MonkeyPatch, loader: DataLoader, spans: SpanList
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "otel_dl_dataloader")
    h = otel_dl.instrument()
    try:
        assert "otel_dl_dataloader" not in h.instrumented
        list(loader)
        assert spans.get() == []
    finally:
        h.shutdown()


def test_include_list_limits_instrumentors() -> None:
    h = otel_dl.instrument(include=["something_else"])
    try:
        assert not [name for name in h.instrumented if name.startswith("otel_dl_")]
        assert "OTEL_DL_INSTRUMENTATIONS" in h.skipped["otel_dl_dataloader"]
    finally:
        h.shutdown()


def test_bad_option_is_refused_with_the_fix() -> None:
    with pytest.raises(otel_dl.ConfigError, match="drift_method"):
        otel_dl.instrument(drift_method="nope")
    with pytest.raises(otel_dl.ConfigError, match="unknown otel-dl option"):
        otel_dl.instrument(colour="blue")


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full_env.update(env)
    return subprocess.run(
        [*args, sys.executable, "-c", textwrap.dedent(script)]
        if not args
        else [*args, "python", "-c", textwrap.dedent(script)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


LOOP = """
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    {setup}
    for _ in DataLoader(TensorDataset(torch.randn(30, 4)), batch_size=10):
        pass
    {teardown}
"""


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_fresh_process_gets_providers_and_real_otlp_export(protocol: str) -> None:
    """No provider set: instrument() builds one with the real OTLP exporter."""
    if protocol == "grpc":
        with OtlpSink() as sink:
            result = _run(
                LOOP.format(
                    setup="import otel_dl; h = otel_dl.instrument('svc-a')", teardown="h.shutdown()"
                ),
                {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_METRICS_EXPORTER": "none"},
            )
            assert result.returncode == 0, result.stderr
            assert sink.wait_for(3) == [semconv.SPAN_DATALOADER_BATCH] * 3
            resource = {
                kv.key: kv.value.string_value for kv in sink.resource_spans[0].resource.attributes
            }
            assert resource["service.name"] == "svc-a"
    else:
        result = _run(
            LOOP.format(
                setup="import otel_dl; h = otel_dl.instrument('svc-b')",
                teardown="print(type(h.tracer_provider._active_span_processor"
                "._span_processors[0].span_exporter).__module__); h.shutdown()",
            ),
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            },
        )
        assert result.returncode == 0, result.stderr
        assert "opentelemetry.exporter.otlp.proto.http" in result.stdout


def test_opentelemetry_instrument_runner_picks_up_otel_dl() -> None:
    bin_dir = Path(sys.executable).parent
    result = _run(
        LOOP.format(setup="", teardown=""),
        {
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_SERVICE_NAME": "runner-app",
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
        },
        str(bin_dir / "opentelemetry-instrument"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('"name": "dataloader.batch"') == 3
    assert '"service.name": "runner-app"' in result.stdout


def test_instrument_inside_runner_does_not_double_instrument() -> None:
    bin_dir = Path(sys.executable).parent
    result = _run(
        LOOP.format(
            setup="import otel_dl; h = otel_dl.instrument(); print(h.instrumented)", teardown=""
        ),
        {
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
        },
        str(bin_dir / "opentelemetry-instrument"),
    )
    assert result.returncode == 0, result.stderr
    assert "otel_dl_dataloader" in result.stdout
    assert result.stdout.count('"name": "dataloader.batch"') == 3


def test_the_package_imports_its_public_names_on_first_use() -> None:
    """``import otel_dl`` loads neither numpy nor the SDK until a public name is used, so
    the collector, which reads only ``otel_dl.semconv``, does not carry them; every
    public name still resolves, and ``otel_dl.guard`` is the function whatever was
    imported before it."""
    result = _run(
        """
        import sys
        import otel_dl
        import otel_dl.collector.pipeline, otel_dl.collector.__main__
        assert "numpy" not in sys.modules and "opentelemetry.sdk.trace" not in sys.modules
        import otel_dl.breaker
        assert callable(otel_dl.guard) and otel_dl.guard.__name__ == "guard"
        for name in otel_dl.__all__:
            assert getattr(otel_dl, name) is not None, name
        from otel_dl import Reference, drift
        assert Reference.__module__ == "otel_dl.reference" and drift.__name__ == "otel_dl.drift"
        try:
            otel_dl.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("an unknown name resolved")
        print("ok")
        """,
        {},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
