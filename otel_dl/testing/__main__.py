"""``python -m otel_dl.testing FILE.py:NAME``: run the fault drills on a pipeline and print
the catalog's coverage table.

``NAME`` is a function ``pipeline(faults)`` or a class whose instances are such a callable;
an instance that is a context manager is entered for the drills (to start and stop what
the pipeline needs). The file's folder is put first on ``sys.path``, as when it runs as a
script. Exit status: 0 when every drilled mode was detected (and, with ``--collector``,
attributed), 1 when one was missed, 2 when the drill could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace


def _load(target: str) -> Any:
    path_text, _, name = target.rpartition(":")
    if not path_text or not name:
        raise SystemExit(f"expected FILE.py:NAME, got {target!r}")
    path = Path(path_text).resolve()
    if not path.is_file():
        raise SystemExit(f"no pipeline file {path}")
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    try:
        found = getattr(module, name)
    except AttributeError:
        raise SystemExit(f"{path} defines no {name!r}") from None
    return found() if isinstance(found, type) else found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m otel_dl.testing", description=__doc__)
    parser.add_argument("target", help="FILE.py:NAME of the pipeline")
    parser.add_argument("--collector", action="store_true", help="also check attribution")
    parser.add_argument("--catalog", type=Path, help="YAML file with extra failure modes")
    parser.add_argument("--mode", action="append", help="drill only this mode id (repeatable)")
    parser.add_argument("--baseline-runs", type=int, default=6)
    parser.add_argument("--fault-runs", type=int, default=2)
    args = parser.parse_args(argv)

    import otel_dl
    from otel_dl.collector.catalog import load_catalog
    from otel_dl.testing import DrillError, run_drills

    pipeline = _load(args.target)
    catalog = load_catalog(args.catalog) if args.catalog else None
    with contextlib.ExitStack() as stack:
        if hasattr(pipeline, "__enter__"):
            pipeline = stack.enter_context(pipeline)
        # The pipeline's own otel_dl.instrument() call, if any, configures the signals.
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            stack.callback(
                otel_dl.instrument(traces_exporter="none", metrics_exporter="none").shutdown
            )
        try:
            report = run_drills(
                pipeline,
                catalog=catalog,
                modes=args.mode,
                baseline_runs=args.baseline_runs,
                fault_runs=args.fault_runs,
                collector=args.collector,
            )
        except DrillError as exc:
            print(f"fault drills could not run: {exc}", file=sys.stderr)
            return 2
    print(report.table())
    return 1 if report.missed(attribution=args.collector) else 0


if __name__ == "__main__":
    sys.exit(main())
