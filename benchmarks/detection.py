"""Drift detection quality of FeatureMonitor, before and after a change, in one run.

    .venv/bin/python benchmarks/detection.py [--before REV] [--seeds N] [--quick]
        [--option drift_every=4 ...] [--datasets breast_cancer,diabetes,digits,wine]
        [--reference-rows K] [--pool holdout|reference]

"before" is the ``otel_dl/`` package at git revision REV (default ``HEAD``), extracted with
``git archive`` into a temporary folder; "after" is the working tree. Each runs the same
measurement (this file, from the working tree) in its own subprocess, which prints JSON;
this process prints one table.

Data are scikit-learn's bundled data sets (no download). Per seed, each data set's rows are
split in half: one half is the reference (``otel_dl.Reference.fit``), the other is the
pool that the stream draws its batches from by bootstrap. The monitor is used exactly as
the instrumentors use it: ``FeatureMonitor(reference, config=cfg).observe(batch)``, reading
``dl.drift.status`` from the returned attributes; ``cfg`` is the library's own defaults
(``resolve_config``), plus ``--option`` overrides applied to both versions.

- Delay: unshifted batches fill the drift window, then a shift starts (the onset). Each
  version's window spans ``drift_window_rows / min(batch, drift_max_rows)`` batches (its
  rows per batch may be capped), so each version starts from its own steady state. The
  delay is the number of batches from the onset to the first ``alert``
  (0 = the onset batch itself alerted), or "miss" if none came within ``--horizon``
  drift windows. Shown as the median and the max over seeds; a median that is a miss
  means most seeds missed.
- False alerts: a fresh monitor sees ``--null-batches`` unshifted batches; the share of
  batches whose status is ``alert`` (and, separately, ``warn``), pooled over seeds.

The issue's rule is printed next to each row ("check"): the median delay may grow by at
most one drift window (before's window, in batches: the strict reading; both windows are
shown), misses must not rise, and false alerts must not rise. It is
information, not a gate: the exit status is non-zero only when something crashed.
The reference half is small (89 to 898 rows), and the stream bootstraps from the other
half, itself a sample: between the two, sampling alone moves psi by about
(bins - 1) x (1/reference + 1/pool) per feature. The status counts a score only beyond
what the reference's and the window's sizes explain (docs/signals.md), not the pool's,
so on the held-out half of diabetes (221 rows) a share of the null batches stays past
``ok``. ``--reference-rows K`` fits the reference on K rows and streams from all the
others, so the pool is nearly the whole data set, as live traffic is the population: a
small reference then meets data whose own sampling error is small. ``--pool reference``
streams from the reference rows themselves, so that false alerts count only the
monitor's own noise.

About a minute at the defaults on two cores; ``--quick`` (one seed, batch 256, shorter
streams) takes about ten seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATASETS = ("breast_cancer", "diabetes", "digits", "wine")
DEFAULT_DATASETS = ("breast_cancer", "diabetes", "digits")
SHIFTS = ("noise", "scale", "units", "dead", "class_mix")
# Shift sizes: each is a plain, plausible pipeline fault, not tuned to be easy or hard.
NOISE_STD = 0.5  # added Gaussian noise, in units of each feature's reference std
SCALE_FACTOR = 1.5  # "a few features" scaled: a changed normalisation or sensor gain
SCALED_FEATURES = 3
UNITS_FACTOR = 1000.0  # one feature in g instead of kg, or mm instead of m
DEAD_FEATURES = 3  # features that become constant 0 (a dropped join, a dead sensor)
CLASS_BOOST = 3.0  # one class's share tripled (then renormalised)


# --- Data (the same in both subprocesses: nothing here depends on otel_dl) ---------------


@dataclass
class Data:
    name: str
    reference: np.ndarray  # rows the reference is fitted on
    pool: np.ndarray  # rows the stream bootstraps from
    classes: np.ndarray  # class of each pool row (target tertile for regression)
    std: np.ndarray  # per-feature std of the reference rows
    live: np.ndarray  # features where 0 is not the usual value: dead/units/scale show there


def save_datasets(names: list[str], path: Path) -> None:
    """The bundled data sets into one .npz: the parent loads them once (importing sklearn
    takes seconds), and both versions read the very same arrays."""
    from sklearn import datasets

    arrays = {}
    for name in names:
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
        if name == "diabetes":  # regression: the "class" is the target's tertile
            y = np.searchsorted(np.quantile(y, [1 / 3, 2 / 3]), y)
        arrays[f"{name}.x"] = x.astype(np.float32)  # what a DL pipeline feeds a model
        arrays[f"{name}.y"] = np.asarray(y)
    np.savez(path, **arrays)


def load(arrays: Any, name: str, seed: int, pool: str = "holdout", reference_rows: int = 0) -> Data:
    """One seed's split of a data set: the reference (half the rows, or the first
    ``reference_rows`` of a shuffle) and the pool the stream uses (the other rows)."""
    x, y = arrays[f"{name}.x"], arrays[f"{name}.y"]
    order = np.random.default_rng((seed, _key(name))).permutation(len(x))
    half = min(reference_rows, len(x) - 1) if reference_rows > 0 else len(x) // 2
    # "reference": the null stream is the reference's own distribution, so false alerts
    # measure only the monitor's noise, not the reference half's sampling error.
    rows = order[half:] if pool == "holdout" else order[:half]
    reference = x[order[:half]]
    std = reference.std(axis=0)
    # Digits has pixels that are always 0: zeroing or scaling them changes nothing.
    live = np.flatnonzero((np.mean(reference == 0, axis=0) < 0.5) & (std > 0))
    return Data(name, reference, x[rows], y[rows], std, live)


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def stream(
    data: Data, shift: str | None, onset: int, batch: int, seed: int
) -> Callable[[int], np.ndarray]:
    """Batch ``i`` of a seeded bootstrap stream, shifted from batch ``onset`` on.

    Call it with i = 0, 1, 2, ... in order: it draws from one generator.
    """
    rng = np.random.default_rng((seed, _key(data.name), batch, _key(shift or "none")))
    features = rng.permutation(data.live)  # which features the shift touches
    labels = np.unique(data.classes)
    by_class = [np.flatnonzero(data.classes == c) for c in labels]
    share = np.array([len(rows) for rows in by_class], dtype=float)
    share[rng.integers(len(labels))] *= CLASS_BOOST
    share /= share.sum()

    def make(i: int) -> np.ndarray:
        shifted = shift is not None and i >= onset
        if shifted and shift == "class_mix":
            counts = rng.multinomial(batch, share)
            rows = np.concatenate(
                [rng.choice(idx, n) for idx, n in zip(by_class, counts, strict=True)]
            )
            return data.pool[rng.permutation(rows)]  # a loader shuffles: no class-sorted batch
        out = data.pool[rng.integers(0, len(data.pool), batch)]  # a copy: safe to change
        if not shifted:
            return out
        if shift == "noise":
            out += (rng.standard_normal(out.shape) * (NOISE_STD * data.std)).astype(out.dtype)
        elif shift == "scale":
            out[:, features[:SCALED_FEATURES]] *= SCALE_FACTOR
        elif shift == "units":
            out[:, features[0]] *= UNITS_FACTOR
        elif shift == "dead":
            out[:, features[:DEAD_FEATURES]] = 0.0
        return out

    return make


# --- Worker: runs in a subprocess against one version of otel_dl --------------------------


def _config(options: dict[str, Any]) -> Any:
    """The library's own defaults (environment ignored), plus ``options``."""
    try:
        from otel_dl._config import resolve_config
    except ImportError:  # a version without it: the public Config's defaults
        import otel_dl

        return otel_dl.Config(**options)
    try:
        return resolve_config(options, environ={})
    except TypeError:  # a version without the environ argument
        return resolve_config(options)


