"""The signal modules import one way, by public names only:
table -> stats -> reference -> drift -> quality/provenance/confidence -> calibration -> monitor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ORDER = [
    "table",
    "stats",
    "reference",
    "drift",
    "quality",
    "provenance",
    "confidence",
    "calibration",
    "monitor",
]
PACKAGE = Path(__file__).parents[2] / "otel_dl"


@pytest.mark.parametrize("module", ORDER)
def test_imports_run_one_way_by_public_names(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module):
            continue
        parts = node.module.split(".")
        if parts[0] != "otel_dl" or len(parts) < 2 or parts[1] not in ORDER:
            continue
        assert ORDER.index(parts[1]) < ORDER.index(module), f"{module} imports {node.module}"
        private = [alias.name for alias in node.names if alias.name.startswith("_")]
        assert not private, f"{module} imports private {private} from {node.module}"
