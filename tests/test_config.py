"""Configuration precedence (argument > environment > default) and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
