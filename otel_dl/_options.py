"""The option mechanism shared by ``otel_dl._config`` and the collector's ``config``.

An :class:`Option` is one row of a configuration table: its name, its environment
variable, how to parse a raw value, what makes a parsed value valid and a help text
that says what to give. The parsers turn a raw value (a string from the environment or
a flag, or a YAML scalar) into a typed one and raise :class:`ValueError` on garbage; the
checks return ``None`` for a valid value, else the problem ("must be 0 or more").
:class:`ConfigError` is the one error both configurations raise, and
:func:`unknown_variables` finds the misspelt variables both warn about.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the option and the fix."""


def accept(_value: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Option:
    """One row of a configuration table."""

    name: str
    env: str
    parse: Callable[[Any], Any]
    help: str
    check: Check = accept

    def problem(self, value: Any) -> str | None:
        """What is wrong with the parsed ``value``; ``None`` when it is valid or unset."""
        return None if value is None else self.check(value)


def unknown_variables(
    environ: Mapping[str, str],
    prefix: str,
    known: Collection[str],
    allowed: tuple[str, ...] = (),
) -> list[tuple[str, str | None]]:
    """The variables of ``environ`` that start with ``prefix`` but are none of ``known``
    (nor start with one of ``allowed``), sorted, each with the closest ``known`` one, or
    ``None`` when none is close: a misspelt variable is otherwise ignored without a word.

    Names are compared without ``prefix``, which they all share: with it, any name under
    the prefix would look close to some variable (``OTEL_DL_FOO`` to ``OTEL_DL_SIGNALS``).
    """
    names = sorted(
        name
        for name in environ
        if isinstance(name, str)
        and name.startswith(prefix)
        and name not in known
        and not name.startswith(allowed)
    )
    by_stem = {variable.removeprefix(prefix): variable for variable in known}
    found: list[tuple[str, str | None]] = []
    for name in names:
        close = difflib.get_close_matches(name.removeprefix(prefix), by_stem, n=1)
        found.append((name, by_stem[close[0]] if close else None))
    return found


# Parsers.


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_optional_float(raw: str) -> float | None:
    return None if raw.strip() == "" else float(raw)


def integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, str):
        value = value.strip()
    out = int(value)
    if isinstance(value, float) and value != out:
        raise ValueError("expected an integer")
    return out


def number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("expected a finite number")
    return out


def text(value: Any) -> str:
    out = str(value).strip()
    if not out:
        raise ValueError("expected a non-empty string")
    return out


def optional_text(value: Any) -> str | None:
    """A string; ``None`` for nothing, an empty string or ``none``."""
    if value is None:
        return None
    out = str(value).strip()
    return None if out == "" or out.lower() == "none" else out


def key_values(value: Any) -> tuple[tuple[str, str], ...]:
    """Pairs with lower-case keys, from a mapping or ``key=value,key=value``."""
    if isinstance(value, Mapping):
        return tuple((str(k).lower(), str(v)) for k, v in value.items())
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError("expected key=value pairs separated by commas")
            pairs.append((key.strip().lower(), val.strip()))
        return tuple(pairs)
    raise ValueError("expected a mapping or key=value,key=value")


# Checks.


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def fraction(value: Any) -> str | None:
    """In [0, 1]."""
    return None if 0.0 <= value <= 1.0 else "must lie in [0, 1]"


def rate(value: Any) -> str | None:
    """In [0, 1): 0 for never."""
    return None if 0.0 <= value < 1.0 else "must be 0 or more and below 1"


def open_fraction(value: Any) -> str | None:
    """In (0, 1): neither never nor always."""
    return None if 0.0 < value < 1.0 else "must be between 0 and 1, exclusive"


def port(value: Any) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number in 0..65535 (0 picks a free one)"


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check
