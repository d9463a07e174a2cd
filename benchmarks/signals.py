"""Signal costs on one machine, each case against a baseline measured in the same run.

Run: ``.venv/bin/python benchmarks/signals.py``. Prints the median of repeated timings
and the ratio to the baseline (lower is better). Absolute times depend on the machine
and its load; the ratios are what to compare across runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from otel_dl._config import resolve_config
from otel_dl.confidence import summarize
from otel_dl.monitor import FeatureMonitor
from otel_dl.reference import Reference


def median_us(fn: Callable[[], object], budget_s: float = 1.0) -> float:
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(0.02 / once))
    samples = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples) * 1e6


def histogram_loop(batch: np.ndarray, edges: list[np.ndarray]) -> list[np.ndarray]:
    return [np.histogram(batch[:, j], bins=edges[j])[0] for j in range(batch.shape[1])]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def main() -> None:
    rng = np.random.default_rng(0)
    rows: list[tuple[str, float, str, float]] = []
    config = resolve_config({})
    for shape in ((256, 32), (4096, 256)):
        train = rng.standard_normal((20_000, shape[1])).astype(np.float32)
        reference = Reference.fit(train)
        monitor = FeatureMonitor(reference, config=config)
        batch = rng.standard_normal(shape).astype(np.float32)
        edges = [
            np.concatenate([[-np.inf], reference.numeric.edges[:, j], [np.inf]])
            for j in range(shape[1])
        ]
        for _ in range(50):  # fill the drift window as in steady state
            monitor.observe(batch)
        ours = median_us(lambda m=monitor, b=batch: m.observe(b))
        base = median_us(lambda b=batch, e=edges: histogram_loop(b, e))
        label = f"full signal set float32 {shape}"
        if shape[0] > config.drift_max_rows:
            label += f" (row cap {config.drift_max_rows})"
        rows.append((label, ours, "per-column np.histogram loop", base))
    for shape in ((256, 10), (256, 1000)):
        logits = rng.standard_normal(shape).astype(np.float32)
        ours = median_us(lambda z=logits: summarize(z))
        base = median_us(lambda z=logits: softmax(z))
        rows.append((f"confidence.summarize logits {shape}", ours, "numpy stable softmax", base))
    probabilities = softmax(rng.standard_normal((256, 10)).astype(np.float32))
    ours = median_us(lambda: summarize(probabilities))
    base = median_us(lambda: softmax(probabilities))
    label = "confidence.summarize probabilities (256, 10)"
    rows.append((label, ours, "numpy stable softmax", base))

    print(f"{'case':<52} {'median us':>10}  {'baseline':<30} {'median us':>10} {'ratio':>6}")
    for label, ours, base_label, base in rows:
        print(f"{label:<52} {ours:>10.1f}  {base_label:<30} {base:>10.1f} {ours / base:>6.2f}")


if __name__ == "__main__":
    main()