BURST = 16
"""Calls per burst here. The library's bursts hold 16 to 64 calls (``otel_dl._burst``);
the statuses do not depend on it: a burst feeds its calls to the drift window one by
one, and each gets the status its own rows completed."""


def statuses(m: Any, make: Any, count: int, key: str) -> Iterator[Any]:
    """The drift status of batches 0 .. count-1 as instrumented calls get it: a batch the
    monitor would leave for a burst (a small one, on versions that have bursts) is
    profiled with the next ones, 16 at a time; any other batch at once."""
    burst = getattr(m, "burst_inputs", None)
    pending: list[Any] = []

    def flush() -> Iterator[Any]:
        found = m.profile_burst(pending, [None] * len(pending)) if pending else []
        pending.clear()
        for attributes in found:
            yield attributes.get(key)

    for i in range(count):
        batch = make(i)
        kept = burst(batch) if burst is not None else None
        if kept is None:
            yield from flush()
            yield m.observe(batch).get(key)
            continue
        pending.append(kept)
        if len(pending) == BURST:
            yield from flush()
    yield from flush()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import otel_dl
    from otel_dl import semconv

    status_key = getattr(semconv, "DL_DRIFT_STATUS", "dl.drift.status")
    cfg = _config(dict(args.option))
    window = int(getattr(cfg, "drift_window_rows", 10_000))
    cap = int(getattr(cfg, "drift_max_rows", 0) or 0)  # rows per batch into the window
    shown = ("drift_method", "drift_window_rows", "drift_min_rows", "drift_every")
    shown += ("drift_max_rows", "drift_warn", "drift_alert", "drift_bins")
    settings = {k: getattr(cfg, k) for k in shown if hasattr(cfg, k)}
    settings.update({k: getattr(cfg, k) for k, _ in args.option})
    bins = int(getattr(cfg, "drift_bins", 10))

    def monitor(data: Data) -> Any:
        return otel_dl.FeatureMonitor(otel_dl.Reference.fit(data.reference, bins=bins), config=cfg)

    results: list[dict[str, Any]] = []
    windows: dict[int, int] = {}
    arrays = dict(np.load(args.data))
    for name in args.datasets:
        for seed in range(args.seeds):
            data = load(arrays, name, seed, args.pool, args.reference_rows)
            for batch in args.batch:
                # The onset comes when the window holds only unshifted rows: the steady
                # state of a long-running job, the hardest start for a windowed detector.
                window_batches = math.ceil(window / min(batch, cap or batch))
                windows[batch] = window_batches
                onset = window_batches
                horizon = math.ceil(args.horizon * window_batches)
                row = {"dataset": name, "batch": batch, "seed": seed}
                for shift in SHIFTS:
                    m, make = monitor(data), stream(data, shift, onset, batch, seed)
                    delay, pre_alert = None, False
                    for i, status in enumerate(statuses(m, make, onset + horizon, status_key)):
                        if i == onset - 1:
                            pre_alert = status == "alert"
                        if i >= onset and status == "alert":
                            delay = i - onset
                            break
                    results.append({**row, "shift": shift, "delay": delay, "pre": pre_alert})
                m, make = monitor(data), stream(data, None, 0, batch, seed)
                counts = {"alert": 0, "warn": 0, "ok": 0, None: 0}
                for status in statuses(m, make, args.null_batches, status_key):
                    counts[status if status in counts else None] += 1
                results.append(
                    {
                        **row,
                        "shift": None,
                        "batches": args.null_batches,
                        "alert": counts["alert"],
                        "warn": counts["warn"],
                        "unscored": counts[None],
                    }
                )
            print(f"  {args.label}: {name} seed {seed} done", file=sys.stderr, flush=True)
    return {
        "label": args.label,
        "otel_dl": str(Path(otel_dl.__file__).resolve().parent),
        "settings": settings,
        "windows": windows,
        "results": results,
    }


