"""Configuration precedence (argument > environment > default) and clear errors."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_dl import _config
from otel_dl._config import OPTIONS, Config, ConfigError, resolve_config


def test_defaults_without_environment() -> None:
    assert resolve_config(environ={}) == Config()


def test_environment_beats_default_and_argument_beats_environment() -> None:
    env = {"OTEL_DL_DRIFT_METHOD": "js", "OTEL_SERVICE_NAME": "from-env"}
    assert resolve_config(environ=env).drift_method == "js"
    assert resolve_config(environ=env).service_name == "from-env"
    config = resolve_config({"drift_method": "ks", "service_name": "from-arg"}, environ=env)
    assert (config.drift_method, config.service_name) == ("ks", "from-arg")


def test_none_argument_falls_back_to_environment() -> None:
    config = resolve_config({"drift_bins": None}, environ={"OTEL_DL_DRIFT_BINS": "20"})
    assert config.drift_bins == 20


def test_lists_from_environment_and_arguments() -> None:
    env = {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_dl_dataloader , requests"}
    assert resolve_config(environ=env).exclude == ("otel_dl_dataloader", "requests")
    assert resolve_config({"include": ["dataloader"]}, environ={}).include == ("dataloader",)


def test_bad_environment_value_names_variable_and_fix() -> None:
    with pytest.raises(ConfigError, match=r"OTEL_DL_DRIFT_BINS='ten'.*Set it to"):
        resolve_config(environ={"OTEL_DL_DRIFT_BINS": "ten"})
    with pytest.raises(ConfigError, match="OTEL_DL_SIGNALS"):
        resolve_config(environ={"OTEL_DL_SIGNALS": "maybe"})


def test_out_of_range_and_unknown_values_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"drift_method.*must be one of psi, js, ks, wasserstein"):
        resolve_config({"drift_method": "chi2"}, environ={})
    with pytest.raises(ConfigError, match="OTEL_DL_CONFIDENCE_THRESHOLD"):
        resolve_config(environ={"OTEL_DL_CONFIDENCE_THRESHOLD": "1.5"})
    with pytest.raises(ConfigError, match=r"unknown otel-dl option.*drift_metod"):
        resolve_config({"drift_metod": "js"}, environ={})


def test_readme_lists_every_option_with_its_variable() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = set(re.findall(r"^\|\s*`(\w+)`\s*\|\s*`(OTEL_\w+)`", readme, flags=re.M))
    assert rows == {(option.name, option.env) for option in OPTIONS}


def test_arguments_of_the_wrong_type_get_a_clear_error() -> None:
    # A string argument reads as the environment variable would.
    assert resolve_config({"drift_every": "4", "signals": "false"}, environ={}).drift_every == 4
    with pytest.raises(ConfigError, match=r"signals_delay_ms = 'soon' is not valid.*Give"):
        resolve_config({"signals_delay_ms": "soon"}, environ={})
    with pytest.raises(ConfigError, match=r"drift_every \(OTEL_DL_DRIFT_EVERY\).*is a dict"):
        resolve_config({"drift_every": {"every": 4}}, environ={})


@pytest.fixture
def warnings_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` of otel-dl's warnings, with the once-per-process memory of names emptied."""
    monkeypatch.setattr(_config, "_warned_variables", set())
    with caplog.at_level(logging.WARNING, logger="otel_dl"):
        yield caplog


def test_a_misspelt_variable_is_reported_with_the_likely_one(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    env = {"OTEL_DL_SAMPLE_EVRY": "10", "OTEL_DL_DRIFT_METOD": "js", "OTEL_DL_FOO": "1"}
    assert resolve_config(environ=env) == Config()  # ignored, as before, but not silently
    assert warnings_log.messages == [
        "otel-dl: environment variable OTEL_DL_DRIFT_METOD is not an otel-dl option and is "
        "ignored; did you mean OTEL_DL_DRIFT_METHOD?",
        "otel-dl: environment variable OTEL_DL_FOO is not an otel-dl option and is ignored",
        "otel-dl: environment variable OTEL_DL_SAMPLE_EVRY is not an otel-dl option and is "
        "ignored; did you mean OTEL_DL_SAMPLE_EVERY?",
    ]


def test_options_and_the_projects_other_variables_are_not_reported(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    env = {option.env: "" for option in OPTIONS}  # the names matter; empty reads as unset
    env.update(
        {
            "OTEL_DL_COLLECTOR_GRPC_PORT": "4317",
            "OTEL_DL_COLLECTOR_GRPC_PROT": "4317",  # the collector's to report, not ours
            "OTEL_DL_RELIABILITY": "full",
            "OTEL_DL_RELIABILITY_OUT": "/tmp/findings.jsonl",
            "OTEL_DL_RELIABILITY_CASE": "crash",
            "OTEL_DL_JAEGER_BIN": "/usr/local/bin/jaeger",
            "OTEL_DL_HOTROD_BIN": "/usr/local/bin/hotrod",
        }
    )
    resolve_config(environ=env)
    assert warnings_log.messages == []
    # Only the two binaries are allowed, not every *_BIN: this one is a misspelt option.
    resolve_config(environ={"OTEL_DL_DRIFT_BIN": "20"})
    assert len(warnings_log.messages) == 1
    assert "did you mean OTEL_DL_DRIFT_BINS?" in warnings_log.messages[0]


def test_a_misspelt_variable_is_reported_once_per_process(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    for _ in range(3):
        resolve_config(environ={"OTEL_DL_SAMPLE_EVRY": "10"})
    resolve_config(environ={"OTEL_DL_SAMPLE_EVRY": "10", "OTEL_DL_SIGNAL": "false"})
    assert len(warnings_log.messages) == 2
    assert "OTEL_DL_SAMPLE_EVRY" in warnings_log.messages[0]
    assert "did you mean OTEL_DL_SIGNALS?" in warnings_log.messages[1]


def test_checking_the_variables_never_stops_the_configuration(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    class Unlistable(dict[str, str]):
        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("changed during iteration")

    config = resolve_config(environ=Unlistable(OTEL_DL_DRIFT_BINS="20"))
    assert config.drift_bins == 20
    assert warnings_log.messages == []