# --- Parent: extract "before", run both, print the table ----------------------------------


def _git(*argv: str) -> str:
    # Read-only git only: other people work in this tree at the same time.
    return subprocess.run(
        ["git", "--no-optional-locks", *argv], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def _extract(rev: str, into: Path) -> None:
    """``otel_dl/`` at ``rev`` into ``into``: the core package imports from that folder alone."""
    done = subprocess.run(["git", "archive", rev, "otel_dl"], cwd=REPO, capture_output=True)
    if done.returncode:
        raise SystemExit(f"git archive {rev} otel_dl: {done.stderr.decode().strip()}")
    archive = done.stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def _start(label: str, root: Path, argv: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)  # ahead of the editable install of the working tree
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"  # two workers share the cores; threads would only contend
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", label, *argv]
    return subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _collect(proc: subprocess.Popen[str], root: Path) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise SystemExit(f"worker failed with exit status {proc.returncode}")
    report: dict[str, Any] = json.loads(out)
    if not Path(report["otel_dl"]).is_relative_to(root.resolve()):
        raise SystemExit(f"{report['label']} imported otel_dl from {report['otel_dl']}, not {root}")
    return report


def _delays(results: list[dict[str, Any]], key: tuple[str, int, str]) -> tuple[list[float], int]:
    """Sorted delays over seeds (inf = missed), and how many seeds were at alert already
    on the batch before the onset (their delay says little)."""
    rows = [r for r in results if (r["dataset"], r["batch"], r["shift"]) == key]
    delays = sorted(math.inf if r["delay"] is None else r["delay"] for r in rows)
    return delays, sum(r["pre"] for r in rows)


def _fmt(value: float) -> str:
    return "miss" if math.isinf(value) else f"{value:g}"


def _cell(delays: list[float], pre: int) -> str:
    return f"{_fmt(statistics.median(delays))}/{_fmt(delays[-1])}" + ("*" * bool(pre))


def _rates(results: list[dict[str, Any]], key: tuple[str, int]) -> tuple[float, float, int]:
    rows = [r for r in results if (r["dataset"], r["batch"]) == key and r["shift"] is None]
    total = sum(r["batches"] for r in rows)
    alerts = sum(r["alert"] for r in rows)
    return alerts / total, sum(r["warn"] for r in rows) / total, alerts


def table(before: dict[str, Any], after: dict[str, Any], args: argparse.Namespace) -> None:
    b_set, a_set = before["settings"], after["settings"]
    print(f"before: {before['label']} ({before['otel_dl']})  settings {b_set}")
    print(f"after:  {after['label']} ({after['otel_dl']})  settings {a_set}")
    print(
        f"seeds {args.seeds}; onset after one window of unshifted batches; horizon "
        f"{args.horizon:g} windows; null stream {args.null_batches} batches per seed\n"
    )
    head = (
        f"{'dataset':<14}{'batch':>6}{'win b/a':>9}  {'shift':<10}{'delay before':>13}"
        f"{'delay after':>12}{'Δ win':>7}{'alert% b/a':>14}{'warn% b/a':>14}  check"
    )
    print(head)
    print("-" * len(head))
    for name in args.datasets:
        for batch in args.batch:
            # JSON turned the int keys into strings.
            window_batches = before["windows"][str(batch)]
            windows = f"{window_batches}/{after['windows'][str(batch)]}"
            for shift in SHIFTS:
                key = (name, batch, shift)
                b, b_pre = _delays(before["results"], key)
                a, a_pre = _delays(after["results"], key)
                bm, am = statistics.median(b), statistics.median(a)
                grow = (am - bm) / window_batches if math.isfinite(am - bm) else math.nan
                misses = sum(map(math.isinf, a)) <= sum(map(math.isinf, b))
                ok = am <= bm + window_batches and misses
                print(
                    f"{name:<14}{batch:>6}{windows:>9}  {shift:<10}"
                    f"{_cell(b, b_pre):>13}{_cell(a, a_pre):>12}"
                    f"{'' if math.isnan(grow) else f'{grow:+.2f}':>7}{'':>14}{'':>14}"
                    f"  {'ok' if ok else 'WORSE'}"
                )
            ba, bw, bn = _rates(before["results"], (name, batch))
            aa, aw, an = _rates(after["results"], (name, batch))
            print(
                f"{name:<14}{batch:>6}{windows:>9}  {'(none)':<10}{'':>13}{'':>12}{'':>7}"
                f"{f'{100 * ba:.2f}/{100 * aa:.2f}':>14}{f'{100 * bw:.1f}/{100 * aw:.1f}':>14}"
                f"  {'ok' if an <= bn else 'WORSE'}"
            )
    print(
        "\ndelay: batches from the onset to the first alert, median/max over seeds"
        " ('miss': none within the horizon).\n"
        "win b/a: drift window in batches, before/after (drift_window_rows /"
        " min(batch, drift_max_rows)); the onset comes after one window of unshifted batches.\n"
        "Δ win: after minus before median delay, in before's windows (the rule: at most +1;"
        " 'check' uses before's window, the strict reading).\n"
        "alert% / warn%: share of the null stream's batches with that status, before/after.\n"
        "*: some seed was at alert already on the batch before the onset (the null alerts on"
        " that split), so its delay says little."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="git revision of 'before'")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS))
    parser.add_argument("--batch", help="batch sizes, comma-separated (default 64,256)")
    parser.add_argument("--horizon", type=float, default=3.0, help="in drift windows")
    parser.add_argument("--null-batches", type=int, default=2000)
    parser.add_argument(
        "--pool",
        choices=("holdout", "reference"),
        default="holdout",
        help="rows the stream draws from: the held-out half, or the reference half itself",
    )
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=0,
        help="fit the reference on this many rows (default: half of each data set); the "
        "stream draws from the others, so a small reference meets a pool that is nearly "
        "the whole data set, as a model fitted on a small sample meets live traffic",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="otel-dl option for both versions (int/float/str), e.g. drift_every=4",
    )
    parser.add_argument("--worker", dest="label", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.datasets = [d for d in args.datasets.split(",") if d]
    if unknown := sorted(set(args.datasets) - set(DATASETS)):
        parser.error(f"unknown datasets {unknown}; choose from {', '.join(DATASETS)}")
    # --quick keeps batch 256 only: at 64 the window is 157 batches and dominates the time.
    args.batch = [int(b) for b in (args.batch or ("256" if args.quick else "64,256")).split(",")]
    args.option = [_option(text, parser) for text in args.option]
    if args.quick:
        args.seeds, args.null_batches, args.horizon = 1, 300, min(args.horizon, 2.0)
    if args.label is not None:
        print(json.dumps(worker(args)))
        return

    start = time.perf_counter()
    passed = [
        f"--seeds={args.seeds}",
        f"--datasets={','.join(args.datasets)}",
        f"--batch={','.join(map(str, args.batch))}",
        f"--horizon={args.horizon}",
        f"--null-batches={args.null_batches}",
        f"--pool={args.pool}",
        f"--reference-rows={args.reference_rows}",
        *[f"--option={k}={v}" for k, v in args.option],
    ]
    try:
        rev = _git("rev-parse", "--short", args.before)
        changed = _git("diff", "--shortstat", args.before, "--", "otel_dl") or "no changes"
        new = _git("ls-files", "--others", "--exclude-standard", "--", "otel_dl").split()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"git: {exc.stderr.strip()}") from None
    if new:
        changed += f", {len(new)} untracked files"
    with tempfile.TemporaryDirectory(prefix="otel-dl-before-") as tmp:
        _extract(args.before, Path(tmp))
        data = Path(tmp) / "datasets.npz"
        save_datasets(args.datasets, data)
        passed.append(f"--data={data}")
        # Both at once: the results do not depend on timing, and it halves the wall time.
        procs = [
            (_start(f"{args.before} ({rev})", Path(tmp), passed), Path(tmp)),
            (_start(f"working tree ({changed} in otel_dl/)", REPO, passed), REPO),
        ]
        try:
            before, after = (_collect(proc, root) for proc, root in procs)
        finally:
            for proc, _ in procs:  # one failed: do not leave the other running
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    table(before, after, args)
    print(f"\nrun time {time.perf_counter() - start:.0f} s")


def _option(text: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep:
        parser.error(f"--option expects NAME=VALUE, got {text!r}")
    value: Any = raw
    for kind in (int, float):
        try:
            value = kind(raw)
            break
        except ValueError:
            continue
    return name.strip(), value


if __name__ == "__main__":
    main()
